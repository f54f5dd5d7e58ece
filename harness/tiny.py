"""Tiny real models, adapters and merges on disk, for fixtures, tests and the demo.

Everything is built from configs (no download): a 2-layer, 32-wide model takes milliseconds.
Adapters get non-zero random ``lora_B`` (peft initialises it to zero, which would make every
merge a no-op), so each merge really changes the weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Tiny configs per architecture: (transformers config class name, keyword arguments).
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
             tie_word_embeddings=False),
    ),
    "mistral": (
        "MistralConfig",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
             sliding_window=None, tie_word_embeddings=False),
    ),
    # Qwen2 ties the output head to the input embedding.
    "qwen2": (
        "Qwen2Config",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
             tie_word_embeddings=True),
    ),
    # GPT-2 uses Conv1D (weights stored (in, out)): LoRA needs fan_in_fan_out=True.
    "gpt2": (
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=128,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=True),
    ),
    "gemma": (
        "GemmaConfig",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=128),
    ),
    "phi3": (
        "Phi3Config",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
             pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False),
    ),
}

_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def model_config(arch: str = "llama", **overrides: Any) -> Any:
    """A transformers config for a tiny model of ``arch``."""
    import transformers

    class_name, kwargs = ARCHITECTURES[arch]
    return getattr(transformers, class_name)(**{**kwargs, **overrides})


def build_base(
    folder: Path,
    arch: str = "llama",
    dtype: str = "F32",
    seed: int = 0,
    max_shard_size: str | int | None = None,
    **overrides: Any,
) -> Path:
    """Save a randomly initialised tiny causal LM of ``arch`` in ``dtype`` to ``folder``."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, **overrides))
    model = model.to(getattr(torch, _TORCH_DTYPES[dtype]))
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    return folder


def build_adapter(
    base: Path, folder: Path, seed: int = 1, scale: float = 0.5, **lora: Any
) -> Path:
    """Save a LoRA adapter for ``base`` with random non-zero weights; ``lora`` -> LoraConfig."""
    _offline()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora})
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(param + noise.to(param.dtype))
    peft_model.save_pretrained(folder)
    _set_base_path(folder, base)
    return folder


def _set_base_path(folder: Path, base: Path) -> None:
    import json

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
    _offline()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    for key, value in (config_overrides or {}).items():
        setattr(merged.config, key, value)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    merged.save_pretrained(folder, **kwargs)
    return folder
