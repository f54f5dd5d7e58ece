"""Tokenizers for evaluation: find the model's own, or build a tiny character tokenizer.

Real checkpoints ship their tokenizer; the tiny test models do not. For them the harness builds a
character-level tokenizer (one token per printable ASCII character, newline and space) padded
with unused tokens to *exactly* the model's ``vocab_size``: lm-eval resizes a model's embeddings
when the tokenizer's length differs from ``vocab_size`` before applying a PEFT adapter, which
would silently change the adapter model's logits and break the merged-vs-adapter comparison.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError
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
    config = json.loads((model_folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab = int(text.get("vocab_size") or 0)
    positions = int(text.get("max_position_embeddings") or text.get("n_positions") or 2048)
    return vocab, positions


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
            folder = build_char_tokenizer(scratch_dir(ctx) / "tokenizer", vocab, positions)
            return folder, f"{BUILTIN_TOKENIZER}:{vocab}"
        if chosen is not None:
            folder = Path(chosen)
            if not has_tokenizer(folder):
                raise HarnessError(f"tokenizer {folder}: no tokenizer files in this folder")
            return folder, tokenizer_fingerprint(folder)
        for candidate in (options.merged, options.base, options.adapter):
            if candidate is not None and candidate.is_dir() and has_tokenizer(candidate):
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
