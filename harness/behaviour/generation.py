"""Greedy decoding: the prompts, lockstep decoding of all of them, and where decodings part ways.

The generation check decodes every prompt at once with the merged model, token by token with
its cache as a user's batched ``generate()`` does (prompts left-padded, position ids counted
from each prompt's first token), so each step is one read of the model's weights for all
prompts. The unmerged adapter model is then run teacher-forced on the same tokens in one pass.
An encoder-decoder model encodes the prompts once and decodes from its decoder start token. A
divergence is tolerated only where the reference's two candidate logits are within the
rounding-noise allowance of each other (a near-tie that any correct merge may break either way).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.behaviour.batch import SEQ2SEQ, compute_threads
from harness.behaviour.measure import Tolerance
from harness.behaviour.models import PROBE_LENGTH, load_tokenizer
from harness.behaviour.probe import ProbeSpace
from harness.run.settings import Settings

if TYPE_CHECKING:
    import torch

    from harness.forward.stream import StreamedModel

#: Greedy decoding: new tokens per prompt, prompts, and the texts used when a tokenizer loads.
GENERATE_TOKENS = 16
PROMPT_TEXTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Question: What is 12 plus 7?\nAnswer:",
)


def prompts(settings: Settings, space: ProbeSpace) -> list[list[int]]:
    """Prompts as token ids.

    The texts go through the merged folder's tokenizer when it loads and its ids fit the
    vocabulary; otherwise seeded random ids are used.
    """
    tokenizer = load_tokenizer(settings)
    found: list[list[int]] = []
    if tokenizer is not None:
        for text in PROMPT_TEXTS:
            try:
                ids = list(tokenizer(text)["input_ids"])[:PROBE_LENGTH]
            except Exception:  # a broken tokenizer falls back to random ids
                ids = []
            if ids and all(isinstance(i, int) and 0 <= i < space.vocab_size for i in ids):
                found.append(ids)
    if found:
        return found
    rng = random.Random(0)
    return [[rng.randrange(space.vocab_size) for _ in range(8)] for _ in PROMPT_TEXTS]


@dataclass(frozen=True)
class Rows:
    """Rows of token ids left-padded to one length, with their mask and position ids."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def left_padded(cls, rows: Sequence[Sequence[int]], pad: int, device: Any) -> Rows:
        """Left-pad ``rows``; positions count from each row's first real token (as generate)."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        return cls(ids.to(device), mask.to(device), positions.to(device))


def _takes(model: StreamedModel, name: str) -> bool:
    return name in inspect.signature(model.plain.forward).parameters


def _call(model: StreamedModel, **kwargs: Any) -> Any:
    import torch

    with torch.inference_mode(), compute_threads(model):
        return model(**kwargs)


def _past(model: StreamedModel, out: Any) -> tuple[str, Any] | None:
    """The cache a forward pass returned and the keyword it goes back in under.

    ``cache`` in transformers 5 (which still accepts, with a warning, ``past_key_values``),
    ``past_key_values`` before.
    """
    for key in ("cache", "past_key_values"):
        value = getattr(out, key, None)
        if value is not None:
            return ("cache" if _takes(model, "cache") else "past_key_values"), value
    return None


def decode(
    model: StreamedModel, prompts: Sequence[Sequence[int]], steps: int, pad: int, task: str
) -> list[list[int]]:
    """Greedy tokens of every prompt, decoded in lockstep: one pass of ``model`` per step."""
    import torch

    device = model.device
    rows = Rows.left_padded(prompts, pad, device)
    tokens: list[list[int]] = [[] for _ in prompts]
    # one pass per step: the model keeps as many of its own layers as the budget holds
    with model.pool.focus(model):
        kwargs = _first_inputs(model, rows, task)
        for step in range(steps):
            out = _call(model, **kwargs)
            # (rows, length, vocab) -> each row's next token
            picks = torch.argmax(out.logits[:, -1].float(), dim=-1).tolist()
            for row, token in zip(tokens, picks, strict=True):
                row.append(int(token))
            if step + 1 == steps:
                break
            kwargs = _next_inputs(model, rows, tokens, out, kwargs, task)
    return tokens


def _first_inputs(model: StreamedModel, rows: Rows, task: str) -> dict[str, Any]:
    import torch

    if task in SEQ2SEQ:
        start = model.plain.config.decoder_start_token_id
        start = 0 if start is None else int(start)
        decoder = torch.full((rows.ids.shape[0], 1), start, dtype=torch.long, device=model.device)
        # the encoder runs once, as generate() runs it, and every step reuses its output
        with torch.inference_mode(), compute_threads(model):
            encoded = model.invoke(
                model.plain.get_encoder(), input_ids=rows.ids, attention_mask=rows.mask
            )
        return {
            "attention_mask": rows.mask,
            "encoder_outputs": encoded,
            "decoder_input_ids": decoder,
            "use_cache": True,
        }
    kwargs: dict[str, Any] = {"input_ids": rows.ids, "attention_mask": rows.mask, "use_cache": True}
    if _takes(model, "position_ids"):
        kwargs["position_ids"] = rows.positions
    return kwargs


def _next_inputs(
    model: StreamedModel,
    rows: Rows,
    tokens: list[list[int]],
    out: Any,
    previous: dict[str, Any],
    task: str,
) -> dict[str, Any]:
    import torch

    device = model.device
    last = torch.tensor([[row[-1]] for row in tokens], dtype=torch.long, device=device)
    past = _past(model, out)
    if task in SEQ2SEQ:
        kwargs = dict(previous)
        if past is not None:
            kwargs["decoder_input_ids"] = last
            kwargs[past[0]] = past[1]
        else:
            kwargs["decoder_input_ids"] = torch.cat([previous["decoder_input_ids"], last], dim=1)
        return kwargs
    count = len(tokens[0])
    mask = torch.cat(
        [rows.mask, torch.ones((len(tokens), count), dtype=torch.long, device=device)], 1
    )
    if past is None:  # a model without a cache: the whole sequence again
        ids = torch.cat([rows.ids, torch.tensor(tokens, dtype=torch.long, device=device)], dim=1)
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        if _takes(model, "position_ids"):
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        return kwargs
    kwargs = {"input_ids": last, "attention_mask": mask, "use_cache": True, past[0]: past[1]}
    if _takes(model, "position_ids"):
        kwargs["position_ids"] = (mask.sum(-1, keepdim=True) - 1).clamp_min(0)
    return kwargs


def teacher_forced(
    model: StreamedModel,
    prompts: Sequence[Sequence[int]],
    tokens: Sequence[Sequence[int]],
    pad: int,
    task: str,
) -> list[torch.Tensor]:
    """``model``'s next-token logits after each prefix of every prompt's tokens, in one pass.

    For prompt ``i`` the result is ``(N, vocab)`` float64: row ``k`` is what lockstep decoding
    would see at step ``k`` (the model is causal), given the first ``k`` tokens.
    """
    import torch

    if task in SEQ2SEQ:
        rows = Rows.left_padded(prompts, pad, model.device)
        start = model.plain.config.decoder_start_token_id
        start = 0 if start is None else int(start)
        decoder = torch.tensor(
            [[start, *row[:-1]] for row in tokens], dtype=torch.long, device=model.device
        )
        out = _call(model, input_ids=rows.ids, attention_mask=rows.mask, decoder_input_ids=decoder)
        return [out.logits[i].to(torch.float64).cpu() for i in range(len(tokens))]
    sequences = [list(p) + list(t[:-1]) for p, t in zip(prompts, tokens, strict=True)]
    rows = Rows.left_padded(sequences, pad, model.device)
    kwargs: dict[str, Any] = {"input_ids": rows.ids, "attention_mask": rows.mask}
    if _takes(model, "position_ids"):
        kwargs["position_ids"] = rows.positions
    out = _call(model, **kwargs)
    # (rows, width, vocab) -> per prompt the N positions that predict generated tokens
    steps = len(tokens[0])
    return [out.logits[i, -steps:].to(torch.float64).cpu() for i in range(len(tokens))]


def first_divergence(merged: Sequence[int], adapter: Sequence[int]) -> int | None:
    """The first step at which two decodings pick different tokens, or None."""
    return next((k for k, (m, a) in enumerate(zip(merged, adapter, strict=True)) if m != a), None)


@dataclass(frozen=True)
class Divergence:
    """Two decodings part at a step: the reference's logit gap and the allowance it has."""

    merged_token: int
    adapter_token: int
    #: ``|R[m] - R[a]|``: how far apart the reference puts the two choices.
    gap: float
    #: The rounding-noise allowance of a logit at this step.
    allowed: float

    @property
    def tie(self) -> bool:
        """Whether the gap is within twice the allowance: a near-tie, not a fault."""
        return self.gap <= 2 * self.allowed


def judge_divergence(
    reference: torch.Tensor,
    adapter: torch.Tensor,
    merged_token: int,
    adapter_token: int,
    tolerance: Tolerance,
    twin: Callable[[], torch.Tensor],
) -> Divergence:
    """Whether a divergence of greedy decoding is a rounding near-tie.

    ``reference`` and ``adapter`` are the two models' next-token logits (vocab,) after the
    common prefix. The allowance comes from A's noise on this prefix; only when the gap exceeds
    it is ``twin`` (the correct merge's logits on the prefix) run, since only a larger noise can
    turn the verdict.
    """
    gap = abs(float(reference[merged_token] - reference[adapter_token]))
    scale = float(reference.abs().max())
    noise = float((adapter - reference).abs().max())
    allowed = tolerance.max_allowed(noise, scale)
    if gap > 2 * allowed:
        noise = max(noise, float((twin() - reference).abs().max()))
        allowed = tolerance.max_allowed(noise, scale)
    return Divergence(merged_token, adapter_token, gap, allowed)
