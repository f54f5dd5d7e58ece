"""Files as older tools wrote them, for tests and fixtures that must look like a user's download.

Most checkpoints people fine-tune were saved by transformers 4, whose ``config.json`` spells some
keys differently from transformers 5. :func:`transformers4_config` undoes what transformers 5's
``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` and ``PreTrainedConfig.__post_init__``
do when they read an old file (so reading the result with transformers 5 gives the model back):

* ``rope_parameters`` -> ``rope_theta`` (and ``partial_rotary_factor`` where the model has one)
  at top level, and ``rope_scaling`` holding the remaining entries (``null`` for the default
  rope type, as transformers 4 wrote it);
* ``dtype`` -> ``torch_dtype``;
* keys whose value is ``PretrainedConfig``'s own default and that transformers 4's
  ``to_diff_dict`` therefore left out (``pad_token_id: null`` and the like);
* ``transformers_version`` set to a 4.x release.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The transformers 4 release the rewritten files claim to come from.
TRANSFORMERS4_VERSION = "4.57.1"
#: ``PretrainedConfig`` defaults that transformers 4's ``to_diff_dict`` omitted when unchanged.
_OMITTED_DEFAULTS: dict[str, Any] = {
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
}


def transformers4_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (as transformers 5 writes it) in the form transformers 4 wrote."""
    old = dict(config)
    rope = old.pop("rope_parameters", None)
    if isinstance(rope, dict) and rope and not any(isinstance(v, dict) for v in rope.values()):
        scaling = dict(rope)
        old["rope_theta"] = scaling.pop("rope_theta", 10000.0)
        if "partial_rotary_factor" in scaling:
            old["partial_rotary_factor"] = scaling.pop("partial_rotary_factor")
        old["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    elif rope is not None:
        old["rope_parameters"] = rope  # per-layer-type rope: no transformers 4 spelling
    if "dtype" in old:
        old["torch_dtype"] = old.pop("dtype")
    for key, default in _OMITTED_DEFAULTS.items():
        if key in old and old[key] == default:
            del old[key]
    old["transformers_version"] = TRANSFORMERS4_VERSION
    return old


def write_transformers4_config(folder: Path) -> Path:
    """Rewrite ``folder/config.json`` in place as transformers 4 wrote it; return the path."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(transformers4_config(config), indent=2, sort_keys=True) + "\n")
    return path
