"""Tokenizers for evaluation: find the model's own, or build a tiny character tokenizer.

Real checkpoints ship their tokenizer; the tiny test models do not. For them the harness builds a
character-level tokenizer (one token per printable ASCII character, newline and space) padded
with unused tokens to *exactly* the model's ``vocab_size``: lm-eval resizes a model's embeddings
when the tokenizer's length differs from ``vocab_size`` before applying a PEFT adapter, which
would silently change the adapter model's logits and break the merged-vs-adapter comparison.

A tokenizer folder comes from the pull request like the weights, so what is built or loaded is
bounded by what the model holds before anything is allocated: the built-in tokenizer's size by
the rows of the merged model's input embedding (and :data:`MAX_CHAR_VOCAB`), a shipped
tokenizer's ids by the same rows, its files by :data:`MAX_TOKENIZER_BYTES`, and the folder
must pass :func:`~harness.io.files.check_folder` before a tokenizer library opens it.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.architectures import INPUT_EMBEDDINGS, find_suffix
from harness.errors import CheckpointError, HarnessError
from harness.io.code import custom_code
from harness.io.files import MAX_JSON_BYTES, check_folder, exists, read_json
from harness.run.config import BUILTIN_TOKENIZER
from harness.run.context import Key
from harness.stream.hashing import hash_file

if TYPE_CHECKING:
    from harness.run.context import Context

SCRATCH: Key[Path] = Key("eval:scratch")
TOKENIZER: Key[tuple[Path, str]] = Key("eval:tokenizer")
RESIZE: Key[str | None] = Key("eval:resize")

#: Files whose presence marks a folder as holding a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
#: Largest vocabulary the built-in character tokenizer is built with (a config may claim more).
MAX_CHAR_VOCAB = 1 << 20
#: Largest tokenizer file handed to a tokenizer library (the JSON input limit).
MAX_TOKENIZER_BYTES = MAX_JSON_BYTES
CHARACTERS = ("\n", " ", *(chr(c) for c in range(33, 127)))


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def build_char_tokenizer(folder: Path, vocab_size: int = 128, model_max_length: int = 128) -> Path:
    """Save a character-level fast tokenizer of exactly ``vocab_size`` tokens to ``folder``.

    Ids: 0 ``[PAD]``, 1 ``[BOS]``, 2 ``[EOS]``, 3 ``[UNK]`` (matching the tiny configs' special
    ids), then newline, space and ``!``..``~``, then ``[unused<i>]`` up to ``vocab_size``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = [*SPECIALS, *CHARACTERS]
    if vocab_size < len(base):
        raise ValueError(f"vocab_size must be >= {len(base)} for the character tokenizer")
    tokens = base + [f"[unused{i}]" for i in range(vocab_size - len(base))]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    # One token per character: split before every character, newlines included.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        model_max_length=model_max_length,
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def model_limits(model_folder: Path) -> tuple[int, int]:
    """``(vocab_size, max_position_embeddings)`` from a model's ``config.json``."""
    path = model_folder / "config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    inner = config.get("text_config")
    text: dict[str, Any] = inner if isinstance(inner, dict) else config
    try:
        vocab = int(text.get("vocab_size") or 0)
        positions = int(text.get("max_position_embeddings") or text.get("n_positions") or 2048)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(
            f"{path}: vocab_size and max_position_embeddings must be integers"
        ) from None
    return vocab, positions


def embedding_rows(ctx: Context) -> int | None:
    """Rows of the merged model's input embedding (from its header), or None when not found."""
    merged = ctx.merged()
    name = find_suffix(merged.tensors, INPUT_EMBEDDINGS)
    shape = merged.tensors[name].shape if name is not None else ()
    return shape[0] if shape else None


def char_vocab(path: Path, vocab: int, rows: int | None) -> int:
    """The built-in tokenizer's size: the config's ``vocab_size``, if the model justifies it."""
    if rows is not None and vocab > rows:
        raise HarnessError(
            f"{path}: vocab_size {vocab} but the input embedding holds {rows} rows; refusing to"
            " build a builtin:chars tokenizer larger than the model"
        )
    if vocab > MAX_CHAR_VOCAB:
        raise HarnessError(
            f"{path}: vocab_size {vocab} exceeds the builtin:chars limit of {MAX_CHAR_VOCAB}"
        )
    return vocab


def _ids(path: Path) -> list[int]:
    """Every token id a tokenizer file declares (what a tokenizer library would size by)."""
    data = read_json(path, limit=MAX_TOKENIZER_BYTES)
    ids: list[Any] = []
    if path.name == "tokenizer.json" and isinstance(data, dict):
        model = data.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            ids += vocab.values()
        elif isinstance(vocab, list):  # unigram: a list of [piece, score]
            ids.append(len(vocab) - 1)
        added = data.get("added_tokens")
        if isinstance(added, list):
            ids += [t.get("id") for t in added if isinstance(t, dict)]
    elif path.name == "added_tokens.json" and isinstance(data, dict):
        ids += data.values()
    elif path.name == "tokenizer_config.json" and isinstance(data, dict):
        decoder = data.get("added_tokens_decoder")
        ids += decoder.keys() if isinstance(decoder, dict) else []
    found = []
    for value in ids:
        try:
            found.append(int(value))
        except (TypeError, ValueError, OverflowError):
            continue
    return found


def check_tokenizer(folder: Path, rows: int | None, trust_remote_code: bool = False) -> None:
    """Refuse a tokenizer folder before a library loads it (see the module docs).

    Every file must be a bounded regular file inside the folder, no configuration may name
    custom code unless allowed, and no declared token id may reach past the ``rows`` of the
    model's input embedding: a larger tokenizer makes lm-eval resize the embedding to its
    length, an allocation the weights never justified.
    """
    check_folder(folder)
    found = custom_code(folder)
    if found and not trust_remote_code:
        raise HarnessError(
            f"{found[0].file}: {' and '.join(found[0].keys)} asks for custom code; refusing to"
            " load the tokenizer (pass --merge-trust-remote-code to allow)"
        )
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        path = folder / name
        if not exists(path):
            continue
        ids = _ids(path)
        largest = max(ids, default=-1)
        if rows is not None and largest >= rows:
            raise HarnessError(
                f"{path}: declares token id {largest} but the model's input embedding holds"
                f" {rows} rows; refusing a tokenizer larger than the model"
            )
    for pattern in _TOKENIZER_GLOBS:
        for path in folder.glob(pattern):
            size = path.stat().st_size
            if size > MAX_TOKENIZER_BYTES:
                raise HarnessError(
                    f"{path}: {size} bytes is too large for a tokenizer file (limit"
                    f" {MAX_TOKENIZER_BYTES})"
                )


# ----------------------------------------------------------------------------- resolution

#: Files of a tokenizer folder that change how text becomes ids (for fingerprints).
_TOKENIZER_GLOBS = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",
    "*.tiktoken",
)


def scratch_dir(ctx: Context) -> Path:
    """A private temporary folder for this process's evaluation files (removed at exit)."""

    def create() -> Path:
        folder = Path(tempfile.mkdtemp(prefix="merge-harness-eval-"))
        atexit.register(shutil.rmtree, folder, True)
        return folder

    return ctx.memo(SCRATCH, create)


def tokenizer_fingerprint(folder: Path) -> str:
    """sha256 over the tokenizer files of ``folder`` (not its weights)."""
    outer = hashlib.sha256()
    files = sorted({p for g in _TOKENIZER_GLOBS for p in folder.glob(g) if p.is_file()})
    for path in files:
        outer.update(f"{path.name}\t{hash_file(path)}\n".encode())
    return outer.hexdigest()


def resolve(ctx: Context) -> tuple[Path, str]:
    """The tokenizer folder for evaluation and a fingerprint of it (cached).

    In order: the gate configuration's ``tokenizer`` (a folder, or ``builtin:chars`` to build a
    character tokenizer sized to the merged model's vocabulary in a private temporary folder),
    else the merged model's folder, the base's, the adapter's, whichever holds tokenizer files.
    """

    def compute() -> tuple[Path, str]:
        options = ctx.settings
        chosen = options.config.tokenizer
        if chosen == BUILTIN_TOKENIZER:
            if options.merged is None:
                raise HarnessError("builtin:chars tokenizer: no merged model")
            vocab, positions = model_limits(options.merged)
            vocab = char_vocab(options.merged / "config.json", vocab, embedding_rows(ctx))
            folder = build_char_tokenizer(scratch_dir(ctx) / "tokenizer", vocab, positions)
            return folder, f"{BUILTIN_TOKENIZER}:{vocab}"
        if chosen is not None:
            folder = Path(chosen)
            if not has_tokenizer(folder):
                raise HarnessError(f"tokenizer {folder}: no tokenizer files in this folder")
            check_tokenizer(folder, embedding_rows(ctx), options.trust_remote_code)
            return folder, tokenizer_fingerprint(folder)
        for candidate in (options.merged, options.base, options.adapter):
            if candidate is not None and candidate.is_dir() and has_tokenizer(candidate):
                check_tokenizer(candidate, embedding_rows(ctx), options.trust_remote_code)
                return candidate, tokenizer_fingerprint(candidate)
        raise HarnessError(
            "no tokenizer in the merged, base or adapter folder; set tokenizer = PATH in the gate"
            " configuration"
        )

    return ctx.memo(TOKENIZER, compute)


def resize_note(ctx: Context) -> str | None:
    """Why the adapter model lm-eval evaluates differs from the one the harness compares, if so.

    lm-eval resizes a model's embeddings to the tokenizer's length before it applies a PEFT
    adapter whenever the two differ (its HF backend, "resizing model for LoRAs with added
    tokens"). A tokenizer shorter or longer than ``vocab_size`` (common: the padded vocabularies
    of Qwen and Llama) thus changes the unmerged adapter model's logits, and the comparison of
    the merged model with it is no longer like for like.
    """

    def compute() -> str | None:
        from transformers import AutoTokenizer

        merged = ctx.settings.merged
        if merged is None:
            return None
        folder, _ = resolve(ctx)
        vocab, _ = model_limits(merged)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        length = len(tokenizer)
        if not vocab or length == vocab:
            return None
        return (
            f"the tokenizer has {length} tokens but vocab_size is {vocab}: lm-eval resizes the"
            f" adapter model's embeddings to {length} before applying the adapter, so its"
            " results are not those of the model the merge was made from"
        )

    return ctx.memo(RESIZE, compute)
