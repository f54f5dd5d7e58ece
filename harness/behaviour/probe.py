"""Probe inputs for forward passes: token ids, padding and attention masks, as plain data.

A :class:`ProbeInput` is what hypothesis generates and shrinks (plain tuples, so it prints and
compares exactly); :meth:`ProbeInput.tensors` turns it into the tensors a model takes. A
:class:`ProbeSpace` says which inputs a given model accepts (vocabulary, special tokens, the
padding it can handle); ``harness.strategies.probes_for`` draws from it. torch is imported
only when tensors are made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.architectures import ENCODER_MODEL_TYPES

if TYPE_CHECKING:
    import torch

#: How rows of different lengths are aligned: no padding (all rows one length), or pad ids
#: before (left) or after (right) the tokens, with attention mask 0 on the padding.
PADDINGS: tuple[str, ...] = ("none", "right", "left")
#: Config keys of the placeholder tokens vision-language models replace with image, video or
#: audio features (a text-only forward pass must not contain them).
_PLACEHOLDER_KEYS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "audio_token_id",
    "audio_token_index",
    "boi_token_index",
    "eoi_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
)


@dataclass(frozen=True)
class ProbeInput:
    """One batch of token ids with its attention mask (1 = real token, 0 = padding)."""

    input_ids: tuple[tuple[int, ...], ...]
    attention_mask: tuple[tuple[int, ...], ...]
    padding: str = "none"

    @property
    def batch(self) -> int:
        """Number of rows."""
        return len(self.input_ids)

    @property
    def length(self) -> int:
        """Padded sequence length."""
        return len(self.input_ids[0]) if self.input_ids else 0

    @property
    def tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return sum(sum(row) for row in self.attention_mask)

    def tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` as ``(batch, length)`` int64 tensors."""
        import torch

        return {
            "input_ids": torch.tensor(self.input_ids, dtype=torch.long, device=device),
            "attention_mask": torch.tensor(self.attention_mask, dtype=torch.long, device=device),
        }

    def describe(self, limit: int = 400) -> str:
        """One line: shape, padding and the ids with padding shown as ``_``."""
        rows = []
        for ids, mask in zip(self.input_ids, self.attention_mask, strict=True):
            rows.append(
                "[" + ", ".join(str(t) if m else "_" for t, m in zip(ids, mask, strict=True)) + "]"
            )
        text = (
            f"batch {self.batch} x length {self.length}, padding {self.padding}:"
            f" input_ids [{', '.join(rows)}]"
        )
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view (for the result's metrics)."""
        return {
            "input_ids": [list(r) for r in self.input_ids],
            "attention_mask": [list(r) for r in self.attention_mask],
            "padding": self.padding,
        }


def pad_rows(rows: list[list[int]], side: str, pad_id: int) -> ProbeInput:
    """Pad rows of token ids to one length on ``side`` (``none`` requires equal lengths)."""
    if side not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {side!r}")
    if not rows or any(not r for r in rows):
        raise ValueError("a probe needs at least one row and one token per row")
    width = max(len(r) for r in rows)
    if side == "none" and any(len(r) != width for r in rows):
        raise ValueError("rows of different lengths need left or right padding")
    ids: list[tuple[int, ...]] = []
    masks: list[tuple[int, ...]] = []
    for row in rows:
        gap = width - len(row)
        if side == "left":
            ids.append(tuple([pad_id] * gap + row))
            masks.append(tuple([0] * gap + [1] * len(row)))
        else:
            ids.append(tuple(row + [pad_id] * gap))
            masks.append(tuple([1] * len(row) + [0] * gap))
    return ProbeInput(tuple(ids), tuple(masks), side)


@dataclass(frozen=True)
class ProbeSpace:
    """The inputs one model accepts, and the bounds the behaviour checks draw within."""

    vocab_size: int
    special_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    max_length: int = 32
    max_batch: int = 4
    paddings: tuple[str, ...] = PADDINGS

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        *,
        task: str = "CAUSAL_LM",
        extra_special: tuple[int, ...] = (),
        max_length: int = 32,
        max_batch: int = 4,
    ) -> ProbeSpace:
        """The probe space of a model from its ``config.json`` (and tokenizer special ids).

        Sequence classification with a decoder pools the last non-pad token, found by
        ``pad_token_id``: without one transformers refuses batches of more than one row, so
        such a model gets single unpadded rows. An encoder-decoder gets no left padding (its
        decoder input is the probe shifted right). A vision-language model's text path draws
        ids below its first image, video or audio placeholder token (those need the pixels).
        """
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
        source = text or config
        vocab = int(source.get("vocab_size") or 0)
        if vocab < 1:
            raise ValueError("config.json has no vocab_size")
        placeholders = [
            i
            for key in _PLACEHOLDER_KEYS
            for i in _ids(config.get(key))
            if 0 < i < vocab and text is not None
        ]
        if placeholders:
            vocab = min(placeholders)
        positions = source.get("max_position_embeddings") or source.get("n_positions")
        length = min(max_length, int(positions)) if isinstance(positions, int) else max_length
        pad = _single_id(source.get("pad_token_id"))
        specials = {
            i
            for key in (
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
                "decoder_start_token_id",
                "sep_token_id",
                "cls_token_id",
            )
            for i in _ids(source.get(key))
        }
        specials.update(extra_special)
        specials = {i for i in specials if 0 <= i < vocab}
        if pad is not None and not 0 <= pad < vocab:
            pad = None
        batch, paddings = max_batch, tuple(PADDINGS)
        if task == "SEQ_CLS" and pad is None and not _is_encoder(source):
            batch, paddings = 1, ("none",)
        if config.get("is_encoder_decoder"):
            paddings = ("none", "right")
        return cls(vocab, tuple(sorted(specials)), pad, max(1, length), max(1, batch), paddings)

    def calibration_probe(self, seed: int = 0) -> ProbeInput:
        """A fixed full-size probe (largest batch and length, seeded ids, mixed padding).

        Its deviations set the noise floor: the largest input the checks draw, so the floor
        covers every drawn probe's rounding noise.
        """
        import random

        rng = random.Random(seed)
        pool = list(self.special_ids)
        rows = []
        for row in range(self.max_batch):
            length = (
                self.max_length
                if row == 0
                else rng.randint(max(1, self.max_length // 2), self.max_length)
            )
            if "none" in self.paddings and len(self.paddings) == 1:
                length = self.max_length
            ids = [
                rng.choice(pool) if pool and rng.random() < 0.1 else rng.randrange(self.vocab_size)
                for _ in range(length)
            ]
            rows.append(ids)
        side = "right" if "right" in self.paddings else "none"
        return pad_rows(rows, side, self.pad_id or 0)


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _single_id(value: Any) -> int | None:
    found = _ids(value)
    return found[0] if found else None


def _is_encoder(config: dict[str, Any]) -> bool:
    """Encoders (BERT-like) pool the first token, so padding never confuses them."""
    return not bool(config.get("is_decoder", False)) and (
        str(config.get("model_type", "")) in ENCODER_MODEL_TYPES
    )
