"""Tiny real models, adapters and merges on disk, for fixtures, tests and the demo.

Everything is built from configs (no download): a 2-layer, 32-wide model takes milliseconds.
Adapters get non-zero random ``lora_B`` (peft initialises it to zero, which would make every
merge a no-op), so each merge really changes the weights.

:class:`ModelSpec` and :class:`MergeSpec` name a tiny model and a whole merge case as plain,
hashable data: the public hypothesis strategies generate them and the ``tiny_merge_factory``
fixture builds (and caches) them; :func:`build_case` builds one into a folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.checks.sidecars import SIDECAR_FILES
from harness.evals.tokenizer import build_char_tokenizer
from harness.io.models import auto_class, quiet, task_of
from harness.merger import merge_checkpoint

#: Tiny configs per architecture: (transformers config class name, keyword arguments).
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=128,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2 ties the output head to the input embedding.
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        ),
    ),
    # GPT-2 uses Conv1D (weights stored (in, out)): LoRA needs fan_in_fan_out=True.
    "gpt2": (
        "GPT2Config",
        dict(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            vocab_size=128,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        ),
    ),
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=128,
            max_position_embeddings=128,
        ),
    ),
    "phi3": (
        "Phi3Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
    ),
}

#: Encoder-only architectures (sequence classification and feature extraction, not causal LM).
ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": (
        "BertConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=128,
            pad_token_id=0,
        ),
    ),
}

_MOE = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=128,
            tie_word_embeddings=False, num_experts_per_tok=2)
#: Mixture-of-experts decoders (4 experts): transformers 5 fuses their experts into 3-d
#: parameters that LoRA adapts through ``target_parameters`` (:data:`MOE_PARAMETERS`). Not drawn
#: by the default strategies.
MOE: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(_MOE, moe_intermediate_size=24, num_experts=4)),
    "mixtral": ("MixtralConfig", dict(_MOE, num_local_experts=4)),
    "gpt_oss": ("GptOssConfig", dict(_MOE, num_local_experts=4, layer_types=[
        "sliding_attention", "full_attention"], rope_parameters={"rope_type": "default",
                                                                 "rope_theta": 150000.0})),
}
#: Each MoE architecture's ``target_parameters``: the two expert stacks, then the router.
MOE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "qwen3_moe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"),
    "mixtral": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"),
    "gpt_oss": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight"),
}


@dataclass(frozen=True)
class Modules:
    """Module names of an architecture, as LoRA's ``target_modules`` and patterns match them."""

    #: Short names of the linear (or GPT-2 ``Conv1D``) layers inside each block.
    linear: tuple[str, ...]
    #: The input embedding module (embedding LoRA targets it).
    embedding: str
    #: The output head of a causal LM.
    head: str
    #: Whether the head shares the input embedding's weight.
    tied: bool
    #: Whether the layers are GPT-2 ``Conv1D`` (``fan_in_fan_out=True``).
    conv1d: bool = False
    #: The classification head of ``*ForSequenceClassification``.
    classifier: str = "score"
    #: The config key of the layer count.
    layers_key: str = "num_hidden_layers"


_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES: dict[str, Modules] = {
    "llama": Modules(_DECODER, "embed_tokens", "lm_head", tied=False),
    "mistral": Modules(_DECODER, "embed_tokens", "lm_head", tied=False),
    "qwen2": Modules(_DECODER, "embed_tokens", "lm_head", tied=True),
    "gemma": Modules(_DECODER, "embed_tokens", "lm_head", tied=True),
    "phi3": Modules(
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "embed_tokens", "lm_head", tied=False
    ),
    "gpt2": Modules(
        ("c_attn", "c_proj", "c_fc"), "wte", "lm_head", tied=True, conv1d=True, layers_key="n_layer"
    ),
    "bert": Modules(
        ("query", "key", "value", "dense"),
        "word_embeddings",
        "classifier",
        tied=False,
        classifier="classifier",
    ),
    **{arch: Modules(_DECODER[:4], "embed_tokens", "lm_head", tied=False) for arch in MOE},
}

#: Tasks the tiny builders support (peft ``task_type`` names).
TASKS = ("CAUSAL_LM", "SEQ_CLS")
_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
DTYPES = tuple(_TORCH_DTYPES)
#: Labels of the tiny classification heads.
NUM_LABELS = 3


def model_config(arch: str = "llama", **overrides: Any) -> Any:
    """A transformers config for a tiny model of ``arch``."""
    import transformers

    table = ARCHITECTURES.get(arch) or ENCODERS.get(arch) or MOE.get(arch)
    if table is None:
        raise KeyError(
            f"unknown tiny architecture {arch!r} (known: {', '.join(all_architectures())})"
        )
    class_name, kwargs = table
    return getattr(transformers, class_name)(**{**kwargs, **overrides})


def all_architectures() -> tuple[str, ...]:
    """Every tiny architecture: the causal LMs, the encoders, then the MoE decoders."""
    return (*ARCHITECTURES, *ENCODERS, *MOE)


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
    model = model.to(getattr(torch, _TORCH_DTYPES[dtype]))
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


def build_adapter(base: Path, folder: Path, seed: int = 1, scale: float = 0.5, **lora: Any) -> Path:
    """Save a LoRA adapter for ``base`` with random non-zero weights; ``lora`` -> LoraConfig.

    Every trainable tensor (``lora_A``/``lora_B``, DoRA magnitudes, embedding LoRA, copies of
    ``modules_to_save``) gets Gaussian noise of standard deviation ``scale`` added.
    """
    import torch
    from peft import LoraConfig, get_peft_model


    task = _task_of(base, lora)
    if task == "SEQ_CLS":
        lora = {"task_type": "SEQ_CLS", **lora}
    model = _load_base(base, task, torch.float32)
    with quiet():
        config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora})
        peft_model = get_peft_model(model, config)
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
    adapter: Path,
    folder: Path,
    max_shard_size: str | int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Merge with peft's own ``merge_and_unload`` and save, in the base's dtype."""
    from peft import PeftModel


    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    task = _task_of(base, adapter_config)
    model = _load_base(base, task, "auto")
    with quiet():
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    for key, value in (config_overrides or {}).items():
        setattr(merged.config, key, value)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    with quiet():
        merged.save_pretrained(folder, **kwargs)
    return folder


# ---- merge cases as data ----------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """Lists become tuples and dicts sorted item tuples, so a spec hashes and prints stably."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw_lora(items: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """LoraConfig keyword arguments back from their frozen form."""
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
    """A tiny model to build: architecture, stored dtype, task, seed and config overrides."""

    arch: str = "llama"
    dtype: str = "F32"
    task: str = "CAUSAL_LM"
    seed: int = 0
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in all_architectures():
            raise ValueError(f"unknown tiny architecture {self.arch!r}")
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        object.__setattr__(self, "overrides", _freeze(dict(self.overrides)))

    @property
    def modules(self) -> Modules:
        """The architecture's module names."""
        return MODULES[self.arch]

    def build(self, folder: Path, *, tokenizer: bool = True) -> Path:
        """Save this model (and a tokenizer) to ``folder``."""
        return build_base(
            folder,
            self.arch,
            self.dtype,
            self.seed,
            task=self.task,
            tokenizer=tokenizer,
            **dict(self.overrides),
        )


@dataclass(frozen=True)
class MergeSpec:
    """A whole merge case: a tiny model, a LoRA config, the adapter's noise, and who merges.

    ``lora`` holds ``LoraConfig`` keyword arguments (frozen to tuples; :attr:`lora_kwargs` gives
    them back as a dict). ``method`` is ``peft`` (``merge_and_unload``) or ``harness`` (the
    streaming merger).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    lora: tuple[tuple[str, Any], ...] = ()
    adapter_seed: int = 1
    scale: float = 0.5
    method: str = "peft"

    def __post_init__(self) -> None:
        if self.method not in ("peft", "harness"):
            raise ValueError(f"method must be 'peft' or 'harness', got {self.method!r}")
        object.__setattr__(self, "lora", _freeze(dict(self.lora)))

    @property
    def lora_kwargs(self) -> dict[str, Any]:
        """The ``LoraConfig`` keyword arguments."""
        return _thaw_lora(self.lora)

    def key(self) -> str:
        """A stable text key (the cache key of the factory fixture)."""
        return json.dumps(
            {
                "model": [
                    self.model.arch,
                    self.model.dtype,
                    self.model.task,
                    self.model.seed,
                    self.model.overrides,
                ],
                "lora": self.lora,
                "adapter_seed": self.adapter_seed,
                "scale": self.scale,
                "method": self.method,
            },
            sort_keys=True,
            default=repr,
        )


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
    adapter = build_adapter(
        base, folder / "adapter", seed=spec.adapter_seed, scale=spec.scale, **spec.lora_kwargs
    )
    merged = folder / "merged"
    if spec.method == "harness":

        merge_checkpoint(base, adapter, merged, progress=False)
    else:
        peft_merge(base, adapter, merged)
        copy_sidecars(base, merged)
    return BuiltMerge(base, adapter, merged)
