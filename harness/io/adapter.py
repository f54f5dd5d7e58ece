"""Read a PEFT adapter folder: ``adapter_config.json`` plus ``adapter_model.safetensors``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.dtypes import FLOATING
from harness.errors import AdapterError, CheckpointError
from harness.io.files import read_json
from harness.io.patterns import PatternMatcher
from harness.io.pickled import OPT_IN, load_pickle_state, pickle_infos
from harness.io.safetensors import (
    SafetensorsFile,
    TensorInfo,
    read_header,
    read_range,
    tensor_from_bytes,
)
from harness.text import shown

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
#: peft prefixes every saved key with this; the rest is the base model's module path.
KEY_PREFIX = "base_model.model."
#: Path components that name an adapter's own tensors (everything before them is the module).
ROLES = frozenset(
    {
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
        "lora_E", "trainable_tokens_delta", "ia3_l",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    }
)
#: Wrapper components peft inserts between a module and a saved copy of one of its parameters.
_WRAPPERS = ("base_layer", "original_module", "token_adapter")


@dataclass
class Adapter:
    """A validated adapter folder: its config and lazily read tensors (peft key names)."""

    root: Path
    config: dict[str, Any]
    file: SafetensorsFile | None
    tensors: dict[str, TensorInfo]
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    #: Keys already checked to be finite (a tensor is read once per edit and dtype).
    _finite: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Adapter:
        """Open and validate an adapter folder; raise :class:`AdapterError` if invalid."""
        root = Path(path)
        if not root.exists():
            raise AdapterError(f"{root}: no such adapter folder")
        if not root.is_dir():
            raise AdapterError(f"{root}: expected an adapter folder, found a file")
        config_path = root / CONFIG_FILE
        if not config_path.is_file():
            raise AdapterError(f"{root}: no {CONFIG_FILE} (not a PEFT adapter folder)")
        try:
            config = read_json(config_path)
        except CheckpointError as exc:
            raise AdapterError(f"{CONFIG_FILE}: {str(exc).split(': ', 1)[-1]}") from None
        if not isinstance(config, dict):
            raise AdapterError(f"{CONFIG_FILE}: not a JSON object")
        if not isinstance(config.get("peft_type"), str):
            raise AdapterError(f"{CONFIG_FILE}: missing peft_type")
        weights = root / WEIGHTS_FILE
        if weights.is_file():
            try:
                sfile = read_header(weights)
            except CheckpointError as exc:
                raise AdapterError(str(exc)) from None
            return cls(root, config, sfile, dict(sfile.tensors))
        if (root / PICKLE_FILE).is_file():
            return cls._open_pickle(root, config, allow_pickle)
        raise AdapterError(f"{root}: no {WEIGHTS_FILE}")

    @classmethod
    def _open_pickle(cls, root: Path, config: dict[str, Any], allow_pickle: bool) -> Adapter:
        if not allow_pickle:
            raise AdapterError(
                f"{root}: only a pickle {PICKLE_FILE}; refusing to unpickle. Save with"
                f" safetensors, or opt in ({OPT_IN})"
            )
        try:
            state = load_pickle_state(root / PICKLE_FILE)
            infos = pickle_infos(root / PICKLE_FILE, state)
        except CheckpointError as exc:
            raise AdapterError(str(exc)) from None
        return cls(root, config, None, infos, state)

    @property
    def peft_type(self) -> str:
        """The adapter type as peft names it (``LORA``, ``IA3``, ``LOHA``, ...)."""
        return str(self.config["peft_type"]).upper()

    @property
    def base_model_name_or_path(self) -> str | None:
        """Where the adapter says its base model is (a local folder or a hub id)."""
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    @cached_property
    def patterns(self) -> PatternMatcher:
        """Compiles and matches this adapter's regexes within one time budget (peft's rules)."""
        return PatternMatcher(CONFIG_FILE)

    @cached_property
    def layout(self) -> AdapterLayout:
        """The saved keys grouped by module: adapter roles, and full copies of base tensors."""
        return parse_layout(self.tensors)

    def tensor(self, key: str) -> torch.Tensor:
        """One adapter tensor by its saved key, as a CPU tensor; AdapterError if not finite.

        A NaN or an Inf in an adapter factor makes the merged weights NaN or Inf, and the
        oracle's bound on them infinite: such an adapter is broken, whatever the merge did.
        """
        if self._pickled is not None:
            tensor = self._pickled[key]
        else:
            info = self.tensors[key]
            try:
                data = read_range(info, bytearray(info.nbytes))
            except CheckpointError as exc:
                raise AdapterError(str(exc)) from None
            tensor = tensor_from_bytes(info, data)
        if key not in self._finite:
            self._check_finite(key, tensor)
        return tensor

    def _check_finite(self, key: str, tensor: torch.Tensor) -> None:
        import torch

        if tensor.is_floating_point() and tensor.numel():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                where = self.tensors[key].file if self.file is not None else self.root
                raise AdapterError(
                    f"{where}: adapter tensor {key!r} holds {bad} NaN/Inf value(s): a"
                    " non-finite adapter factor makes every merged value unverifiable"
                )
        self._finite.add(key)


def discover_base(adapter_path: Path) -> Path:
    """The local base folder named by an adapter's ``base_model_name_or_path``.

    Relative paths are tried against the current folder and the adapter's folder. A hub id is a
    usage error: the harness never downloads.
    """
    adapter = Adapter.open(adapter_path)
    name = adapter.base_model_name_or_path
    if name is None:
        raise AdapterError(
            f"{CONFIG_FILE}: no base_model_name_or_path; pass --base-model"
        )
    candidates = [Path(name)] if os.path.isabs(name) else [Path(name), adapter_path / name]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise AdapterError(
        f"{CONFIG_FILE}: base_model_name_or_path {name!r} is not a local folder (the harness"
        " works offline and never downloads); pass --base-model PATH"
    )


# ---- key layout ----------------------------------------------------------------------------


@dataclass
class AdapterLayout:
    """An adapter's saved keys mapped onto the base model's module paths.

    ``modules`` maps a module path (``model.layers.0.self_attn.q_proj``) to its adapter tensors by
    role (``lora_A``, ``lora_B``, ``lora_B.bias``, ``lora_magnitude_vector``, ...). ``copies`` maps
    a base tensor name (``lm_head.weight``) to a saved key holding a full replacement: a
    ``modules_to_save`` copy, or a ``base_layer`` weight that peft loads over the base.
    """

    modules: dict[str, dict[str, str]] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)
    #: Copies that peft saves only as a courtesy (the embedding's ``base_layer.weight``).
    base_layer_copies: frozenset[str] = frozenset()


def _strip_prefix(key: str) -> str:
    return key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key


def parse_layout(tensors: dict[str, TensorInfo]) -> AdapterLayout:
    """Group saved adapter keys by module path (see :class:`AdapterLayout`)."""
    layout = AdapterLayout()
    base_layer: set[str] = set()
    for key in sorted(tensors):
        parts = _strip_prefix(key).split(".")
        index = next((i for i, part in enumerate(parts) if part in ROLES), None)
        if index is not None:
            module_parts = parts[:index]
            if module_parts and module_parts[-1] == "token_adapter":
                module_parts = module_parts[:-1]
            # after the role: an optional adapter name (never saved by peft, but tolerated), then
            # "weight"/"bias" or nothing
            rest = [p for p in parts[index + 1:] if p in ("weight", "bias")]
            role = parts[index] + (".bias" if rest == ["bias"] else "")
            module = ".".join(module_parts)
            layout.modules.setdefault(module, {})[role] = key
            continue
        if "original_module" in parts:
            # the untrained module beside a modules_to_save copy (peft saves it with the
            # embedding layers of a resized vocabulary): the base, not a change
            continue
        # a full copy: drop peft's wrapper components (and a modules_to_save[.<adapter>])
        clean: list[str] = []
        skip = 0
        for i, part in enumerate(parts):
            if skip:
                skip -= 1
                continue
            if part == "modules_to_save":
                skip = 1 if i + 1 < len(parts) - 1 else 0
                continue
            if part in _WRAPPERS:
                if part == "base_layer":
                    base_layer.add(".".join(p for p in parts if p not in _WRAPPERS))
                continue
            clean.append(part)
        # the same copy saved under modules_to_save and plainly: keep the plain key
        if ".".join(clean) not in layout.copies or "modules_to_save" not in parts:
            layout.copies[".".join(clean)] = key
    layout.base_layer_copies = frozenset(base_layer)
    return layout


# ---- config validation ---------------------------------------------------------------------

#: peft types whose config carries a rank ``r`` and a scale numerator (key name per type).
_RANKED = {"LORA": "lora_alpha", "LOHA": "alpha", "LOKR": "alpha", "ADALORA": "lora_alpha"}


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(adapter: Adapter) -> None:
    """Reject configs peft itself would refuse or that make the merge meaningless.

    Raises :class:`AdapterError` with a one-line cause: ``r <= 0``, a negative or non-numeric
    alpha, bad ``rank_pattern``/``alpha_pattern`` entries, a pattern ``re`` cannot compile
    (:mod:`harness.io.patterns`), or an adapter file without a single adapter tensor (its
    ``target_modules`` matched nothing).
    """
    config = adapter.config
    where = CONFIG_FILE
    alpha_key = _RANKED.get(adapter.peft_type)
    if alpha_key is not None:
        r = config.get("r", 8)
        if not _positive_int(r):
            raise AdapterError(f"{where}: r must be a positive integer, got {r!r}")
        alpha = config.get(alpha_key, 8)
        if not _finite_number(alpha):
            raise AdapterError(f"{where}: {alpha_key} must be a number, got {alpha!r}")
        if alpha < 0:
            raise AdapterError(f"{where}: {alpha_key} must be >= 0, got {alpha!r}")
        for name, check, what in (
            ("rank_pattern", _positive_int, "a positive integer"),
            ("alpha_pattern", lambda v: _finite_number(v) and v >= 0, "a number >= 0"),
        ):
            pattern = config.get(name) or {}
            if not isinstance(pattern, dict):
                raise AdapterError(
                    f"{where}: {name} must be an object, got {type(pattern).__name__}"
                )
            for key, value in pattern.items():
                if not check(value):
                    raise AdapterError(f"{where}: {name}[{key!r}] must be {what}, got {value!r}")
                adapter.patterns.compile(key, f"{name} key")
    for key, info in adapter.tensors.items():
        if info.dtype not in FLOATING:
            raise AdapterError(
                f"{info.file}: adapter tensor {shown(key)} is {info.dtype}; adapter weights are"
                " floating point"
            )
    for name in ("target_modules", "exclude_modules", "feedforward_modules"):
        value = config.get(name)
        if isinstance(value, str):
            adapter.patterns.compile(value, name)
    layout = adapter.layout
    if not layout.modules and not (set(layout.copies) - layout.base_layer_copies):
        targets = config.get("target_modules")
        raise AdapterError(
            f"{WEIGHTS_FILE}: no adapter weights (target_modules {targets!r} matched nothing"
            " when the adapter was saved?)"
        )
