"""What the harness knows about model architectures, as data in one place.

Tensor-name suffixes of input embeddings and output heads, the architectures whose projections
are transformers' ``Conv1D`` (weights stored ``(in, out)``), the encoders that pool the first
token, the ``config.json`` keys a merge may change, and the key fragments only an unmerged PEFT
model has. The structure checks, the delta registry and the probes read these tables.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Input-embedding tensor names (suffixes), as transformers names them.
INPUT_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)
#: Output-head tensor names (suffixes).
OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")
#: transformers' ``PretrainedConfig`` default when ``tie_word_embeddings`` is absent.
TIE_DEFAULT = True

#: Architectures whose projections are transformers' ``Conv1D`` (weights stored ``(in, out)``).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
#: Their ``Conv1D`` module names.
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "q_attn", "c_fc"})

#: Fused projections (module name -> the parts of its output rows, in order): attention
#: ``q, k, v`` (``q`` has ``heads x head_dim`` rows, ``k`` and ``v`` ``key/value heads x
#: head_dim``) or the MLP's ``gate, up`` halves.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q", "k", "v"),
    "query_key_value": ("q", "k", "v"),
    "W_pack": ("q", "k", "v"),
    "c_attn": ("q", "k", "v"),
    "gate_up_proj": ("gate", "up"),
}

#: Architectures whose fused expert stacks are stored ``(experts, in, out)`` (transformers'
#: ``use_experts_implementation(is_transposed=True)``); the others store ``(experts, out, in)``.
#: Read only when a stack is square and its shape cannot tell.
TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})

#: Encoders (BERT-like) pool the first token, so padding never confuses their classifiers.
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "distilbert",
        "deberta",
        "deberta-v2",
        "electra",
        "xlm-roberta",
        "albert",
        "camembert",
        "mpnet",
        "modernbert",
    }
)

#: ``config.json`` keys a correct merge may change (everything else must equal the base's).
CONFIG_ALLOWED = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "tie_word_embeddings",
        "vocab_size",
        "use_cache",
        "_attn_implementation_autoset",
        "attn_implementation",
        "architectures",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
    }
)

#: ``config.json`` keys that trainers and exporters add to record who wrote the file, not what
#: the model is: allowed to appear, vanish or change by default (``config_allow`` adds others).
#: ``unsloth_version`` and ``unsloth_fixed`` are written by Unsloth's ``save_pretrained_merged``
#: and its re-published hub models; ``_commit_hash`` by transformers 4 for a config read from the
#: hub cache.
CONFIG_PROVENANCE = frozenset({"unsloth_version", "unsloth_fixed", "_commit_hash"})

#: Key fragments that only an unmerged PEFT model has.
LEFTOVER_MARKERS = (
    "lora_",
    ".base_layer.",
    "modules_to_save",
    "original_module",
    "lora_magnitude",
    "trainable_tokens",
    "token_adapter",
    "hada_",
    "lokr_",
    "ia3_",
)


def find_suffix(names: Iterable[str], suffixes: tuple[str, ...]) -> str | None:
    """The first name (sorted) ending in the first suffix that any name ends in, or None."""
    ordered = sorted(names)
    for suffix in suffixes:
        hits = [n for n in ordered if n == suffix or n.endswith("." + suffix)]
        if hits:
            return hits[0]
    return None


def is_head(name: str) -> bool:
    """Whether ``name`` is an output head (``lm_head.weight`` and kin)."""
    return any(name == s or name.endswith("." + s) for s in OUTPUT_HEADS)
