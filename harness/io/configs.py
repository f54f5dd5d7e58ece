"""Compare two ``config.json`` files by what they mean, not by how they are written.

A base written by transformers 4 and a merge saved by transformers 5 spell the same model
differently: ``rope_theta``/``rope_scaling`` became ``rope_parameters``, ``torch_dtype`` became
``dtype``, and defaults that one version omitted the other writes out. Both files are therefore
read through transformers' own config class for their ``model_type`` (the same code that reads
them when the model loads, which converts the old keys) and the resulting dictionaries are
compared, nested dictionaries key by key. A ``model_type`` transformers does not know (custom
code) is compared as written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from harness.io.models import quiet
from harness.text import shown

#: Top-level keys of transformers 4 that transformers 5 copies into ``rope_parameters``.
_ROPE_LEFTOVERS = ("rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class ConfigChange:
    """One key whose meaning differs: dotted path (``rope_parameters.rope_theta``) and values."""

    key: str
    base: Any
    merged: Any

    def describe(self) -> str:
        """``'key': base X, merged Y``."""
        return f"{shown(self.key)}: base {shown(self.base)}, merged {shown(self.merged)}"


@dataclass(frozen=True)
class ConfigComparison:
    """The differences of two configs and how they were read."""

    changes: list[ConfigChange]
    #: How the configs were read: ``"LlamaConfig"`` (normalised), or ``None`` (as written).
    read_as: str | None
    #: Why a config was compared as written (unknown model type, transformers refused it).
    note: str | None = None


def normalised(config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None, str | None]:
    """``config`` as transformers' config class for its ``model_type`` reads it.

    Returns ``(values, class name, None)``, or ``(config as written, None, reason)`` when no
    transformers class reads it.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return dict(config), None, "no model_type"
    try:
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            return dict(config), None, f"transformers has no config class for {model_type!r}"
        cls = CONFIG_MAPPING[model_type]
        with quiet():
            values = cls.from_dict(dict(config)).to_dict()
    except Exception as exc:  # any refusal means: compare as written
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return dict(config), None, f"transformers cannot read it ({reason[:200]})"
    # the version that read it, not the one that wrote it
    values.pop("transformers_version", None)
    rope = values.get("rope_parameters")
    if isinstance(rope, Mapping):
        for key in _ROPE_LEFTOVERS:
            # an old top-level key transformers copied into rope_parameters (which the model
            # reads); the leftover attribute says nothing more
            if key in values and key in rope and rope[key] == values[key]:
                del values[key]
    return values, cls.__name__, None


def _walk(base: Any, merged: Any, key: str, out: list[ConfigChange]) -> None:
    """Collect differing leaves; dictionaries are compared key by key."""
    if isinstance(base, Mapping) and isinstance(merged, Mapping):
        for sub in sorted(set(base) | set(merged), key=str):
            _walk(base.get(sub), merged.get(sub), f"{key}.{sub}", out)
        return
    if base != merged:
        out.append(ConfigChange(key, base, merged))


def compare_configs(
    base: Mapping[str, Any], merged: Mapping[str, Any], allowed: Iterable[str]
) -> ConfigComparison:
    """The differences of meaning between two configs, outside the ``allowed`` keys.

    A key is allowed when its top-level name or its last component is in ``allowed``
    (``text_config.dtype`` is allowed by ``dtype``).
    """
    allow = frozenset(allowed)
    base_values, base_class, base_note = normalised(base)
    merged_values, merged_class, merged_note = normalised(merged)
    if base_class is None or merged_class is None:
        # one side could not be normalised: compare both as written, never one of each
        base_values, merged_values = dict(base), dict(merged)
    found: list[ConfigChange] = []
    for key in sorted(set(base_values) | set(merged_values)):
        if key in allow:
            continue
        _walk(base_values.get(key), merged_values.get(key), key, found)
    changes = [c for c in found if c.key.rsplit(".", 1)[-1] not in allow]
    read_as = base_class if base_class == merged_class else None
    return ConfigComparison(changes, read_as, base_note or merged_note)
