"""Expert routing of mixture-of-experts models: which experts each token was sent to.

In a mixture-of-experts layer a router picks each token's top-k experts. Two correct
computations of one model (the merged weights and the unmerged adapter, or bf16 and fp32) round
differently, and where a token's router scores are nearly tied that rounding can pick another
expert: that token's output then differs by far more than rounding noise, although both models
are right. The behaviour checks therefore record, during every forward pass, each router's
choice per token and compare the outputs only at positions routed alike, while bounding how many
positions may be routed differently (``behaviour.measure``).

Routers are found by their class name (transformers' ``MixtralTopKRouter``,
``Qwen3MoeTopKRouter``, ``GptOssTopKRouter``...: every class whose name ends in ``Router``),
including inside peft's wrappers, which call the router they wrap. A router is read when its
output is a tuple whose last element is an integer tensor of the selected experts, one row per
token of the pass: ``(tokens, k)``, the contract of transformers' top-k routers. A router with
another output (one that returns only logits and leaves the choice to its block) is not read; a
model with no router read has no routing record, and is compared on every position as before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Router modules are those whose class name ends with this.
ROUTER_SUFFIX = "Router"
#: No routing on padded positions (they are cut out, like the logits there).
UNROUTED = -1


@dataclass
class Record:
    """The experts each router chose in one forward pass, in the order the routers ran."""

    #: tokens of the pass (rows x length): a router's rows must be these
    tokens: int
    calls: list[torch.Tensor] = field(default_factory=list)

    def keys(self, rows: int, length: int) -> torch.Tensor | None:
        """Each position's routing key ``(rows, length, routers * k)``, or None (no router read).

        A key is the sorted top-k set of every router, in the order they ran: two positions
        were routed alike exactly when their keys are equal.
        """
        import torch

        if not self.calls:
            return None
        # each call (rows * length, k), sorted so that a set compares equal
        parts = [c.sort(dim=-1).values.reshape(rows, length, -1) for c in self.calls]
        return torch.cat(parts, dim=-1)


def routers(module: Any) -> list[Any]:
    """The router modules inside ``module`` (class name ending in ``Router``)."""
    return [m for m in module.modules() if type(m).__name__.endswith(ROUTER_SUFFIX)]


def selected(output: Any, tokens: int) -> torch.Tensor | None:
    """The experts a router's ``output`` selected, ``(tokens, k)`` int64, or None if unread."""
    import torch

    if not isinstance(output, tuple) or not output:
        return None
    last = output[-1]
    if not isinstance(last, torch.Tensor) or last.is_floating_point() or last.dtype == torch.bool:
        return None
    if last.dim() != 2 or last.shape[0] != tokens:
        return None
    return last.detach().to(device="cpu", dtype=torch.int64)


@contextlib.contextmanager
def recording(module: Any, tokens: int) -> Iterator[Record]:
    """Record the routers of ``module`` while the block runs one pass over ``tokens`` tokens."""
    record = Record(tokens)

    def hook(_: Any, __: Any, output: Any) -> None:
        chosen = selected(output, record.tokens)
        if chosen is not None:
            record.calls.append(chosen)

    handles = [r.register_forward_hook(hook) for r in routers(module)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def per_sequence(part: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(rows, length, K)`` keys as one row per sequence, padded positions ``UNROUTED``."""
    out = part.clone()
    out[~mask] = UNROUTED
    return out.reshape(out.shape[0], -1)


def rerouted(keys: torch.Tensor | None, reference: torch.Tensor | None) -> torch.Tensor | None:
    """Rows whose routing differs from the reference's, ``(rows,)`` bool; None when unknown."""
    if keys is None or reference is None or keys.shape != reference.shape:
        return None
    if keys.dim() < 2 or keys.shape[-1] == 0:
        return None
    flipped: torch.Tensor = (keys != reference).any(dim=-1)
    return flipped


# ---- judging ---------------------------------------------------------------------------------

#: Positions a probe may route differently from R: this many times the share a correct merge
#: routes differently (the twin and A on the calibration probe, or on the probe itself)...
C_FLIP = 4.0
#: ...at least this share of the probe's positions (rounded down)...
FLIP_FLOOR = 0.125
#: ...and at least this many. A correct merge reroutes rare near-ties (about 1 % of positions;
#: the most seen on one probe: 2 of 30); a wrong router or expert merge
#: reroutes most positions, and hypothesis shrinks its failure to a probe of two or three
#: tokens, all rerouted.
FLIP_MIN = 1
#: How the bound was chosen (printed with every MoE result).
FLIP_CALIBRATION = (
    "routing bound: correct bf16 merges of tiny Mixtral and Qwen3-MoE (adapters of 5 seeds on"
    " the experts, router and q_proj) rerouted 0 to 8 of about 560 positions on 20 probes"
    " (at most 1.5 %), compared in fp32 or in bf16; 6 of 1307 and 7 of 1325 in fp32, 12 of 1307"
    " and 14 of 1325 in bf16 on 60 probes; merges with the router or the experts unmerged, or"
    " another adapter's, fail on their routing (every position of a 2-token probe rerouted), a"
    " doubled expert or router delta on |Δ| at the positions routed alike"
)


@dataclass(frozen=True)
class Bound:
    """How many of a probe's positions may be routed differently from R."""

    #: share of the calibration probe's positions a correct merge routed differently
    noise_share: float
    c_flip: float = C_FLIP
    floor: float = FLIP_FLOOR
    least: int = FLIP_MIN

    def allowed(self, positions: int, noise_flips: int = 0) -> int:
        """Allowed rerouted positions of ``positions``, where A or the twin rerouted some."""
        return max(
            self.least,
            math.floor(self.floor * positions),
            math.ceil(self.c_flip * self.noise_share * positions),
            math.ceil(self.c_flip * noise_flips),
        )

    def describe(self) -> str:
        """The rule with its figures."""
        return (
            f"routing: positions whose top-k experts differ from R's in any layer are left out of"
            f" |Δ|; at most max({self.least}, {self.floor:g} x positions, {self.c_flip:g} x"
            f" {self.noise_share:.3g} x positions, {self.c_flip:g} x those A or the twin route"
            f" differently) may be ({self.noise_share:.3g}: the share a correct merge routed"
            " differently on the calibration probe)"
        )

    def to_json(self) -> dict[str, float]:
        """JSON-able figures."""
        return {k: float(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Rerouting:
    """One probe's positions routed differently from R's, by M, A (and the twin)."""

    positions: int
    merged: int
    adapter: int
    allowed: int
    twin: int | None = None

    @property
    def ok(self) -> bool:
        """Whether M rerouted no more positions than allowed."""
        return self.merged <= self.allowed

    def describe(self) -> str:
        """One line of figures."""
        twin = "" if self.twin is None else f", twin {self.twin}"
        return (
            f"routing: {self.merged} of {self.positions} positions routed differently from R"
            f" (allowed {self.allowed}; A {self.adapter}{twin}), judged on the other"
            f" {self.positions - self.merged}"
        )

    def to_json(self) -> dict[str, int | None]:
        """JSON-able figures."""
        return dict(self.__dict__)


def share(flipped: torch.Tensor | None) -> float:
    """The share of rows flipped (0 when unknown or empty)."""
    if flipped is None or flipped.numel() == 0:
        return 0.0
    return float(flipped.double().mean())


def count(flipped: torch.Tensor | None) -> int:
    """How many rows are flipped (0 when unknown)."""
    return 0 if flipped is None else int(flipped.sum())
