"""The tokenizer and chat template an export carries, against the merged folder's own.

The expected GGUF vocabulary is derived from the merged folder the way the converter derives it
(rules learned from ``convert_hf_to_gguf.py``; the code is the harness's):

* SentencePiece (``tokenizer.ggml.model = llama``, a ``tokenizer.model`` in the folder): every
  piece with its score and type (unknown, control, unused, byte, normal), then the added tokens
  of ``added_tokens.json`` and ``tokenizer_config.json`` (user-defined, or control when special),
  padded with ``[PAD<i>]`` up to the config's ``vocab_size``;
* byte-level BPE (``gpt2``): ``tokenizer.json``'s vocabulary and added tokens, padded the same;
  or gguf's own ``LlamaHfVocab`` for a Llama tokenizer saved without ``tokenizer.model``.

Merges, special token ids, the add-BOS/EOS flags and the chat template come from gguf's own
``SpecialVocab``, exactly as the converter reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from harness.errors import CheckpointError, ExportError
from harness.export.reader import ExportFile
from harness.io.files import check_regular_file, read_json

Tok = gguf.Keys.Tokenizer
#: Special token kind (SpecialVocab's name) -> GGUF key.
SPECIAL_IDS = {
    "bos": Tok.BOS_ID,
    "eos": Tok.EOS_ID,
    "unk": Tok.UNK_ID,
    "sep": Tok.SEP_ID,
    "pad": Tok.PAD_ID,
    "mask": Tok.MASK_ID,
    "eot": Tok.EOT_ID,
    "eom": Tok.EOM_ID,
}
ADD_FLAGS = {"bos": Tok.ADD_BOS, "eos": Tok.ADD_EOS, "sep": Tok.ADD_SEP}
#: Kinds compared even when only the export declares them; the others (end-of-turn...) some
#: converter classes set from their own tables (Gemma's), so they are compared only when the
#: merged folder declares them too.
CORE_SPECIALS = frozenset({"bos", "eos", "unk", "sep", "pad", "mask"})
#: sentencepiece model files larger than this are refused before they are parsed.
MAX_SPM_BYTES = 64 * 1024 * 1024
_SPACE = "\u2581"


@dataclass
class Vocabulary:
    """A tokenizer as GGUF stores it."""

    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)
    add: dict[str, bool] = field(default_factory=dict)


def looks_special(token: str) -> bool:
    """Added tokens the converter marks as control even when not flagged special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _padded(size: int) -> tuple[list[str], list[int]]:
    return [f"[PAD{i}]" for i in range(size)], [int(gguf.TokenType.UNUSED)] * size


def _added_type(content: str, special: bool) -> tuple[str, int]:
    if special or looks_special(content):
        return content, int(gguf.TokenType.CONTROL)
    # The converter stores user-defined tokens with their spaces pre-normalized.
    return content.replace(_SPACE, " "), int(gguf.TokenType.USER_DEFINED)


def _sentencepiece(folder: Path, vocab_size: int | None, phi3: bool = False) -> Vocabulary:
    from sentencepiece import SentencePieceProcessor

    path = folder / "tokenizer.model"
    try:
        size = check_regular_file(path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    if size > MAX_SPM_BYTES:
        raise ExportError(f"{path}: {size:,} bytes, over the {MAX_SPM_BYTES:,} byte limit")
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise ExportError(f"{path}: not a sentencepiece model: {exc}") from None
    pieces = processor.vocab_size()
    total = vocab_size or pieces
    tokens, types = _padded(total)
    scores = [-10000.0] * total
    Kind = gguf.TokenType
    for index in range(min(pieces, total)):
        tokens[index] = processor.IdToPiece(index)
        scores[index] = float(processor.GetScore(index))
        kind = Kind.NORMAL
        if processor.IsUnknown(index):
            kind = Kind.UNKNOWN
        elif processor.IsControl(index):
            kind = Kind.CONTROL
        elif processor.IsUnused(index):
            kind = Kind.UNUSED
        elif processor.IsByte(index):
            kind = Kind.BYTE
        types[index] = int(kind)
    listed = _json(folder / "added_tokens.json")
    if isinstance(listed, dict):
        for content, index in listed.items():
            if isinstance(index, int) and 0 <= index < total:
                tokens[index], types[index], scores[index] = (
                    content, int(Kind.USER_DEFINED), -1000.0
                )
    config = _json(folder / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    added: list[tuple[int, Any, bool]] = []
    if isinstance(decoder, dict):
        added += [(int(k), e.get("content"), bool(e.get("special"))) for k, e in decoder.items()
                  if str(k).isdigit() and isinstance(e, dict)]
    if phi3:
        # Phi-3's converter also takes tokenizer.json's added tokens, as they are.
        data = _json(folder / "tokenizer.json")
        entries = data.get("added_tokens") if isinstance(data, dict) else None
        added += [(e["id"], e.get("content"), bool(e.get("special"))) for e in entries or []
                  if isinstance(e, dict) and isinstance(e.get("id"), int)]
    for index, content, special in added:
        if not (0 <= index < total and isinstance(content, str)):
            continue
        if phi3:
            kind = Kind.CONTROL if special else Kind.USER_DEFINED
            tokens[index], types[index] = content, int(kind)
        else:
            tokens[index], types[index] = _added_type(content, special)
        scores[index] = -1000.0
    return Vocabulary("llama", tokens, types, scores)


def _byte_level(folder: Path, vocab_size: int | None) -> Vocabulary:
    data = _json(folder / "tokenizer.json")
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict):
        raise ExportError(f"{folder}: tokenizer.json has no model.vocab: cannot derive the tokens")
    assert isinstance(data, dict)
    by_id: dict[int, tuple[str, int]] = {
        index: (token, int(gguf.TokenType.NORMAL))
        for token, index in vocab.items()
        if isinstance(index, int)
    }
    for entry in data.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), int):
            content = str(entry.get("content", ""))
            by_id[entry["id"]] = _added_type(content, bool(entry.get("special")))
    total = vocab_size or (max(by_id) + 1 if by_id else 0)
    tokens, types = _padded(total)
    for index, (token, kind) in by_id.items():
        if 0 <= index < total:
            tokens[index], types[index] = token, kind
    return Vocabulary("gpt2", tokens, types)


def _llama_hf(folder: Path) -> Vocabulary:
    vocab = gguf.LlamaHfVocab(folder)
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
        scores.append(float(score))
        types.append(int(kind))
    return Vocabulary("llama", tokens, types, scores)


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None


def expected_vocabulary(
    folder: Path, config: dict[str, Any], model: str, architecture: str = ""
) -> Vocabulary:
    """The vocabulary the converter writes for ``folder`` with tokenizer model ``model``.

    ``architecture`` (``general.architecture``) selects the converter class's own rules where
    they differ (Phi-3 reads the added tokens of tokenizer.json too).
    """
    vocab_size = config.get("vocab_size")
    size = vocab_size if isinstance(vocab_size, int) and vocab_size > 0 else None
    if model == "llama" and (folder / "tokenizer.model").is_file():
        found = _sentencepiece(folder, size, phi3=architecture == "phi3")
    elif model == "llama" and (folder / "tokenizer.json").is_file():
        found = _llama_hf(folder)
    elif (folder / "tokenizer.json").is_file():
        found = _byte_level(folder, size)
    else:
        raise ExportError(f"{folder}: no tokenizer.model or tokenizer.json to compare with")
    special = gguf.SpecialVocab(
        folder, load_merges=found.model == "gpt2", n_vocab=len(found.tokens)
    )
    found.merges = list(special.merges)
    found.special = {k: v for k, v in special.special_token_ids.items() if k in SPECIAL_IDS}
    found.add = {k: v for k, v in special.add_special_token.items() if k in ADD_FLAGS}
    return found


def exported_vocabulary(export: ExportFile) -> Vocabulary:
    """The vocabulary stored in the export."""
    fields = export.fields
    tokens = fields.get(Tok.LIST)
    if not isinstance(tokens, list):
        raise ExportError(f"{export.label}: no tokenizer.ggml.tokens: the export has no tokenizer")
    scores = fields.get(Tok.SCORES)
    return Vocabulary(
        str(fields.get(Tok.MODEL, "")),
        [str(t) for t in tokens],
        [int(t) for t in fields.get(Tok.TOKEN_TYPE) or []],
        [float(s) for s in scores] if isinstance(scores, list) else None,
        [str(m) for m in fields.get(Tok.MERGES) or []],
        {k: int(fields[key]) for k, key in SPECIAL_IDS.items() if key in fields},
        {k: bool(fields[key]) for k, key in ADD_FLAGS.items() if key in fields},
    )


def _first_difference(name: str, expected: list[Any], found: list[Any]) -> str | None:
    if expected == found:
        return None
    if len(expected) != len(found):
        return f"{name}: {len(expected)} in the merged tokenizer, {len(found)} in the export"
    differing = [i for i, (a, b) in enumerate(zip(expected, found, strict=True)) if a != b]
    first = differing[0]
    return (
        f"{name}: {len(differing)} of {len(expected)} differ, first at {first}: merged"
        f" {expected[first]!r}, export {found[first]!r}"
    )


def compare_vocabularies(expected: Vocabulary, found: Vocabulary) -> list[str]:
    """One line per part of the tokenizer that differs (empty: the same tokenizer)."""
    lines: list[str] = []
    if expected.model != found.model:
        lines.append(f"tokenizer model: merged {expected.model}, export {found.model or '(none)'}")
        return lines
    for name, want, have in (
        ("tokens", expected.tokens, found.tokens),
        ("token types", expected.types, found.types),
        ("merges", expected.merges, found.merges),
    ):
        line = _first_difference(name, want, have)
        if line:
            lines.append(line)
    if expected.scores is not None and found.scores is not None:
        import numpy as np

        want_scores = [float(np.float32(s)) for s in expected.scores]
        line = _first_difference("scores", want_scores, found.scores)
        if line:
            lines.append(line)
    for kind in sorted(set(expected.special) | (set(found.special) & CORE_SPECIALS)):
        want_id, have_id = expected.special.get(kind), found.special.get(kind)
        if want_id != have_id:
            lines.append(f"{kind} token id: merged {want_id}, export {have_id}")
    for kind in sorted(set(expected.add) & set(found.add)):
        if expected.add[kind] != found.add[kind]:
            lines.append(
                f"add_{kind}_token: merged {expected.add[kind]}, export {found.add[kind]}"
            )
    return lines


def expected_templates(folder: Path) -> dict[str, str]:
    """The chat templates the converter writes for ``folder`` (name -> template)."""
    template = gguf.SpecialVocab(folder).chat_template
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    return {
        str(entry.get("name", "")): str(entry.get("template"))
        for entry in template
        if entry.get("template") is not None
    }


def exported_templates(export: ExportFile) -> dict[str, str]:
    """The chat templates stored in the export (name -> template)."""
    found: dict[str, str] = {}
    default = export.fields.get(Tok.CHAT_TEMPLATE)
    if isinstance(default, str):
        found["default"] = default
    for name in export.fields.get(Tok.CHAT_TEMPLATES) or []:
        value = export.fields.get(Tok.CHAT_TEMPLATE_N.format(name=name))
        if isinstance(value, str):
            found[str(name)] = value
    return found
