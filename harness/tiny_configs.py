"""Tiny transformers configs per architecture and their module names, as data.

A 2-layer, 32-wide model of each architecture (the causal LMs, then the encoders), with the
module names that LoRA's ``target_modules`` and patterns match. :mod:`harness.tiny` builds models,
adapters and merges from these (and re-exports every name here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The shape every tiny decoder shares: 2 layers, 32 wide, 4 query and 2 key/value heads, a
#: 128-token vocabulary. Each architecture adds only what its config needs beyond it.
_SHAPE: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)

#: Tiny configs per architecture: (transformers config class name, keyword arguments).
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_SHAPE, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(_SHAPE, sliding_window=None, tie_word_embeddings=False)),
    # Qwen2 ties the output head to the input embedding.
    "qwen2": ("Qwen2Config", dict(_SHAPE, tie_word_embeddings=True)),
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
    "gemma": ("GemmaConfig", dict(_SHAPE, head_dim=8)),
    "phi3": (
        "Phi3Config",
        dict(_SHAPE, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
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

_MOE = dict(_SHAPE, intermediate_size=24, head_dim=8, tie_word_embeddings=False,
            num_experts_per_tok=2)
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
#: Stored dtypes of the tiny models, and torch's name of each.
TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
DTYPES = tuple(TORCH_DTYPES)
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
