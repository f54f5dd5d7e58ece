"""Tiny real models, adapters and merges on disk, for fixtures, tests and the demo.

Everything is built from configs (no download): a 2-layer, 32-wide model takes milliseconds.
Adapters get non-zero random ``lora_B`` (peft initialises it to zero, which would make every
merge a no-op), so each merge really changes the weights.

:class:`ModelSpec`, :class:`AdapterSpec` and :class:`MergeSpec` name a tiny model, an adapter
and a whole merge case as plain, hashable data: the public hypothesis strategies generate them
and the ``tiny_merge_factory`` fixture builds (and caches) them; :func:`build_case` builds one
case into a folder. The architectures' configs and module names are in
:mod:`harness.tiny_configs` (re-exported here).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.checks.sidecars import SIDECAR_FILES
from harness.evals.tokenizer import build_char_tokenizer
from harness.io.models import auto_class, quiet, task_of
from harness.merger import merge_checkpoint
from harness.tiny_configs import (
    ARCHITECTURES,
    DTYPES,
    ENCODERS,
    MODULES,
    NUM_LABELS,
    TASKS,
    TORCH_DTYPES,
    Modules,
    all_architectures,
    model_config,
)

__all__ = [
    "ARCHITECTURES",
    "DTYPES",
    "ENCODERS",
    "MODULES",
    "NUM_LABELS",
    "PEFT_TYPES",
    "TASKS",
    "TORCH_DTYPES",
    "AdapterSpec",
    "BuiltMerge",
    "MergeSpec",
    "ModelSpec",
    "Modules",
    "all_architectures",
    "build_adapter",
    "build_base",
    "build_case",
    "build_merge",
    "copy_sidecars",
    "model_config",
    "peft_merge",
]


def build_base(
    folder: Path,
    arch: str = "llama",
    dtype: str = "F32",
    seed: int = 0,
    max_shard_size: str | int | None = None,
    *,
    task: str = "CAUSAL_LM",
    tokenizer: bool = False,
    **overrides: Any,
) -> Path:
    """Save a randomly initialised tiny model of ``arch`` in ``dtype`` to ``folder``.

    ``task`` picks the head: ``CAUSAL_LM`` (the default) or ``SEQ_CLS`` (``NUM_LABELS`` labels;
    decoders get ``pad_token_id=0`` so that padded batches pool the right token). With
    ``tokenizer`` a character-level fast tokenizer of exactly ``vocab_size`` tokens is saved too.
    """
    import torch

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if arch in ENCODERS and task == "CAUSAL_LM":
        raise ValueError(f"{arch} is an encoder: build it with task='SEQ_CLS'")
    if task == "SEQ_CLS":
        overrides = {"num_labels": NUM_LABELS, "pad_token_id": 0, **overrides}

    torch.manual_seed(seed)
    config = model_config(arch, **overrides)
    model = auto_class(task).from_config(config)
    model = model.to(getattr(torch, TORCH_DTYPES[dtype]))
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    with quiet():
        model.save_pretrained(folder, **kwargs)
    if tokenizer:
        build_char_tokenizer(folder, int(config.vocab_size))
    return folder


#: Loaded tiny bases kept in memory (copied per use): loading costs more than building here.
_LOADED: dict[tuple[str, str, str, int], Any] = {}
_CACHE_LIMIT_BYTES = 16 * 2**20
_CACHE_ENTRIES = 16


def _load_base(folder: Path, task: str, dtype: Any) -> Any:
    """``from_pretrained`` of a base, from an in-memory copy for small (tiny) checkpoints."""
    import copy

    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    stamp = max((f.stat().st_mtime_ns for f in files), default=0)
    key = (str(folder.resolve()), task, str(dtype), stamp)
    if key not in _LOADED:
        with quiet():
            model = auto_class(task).from_pretrained(folder, dtype=dtype, local_files_only=True)
        if size > _CACHE_LIMIT_BYTES:
            return model
        if len(_LOADED) >= _CACHE_ENTRIES:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = model
    return copy.deepcopy(_LOADED[key])


def _task_of(folder: Path, lora: Mapping[str, Any]) -> str:
    config = json.loads((folder / "config.json").read_text())
    task = lora.get("task_type")
    return task_of({"task_type": str(task)} if task else None, config)


#: peft types the tiny builders make adapters of, and the peft config class of each.
_PEFT_CONFIGS = {
    "LORA": "LoraConfig",
    "IA3": "IA3Config",
    "LOHA": "LoHaConfig",
    "LOKR": "LoKrConfig",
}
PEFT_TYPES = tuple(_PEFT_CONFIGS)
#: ``LoraConfig`` defaults of the tiny LoRA adapters (every linear layer, rank 4, alpha 8).
_LORA_DEFAULTS = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def build_adapter(
    base: Path,
    folder: Path,
    seed: int = 1,
    scale: float = 0.5,
    *,
    peft_type: str = "LORA",
    **config: Any,
) -> Path:
    """Save a peft adapter for ``base`` with random non-zero weights.

    ``config`` holds the keyword arguments of the ``peft_type``'s config class: ``LoraConfig``
    for ``LORA`` (``r=4, lora_alpha=8, target_modules="all-linear"`` unless given),
    ``IA3Config``, ``LoHaConfig`` or ``LoKrConfig`` (as given) for ``IA3``, ``LOHA``, ``LOKR``.
    Every trainable tensor (``lora_A``/``lora_B``, DoRA magnitudes, embedding LoRA, IA3 vectors,
    LoHa/LoKr factors, copies of ``modules_to_save``) gets Gaussian noise of standard deviation
    ``scale`` added, so the merge really changes the weights.
    """
    import peft
    import torch

    if peft_type not in _PEFT_CONFIGS:
        raise ValueError(f"peft_type must be one of {PEFT_TYPES}, got {peft_type!r}")
    task = _task_of(base, config)
    if task == "SEQ_CLS":
        config = {"task_type": "SEQ_CLS", **config}
    if peft_type == "LORA":
        config = {**_LORA_DEFAULTS, **config}
    model = _load_base(base, task, torch.float32)
    with quiet():
        peft_config = getattr(peft, _PEFT_CONFIGS[peft_type])(**config)
        peft_model = peft.get_peft_model(model, peft_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(param + noise.to(param.dtype))
    with quiet():
        peft_model.save_pretrained(str(folder))
    _set_base_path(folder, base)
    return folder


def _set_base_path(folder: Path, base: Path) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def peft_merge(
    base: Path,
    adapter: Path | Sequence[Path],
    folder: Path,
    max_shard_size: str | int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Merge with peft's own ``merge_and_unload`` and save, in the base's dtype.

    Several adapters are merged one after the other, in order, each into the previous merge.
    """
    from peft import PeftModel

    adapters = (
        [Path(adapter)] if isinstance(adapter, (str, os.PathLike)) else [Path(a) for a in adapter]
    )
    adapter_config = json.loads((adapters[0] / "adapter_config.json").read_text())
    merged = _load_base(base, _task_of(base, adapter_config), "auto")
    with quiet():
        for each in adapters:
            merged = PeftModel.from_pretrained(merged, each).merge_and_unload()
    for key, value in (config_overrides or {}).items():
        setattr(merged.config, key, value)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    with quiet():
        merged.save_pretrained(folder, **kwargs)
    return folder


def build_merge(
    base: Path,
    adapters: Sequence[Path],
    folder: Path,
    *,
    method: str = "peft",
    shard: str | int | None = None,
) -> Path:
    """Merge ``adapters`` (in order) into ``base`` and save the merge to ``folder``.

    ``method``: ``peft`` (``merge_and_unload``, then the base's tokenizer files and
    ``generation_config.json`` copied as a merge script should) or ``harness`` (the streaming
    merger, which copies them itself). ``shard`` is the ``max_shard_size`` of the merge (None:
    peft writes one file, the streaming merger keeps the base's shard plan).
    """
    if method == "harness":
        return merge_checkpoint(base, list(adapters), folder, max_shard_size=shard, progress=False)
    if method != "peft":
        raise ValueError(f"method must be 'peft' or 'harness', got {method!r}")
    peft_merge(base, adapters, folder, max_shard_size=shard)
    copy_sidecars(base, folder)
    return folder


# ---- merge cases as data ----------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """Lists become tuples and dicts sorted item tuples, so a spec hashes and prints stably."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(items: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """Config keyword arguments back from their frozen form."""
    out: dict[str, Any] = {}
    for key, value in items:
        if key in ("rank_pattern", "alpha_pattern"):
            out[key] = {str(k): v for k, v in value}
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class ModelSpec:
    """A tiny model to build: architecture, stored dtype, task, seed and config overrides.

    ``shard`` saves the checkpoint in shards of that ``max_shard_size`` (``"20KB"`` or bytes;
    None: one file); ``tokenizer`` saves a character-level tokenizer with it.
    """

    arch: str = "llama"
    dtype: str = "F32"
    task: str = "CAUSAL_LM"
    seed: int = 0
    overrides: tuple[tuple[str, Any], ...] = ()
    shard: str | int | None = None
    tokenizer: bool = True

    def __post_init__(self) -> None:
        if self.arch not in all_architectures():
            raise ValueError(f"unknown tiny architecture {self.arch!r}")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        object.__setattr__(self, "overrides", _freeze(dict(self.overrides)))

    @property
    def modules(self) -> Modules:
        """The architecture's module names."""
        return MODULES[self.arch]

    def build(self, folder: Path, *, tokenizer: bool | None = None) -> Path:
        """Save this model to ``folder``.

        A tokenizer is saved too unless ``tokenizer`` (by default the spec's own) is False.
        """
        return build_base(
            folder,
            self.arch,
            self.dtype,
            self.seed,
            self.shard,
            task=self.task,
            tokenizer=self.tokenizer if tokenizer is None else tokenizer,
            **dict(self.overrides),
        )

    def key_parts(self) -> list[Any]:
        """The spec as plain values, for cache keys.

        ``shard`` and ``tokenizer`` appear only when not the defaults, so the keys of specs
        that leave them alone read as before those fields existed.
        """
        parts = [self.arch, self.dtype, self.task, self.seed, self.overrides]
        if self.shard is not None or not self.tokenizer:
            parts += [self.shard, self.tokenizer]
        return parts


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to build on a tiny model: its peft type, config, seed and weight noise.

    ``config`` holds the keyword arguments of the peft type's config class (``LoraConfig`` for
    ``LORA``, ``IA3Config``, ``LoHaConfig``, ``LoKrConfig``), frozen to tuples;
    :attr:`config_kwargs` gives them back as a dict. See :func:`build_adapter`.
    """

    config: tuple[tuple[str, Any], ...] = ()
    seed: int = 1
    scale: float = 0.5
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if self.peft_type not in PEFT_TYPES:
            raise ValueError(f"peft_type must be one of {PEFT_TYPES}, got {self.peft_type!r}")
        object.__setattr__(self, "config", _freeze(dict(self.config)))

    @property
    def config_kwargs(self) -> dict[str, Any]:
        """The config class's keyword arguments."""
        return _thaw(self.config)

    def build(self, base: Path, folder: Path) -> Path:
        """Save this adapter for ``base`` to ``folder``."""
        return build_adapter(
            base, folder, self.seed, self.scale, peft_type=self.peft_type, **self.config_kwargs
        )


@dataclass(frozen=True)
class MergeSpec:
    """A whole merge case: a tiny model, an adapter config, the adapter's noise, who merges.

    ``lora`` holds the adapter config's keyword arguments (``LoraConfig`` ones for the default
    ``peft_type="LORA"``; ``IA3Config``, ``LoHaConfig``, ``LoKrConfig`` ones for ``IA3``,
    ``LOHA``, ``LOKR``), frozen to tuples; :attr:`lora_kwargs` gives them back as a dict.
    ``method`` is ``peft`` (``merge_and_unload``) or ``harness`` (the streaming merger).
    ``shard`` saves the merge in shards of that ``max_shard_size`` (see :func:`build_merge`).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    lora: tuple[tuple[str, Any], ...] = ()
    adapter_seed: int = 1
    scale: float = 0.5
    method: str = "peft"
    peft_type: str = "LORA"
    shard: str | int | None = None

    def __post_init__(self) -> None:
        if self.method not in ("peft", "harness"):
            raise ValueError(f"method must be 'peft' or 'harness', got {self.method!r}")
        object.__setattr__(self, "lora", _freeze(dict(self.lora)))
        if self.peft_type not in PEFT_TYPES:
            raise ValueError(f"peft_type must be one of {PEFT_TYPES}, got {self.peft_type!r}")

    @property
    def lora_kwargs(self) -> dict[str, Any]:
        """The adapter config's keyword arguments."""
        return _thaw(self.lora)

    @property
    def adapter_spec(self) -> AdapterSpec:
        """The adapter part of the case."""
        return AdapterSpec(self.lora, self.adapter_seed, self.scale, self.peft_type)

    def key(self) -> str:
        """A stable text key (the cache key of the factory fixture).

        ``peft_type`` and ``shard`` appear only when not the defaults, so the keys of LoRA
        cases saved in one file read as before those fields existed.
        """
        data: dict[str, Any] = {
            "model": self.model.key_parts(),
            "lora": self.lora,
            "adapter_seed": self.adapter_seed,
            "scale": self.scale,
            "method": self.method,
        }
        if self.peft_type != "LORA":
            data["peft_type"] = self.peft_type
        if self.shard is not None:
            data["shard"] = self.shard
        return json.dumps(data, sort_keys=True, default=repr)


@dataclass(frozen=True)
class BuiltMerge:
    """Folders of a built merge case."""

    base: Path
    adapter: Path
    merged: Path


def copy_sidecars(source: Path, target: Path) -> None:
    """Copy tokenizer files and ``generation_config.json`` as a merge script should."""
    for name in SIDECAR_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copyfile(source / name, target / name)


def build_case(spec: MergeSpec, folder: Path, *, base: Path | None = None) -> BuiltMerge:
    """Build ``spec`` into ``folder``: ``base/`` (unless given), ``adapter/`` and ``merged/``."""
    folder.mkdir(parents=True, exist_ok=True)
    if base is None:
        base = spec.model.build(folder / "base")
    adapter = spec.adapter_spec.build(base, folder / "adapter")
    merged = build_merge(base, [adapter], folder / "merged", method=spec.method, shard=spec.shard)
    return BuiltMerge(base, adapter, merged)
