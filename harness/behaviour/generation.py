"""Greedy decoding: the prompts, a cached decoder, and where two decodings part ways.

The generation check decodes with the merged model as a user's ``generate()`` would, token by
token with its cache, and checks the unmerged adapter model teacher-forced on the same tokens.
A divergence is tolerated only where the reference's two candidate logits are within the
rounding-noise allowance of each other (a near-tie that any correct merge may break either way).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.behaviour.measure import Tolerance, compute_threads
from harness.behaviour.models import PROBE_LENGTH, load_tokenizer
from harness.behaviour.probe import ProbeSpace
from harness.run.settings import Settings

if TYPE_CHECKING:
    import torch

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


class Greedy:
    """Greedy decoding of one model, a token at a time, with its KV cache.

    ``logits`` holds the next-token logits (float64, on the CPU). Models that return no cache
    are run on the whole sequence at every step instead.
    """

    def __init__(self, model: Any, prompt: list[int], device: str) -> None:
        self.model = model
        self.device = device
        self.ids = list(prompt)
        #: the cache and the keyword it goes back in under (``cache`` in transformers 5,
        #: ``past_key_values`` before)
        self.past: Any = None
        self.past_key = "cache"
        self.logits = self._forward(self.ids)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        import torch

        kwargs: dict[str, Any] = {} if self.past is None else {self.past_key: self.past}
        with torch.inference_mode(), compute_threads(self.model):
            tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
            out = self.model(input_ids=tensor, use_cache=True, **kwargs)
        self.past = None
        for key in ("cache", "past_key_values"):
            if getattr(out, key, None) is not None:
                self.past, self.past_key = getattr(out, key), key
                break
        # (1, length, vocab) -> the last position's (vocab,)
        logits: torch.Tensor = out.logits[0, -1].detach().to(torch.float64).cpu()
        return logits

    def push(self, token: int) -> None:
        """Append ``token`` and compute the next logits."""
        self.ids.append(token)
        self.logits = self._forward([token] if self.past is not None else self.ids)


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
