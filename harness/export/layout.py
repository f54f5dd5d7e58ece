"""Where each tensor of a GGUF export comes from in the merged checkpoint, and how it was changed.

llama.cpp's ``convert_hf_to_gguf.py`` renames every tensor (gguf's ``TensorNameMap``, used here
too) and transforms some on the way. Learned from its source, per architecture:

* Llama-family attention (Llama, Mistral, Mixtral): the rows of ``q_proj`` and ``k_proj``
  (weights and biases) are permuted within each head, from the two-halves rotary layout of
  transformers to llama.cpp's interleaved one (``LlamaModel.permute``).
* Gemma: every ``*norm.weight`` is stored plus one (Gemma's RMSNorm multiplies by ``1 + w``).
* Mixture-of-experts (Mixtral, Qwen2-MoE, Qwen3-MoE): the per-expert matrices of a block are
  stacked into one 3-D tensor per projection (``ffn_gate_exps``...).
* A tied output head is not written (llama.cpp reuses ``token_embd``); Gemma's converter drops
  ``lm_head.weight`` even when a checkpoint stores it.
* Gemma 3: the embedding rows beyond the tokenizer's vocabulary are cut.
* Every tensor that is not float16 or float32 (bfloat16...) is converted to float32 first.

A :class:`Layout` accounts for every tensor on both sides: a GGUF tensor has a :class:`Source`
or is one the converter generates from the config (``rope_freqs``...); a merged tensor feeds a
GGUF tensor or is absent for a named reason. Anything else is reported, by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gguf

from harness.errors import ExportError
from harness.export.reader import ExportFile
from harness.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class Convention:
    """How the converter writes one architecture (one ``general.architecture`` value)."""

    hf_architectures: tuple[str, ...]
    #: Q/K rows permuted to llama.cpp's rotary layout.
    permute_qk: bool = False
    #: ``*norm.weight`` stored plus one.
    norm_offset: bool = False
    #: ``lm_head.weight`` never written (the output reuses the token embedding).
    drops_lm_head: bool = False
    #: Embedding rows cut to the tokenizer's vocabulary.
    trims_vocab: bool = False


#: ``general.architecture`` -> the converter's conventions for it.
CONVENTIONS: dict[str, Convention] = {
    "llama": Convention(
        ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"), permute_qk=True
    ),
    "qwen2": Convention(("Qwen2ForCausalLM",)),
    "qwen2moe": Convention(("Qwen2MoeForCausalLM",)),
    "qwen3": Convention(("Qwen3ForCausalLM",)),
    "qwen3moe": Convention(("Qwen3MoeForCausalLM",)),
    "gemma": Convention(("GemmaForCausalLM",), norm_offset=True, drops_lm_head=True),
    "gemma2": Convention(("Gemma2ForCausalLM",), norm_offset=True, drops_lm_head=True),
    "gemma3": Convention(("Gemma3ForCausalLM",), norm_offset=True, trims_vocab=True),
    "phi3": Convention(("Phi3ForCausalLM",)),
}
#: HF architecture -> ``general.architecture``.
BY_HF: dict[str, str] = {hf: arch for arch, c in CONVENTIONS.items() for hf in c.hf_architectures}
#: Merged tensors the converter skips: buffers, not weights.
SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
#: GGUF tensors the converter computes from the config (rope scaling factors), not the weights.
GENERATED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
#: Mixture-of-experts per-expert tensors: (pattern pieces) -> the converter's stacked name.
EXPERT_FORMS = (
    # Mixtral: model.layers.{b}.block_sparse_moe.experts.{x}.w{1,2,3}.weight
    (".block_sparse_moe.experts.", "layers.{bid}.feed_forward.experts.{what}.weight"),
    # Qwen2-MoE / Qwen3-MoE: model.layers.{b}.mlp.experts.{x}.{gate,up,down}_proj.weight
    (".mlp.experts.", "model.layers.{bid}.mlp.experts.{what}.weight"),
)
_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


@dataclass(frozen=True)
class Source:
    """How the converter made one GGUF tensor from merged tensors."""

    gguf_name: str
    #: Merged tensors, stacked along a new first dimension when there are several (experts).
    parts: tuple[str, ...]
    #: Rows per rotary head of a permuted Q/K projection (None: not permuted).
    head_rows: int | None = None
    #: Added after the float32 conversion (Gemma norms: 1.0).
    offset: float = 0.0
    #: Rows kept (the vocabulary cut to the tokenizer), None: all.
    keep_rows: int | None = None

    def transforms(self) -> list[str]:
        """The converter's transforms, in words (reports)."""
        found = []
        if len(self.parts) > 1:
            found.append(f"{len(self.parts)} experts stacked")
        if self.head_rows is not None:
            found.append("rotary rows permuted")
        if self.offset:
            found.append(f"norm stored +{self.offset:g}")
        if self.keep_rows is not None:
            found.append(f"vocabulary cut to {self.keep_rows} rows")
        return found


@dataclass
class Layout:
    """Every tensor of both sides accounted for, or named."""

    architecture: str
    sources: dict[str, Source] = field(default_factory=dict)
    #: Merged tensor -> why the export does not hold it.
    omitted: dict[str, str] = field(default_factory=dict)
    #: GGUF tensor -> why it has no merged counterpart.
    generated: dict[str, str] = field(default_factory=dict)
    #: Merged tensors with no GGUF name and no known reason.
    unmapped: list[str] = field(default_factory=list)
    #: GGUF tensors with no merged counterpart and no known reason.
    unexplained: list[str] = field(default_factory=list)
    #: Merged tensors that map to a GGUF tensor the export lacks.
    missing: list[str] = field(default_factory=list)
    #: GGUF tensor -> "export (a, b) vs merged (c, d)" for shapes that disagree.
    shapes: dict[str, str] = field(default_factory=dict)


def hf_architecture(config: dict[str, Any] | None) -> str:
    """The merged model's ``architectures[0]`` (empty when the config has none)."""
    names = (config or {}).get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    return ""


def _param(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in config:
            return config[key]
    return None


def identify(export: ExportFile, merged: Checkpoint) -> Convention:
    """The converter's conventions for this export; ExportError when it is another model."""
    config = merged.config or {}
    hf_arch = hf_architecture(config)
    arch = export.architecture
    expected = BY_HF.get(hf_arch)
    if expected is None:
        known = ", ".join(sorted(BY_HF))
        raise ExportError(
            f"the merged model's architecture {hf_arch or '(none in config.json)'} is not one the"
            f" export checks know how llama.cpp converts (supported: {known})"
        )
    if arch != expected:
        raise ExportError(
            f"not an export of this model: the GGUF holds a {arch!r} model, the merged model is"
            f" {hf_arch} (converted as {expected!r})"
        )
    for key, names in (
        (gguf.Keys.LLM.BLOCK_COUNT, ("num_hidden_layers", "n_layer")),
        (gguf.Keys.LLM.EMBEDDING_LENGTH, ("hidden_size", "n_embd")),
    ):
        found, want = export.get(key), _param(config, *names)
        if found is not None and want is not None and found != want:
            raise ExportError(
                f"not an export of this model: {export.key(key)} is {found} in the GGUF,"
                f" the merged model's {names[0]} is {want}"
            )
    return CONVENTIONS[arch]


def _expert_groups(names: list[str]) -> tuple[dict[str, list[tuple[int, str]]], list[str]]:
    """Per-expert tensors grouped by their stacked name; the other names unchanged."""
    groups: dict[str, list[tuple[int, str]]] = {}
    rest: list[str] = []
    for name in names:
        for marker, stacked in EXPERT_FORMS:
            head, found, tail = name.partition(marker)
            expert, _, what = tail.partition(".")
            layer = head.rsplit(".", 1)[-1]
            if found and expert.isdigit() and layer.isdigit() and what.endswith(".weight"):
                key = stacked.format(bid=layer, what=what.removesuffix(".weight"))
                groups.setdefault(key, []).append((int(expert), name))
                break
        else:
            rest.append(name)
    return groups, rest


def plan(export: ExportFile, merged: Checkpoint) -> Layout:
    """Map every GGUF tensor to its merged source; ExportError when the export is another model."""
    convention = identify(export, merged)
    config = merged.config or {}
    arch = export.architecture
    blocks = int(_param(config, "num_hidden_layers", "n_layer") or 0)
    names = gguf.get_tensor_name_map(_ARCH_BY_NAME[arch], blocks)
    heads = _param(config, "num_attention_heads", "n_head")
    kv_heads = _param(config, "num_key_value_heads") or heads
    tied = bool(config.get("tie_word_embeddings", False))
    layout = Layout(arch)
    groups, single = _expert_groups(sorted(merged.tensors))
    candidates: list[tuple[str, tuple[str, ...]]] = [(n, (n,)) for n in single]
    for stacked, members in sorted(groups.items()):
        members.sort()
        candidates.append((stacked, tuple(name for _, name in members)))
    for key, parts in candidates:
        if key.endswith(SKIPPED_SUFFIXES):
            layout.omitted[key] = "a buffer, not a weight: the converter skips it"
            continue
        if key == "lm_head.weight" and convention.drops_lm_head:
            layout.omitted[key] = "the converter drops it: llama.cpp reuses token_embd"
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            layout.unmapped.extend(parts)
            continue
        if target not in export.tensors:
            if key == "lm_head.weight" and tied:
                layout.omitted[key] = "tied output head: llama.cpp reuses token_embd"
            else:
                layout.missing.extend(parts)
            continue
        layout.sources[target] = _source(
            target, key, parts, convention, heads, kv_heads, export, merged
        )
    for name in export.tensors:
        if name in layout.sources:
            continue
        if name in GENERATED:
            layout.generated[name] = "computed by the converter from the rope scaling config"
        else:
            layout.unexplained.append(name)
    for name, source in layout.sources.items():
        want = expected_shape(source, merged)
        found = export.tensors[name].shape
        if want != found:
            layout.shapes[name] = f"export {found} vs merged {want}"
    return layout


def _source(
    target: str,
    key: str,
    parts: tuple[str, ...],
    convention: Convention,
    heads: Any,
    kv_heads: Any,
    export: ExportFile,
    merged: Checkpoint,
) -> Source:
    rows_per_head: int | None = None
    count = None
    if convention.permute_qk:
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            count = heads
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            count = kv_heads
    if isinstance(count, int) and count > 0:
        rows = merged.tensors[parts[0]].shape[0]
        if rows % (2 * count) == 0:
            rows_per_head = rows // count
    offset = 1.0 if convention.norm_offset and key.endswith("norm.weight") else 0.0
    keep: int | None = None
    if convention.trims_vocab and key.endswith("embed_tokens.weight"):
        # The converter keeps the tokenizer's rows (its count differs by tokenizer format):
        # the exported rows must be the merged tensor's first ones.
        keep = export.tensors[target].shape[0]
    return Source(target, parts, rows_per_head, offset, keep)


def expected_shape(source: Source, merged: Checkpoint) -> tuple[int, ...]:
    """The shape the converter writes for ``source`` (numpy order)."""
    shape = merged.tensors[source.parts[0]].shape
    if len(source.parts) > 1:
        shape = (len(source.parts), *shape)
    if source.keep_rows is not None and shape and source.keep_rows < shape[0]:
        shape = (source.keep_rows, *shape[1:])
    return tuple(shape)
