"""Many probes in one forward pass: one read of a streamed model's weights for a whole batch.

Probes are stacked row-wise into one batch. A probe shorter than the batch is extended on the
right with padding under attention mask 0, which leaves its own tokens' outputs as they were:
its tokens keep their positions (position ids count from the row's start whatever the mask),
causal attention never looks to the right, and masked keys get zero attention weight. Each
probe's outputs are then cut back out at its own non-padded positions. A model that cannot take
padding (a decoder classifier without a pad token) gets one pass per distinct probe length.
Encoder-decoder models are given the probe as the encoder input and, shifted right by the
model's own ``prepare_decoder_input_ids_from_labels``, as the decoder input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.behaviour.probe import ProbeInput, ProbeSpace
from harness.behaviour.routing import per_sequence, recording

if TYPE_CHECKING:
    import torch

    from harness.forward.stream import StreamedModel

#: Models below this many parameters run their CPU forward passes on one thread: their matrices
#: are too small to split, and on a busy machine extra threads only wait for each other (a
#: tiny model's forward pass was 6x slower on two contended threads than on one).
SMALL_MODEL_PARAMETERS = 5_000_000
#: Tasks whose model is an encoder-decoder (the decoder input is the probe shifted right).
SEQ2SEQ = frozenset({"SEQ_2_SEQ_LM"})


@contextlib.contextmanager
def compute_threads(model: StreamedModel) -> Iterator[None]:
    """Run a small model's CPU forward passes single-threaded (restored afterwards)."""
    import torch

    if model.device.type != "cpu" or model.numel >= SMALL_MODEL_PARAMETERS:
        yield
        return
    # torch's thread count is per calling thread: set it in the thread that computes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stack(probes: Sequence[ProbeInput], pad_id: int) -> ProbeInput:
    """One probe holding every row of ``probes``, each extended on the right to one length."""
    width = max(p.length for p in probes)
    ids: list[tuple[int, ...]] = []
    masks: list[tuple[int, ...]] = []
    for probe in probes:
        for row, mask in zip(probe.input_ids, probe.attention_mask, strict=True):
            gap = width - len(row)
            ids.append(tuple(row) + (pad_id,) * gap)
            masks.append(tuple(mask) + (0,) * gap)
    return ProbeInput(tuple(ids), tuple(masks), "mixed")


def groups(probes: Sequence[ProbeInput], space: ProbeSpace) -> list[list[int]]:
    """Indices of ``probes`` that can share one pass (all of them, unless padding is refused)."""
    if "right" in space.paddings or "left" in space.paddings:
        return [list(range(len(probes)))]
    by_length: dict[int, list[int]] = {}
    for index, probe in enumerate(probes):
        by_length.setdefault(probe.length, []).append(index)
    return list(by_length.values())


def model_inputs(model: StreamedModel, probe: ProbeInput, task: str) -> dict[str, torch.Tensor]:
    """The keyword arguments of one forward pass on ``probe`` (decoder inputs for seq2seq)."""
    inputs = probe.tensors(model.device)
    if task in SEQ2SEQ:
        prepare = getattr(model.plain, "prepare_decoder_input_ids_from_labels", None)
        labels = inputs["input_ids"]
        if prepare is None:
            raise ValueError(
                f"{type(model.plain).__name__} cannot shift labels into decoder inputs"
            )
        inputs["decoder_input_ids"] = prepare(labels=labels)
        inputs["decoder_attention_mask"] = inputs["attention_mask"]
    return inputs


def logits_of(out: Any, task: str) -> torch.Tensor:
    """The comparable output of a forward pass: logits, QA start/end, or hidden states."""
    import torch

    if task == "QUESTION_ANS":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    if getattr(out, "logits", None) is not None:
        values: torch.Tensor = out.logits
        return values
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


@dataclass(frozen=True)
class Ran:
    """One probe's outputs at its non-padded positions and, for an MoE model, their routing."""

    #: ``(rows, K)`` on the CPU, in the model's output dtype
    values: torch.Tensor
    #: ``(rows, routers * k)`` routing keys of the same rows (``behaviour.routing``); None
    #: when the model has no router that could be read
    routes: torch.Tensor | None = None

    def widened(self) -> Ran:
        """The same rows with the outputs in float64 (what the comparisons measure in)."""
        import torch

        return Ran(self.values.to(torch.float64), self.routes)


def run_probes(
    model: StreamedModel, probes: Sequence[ProbeInput], task: str, space: ProbeSpace
) -> list[torch.Tensor]:
    """Each probe's outputs at its non-padded positions, ``(rows, K)`` on the CPU.

    Per-token outputs (LM logits, token classes, hidden states) keep the positions whose mask is
    1; per-sequence outputs (classification logits) one row per probe row. One forward pass per
    group (see :func:`groups`), in the model's output dtype (the caller measures in float64).
    """
    return [r.values for r in run_routed(model, probes, task, space)]


def run_routed(
    model: StreamedModel, probes: Sequence[ProbeInput], task: str, space: ProbeSpace
) -> list[Ran]:
    """Each probe's outputs as :func:`run_probes` cuts them, with the routing of those rows.

    The routers' choices are recorded during the same passes and cut back exactly as the
    outputs: per-token outputs keep the routing of their own position; a per-sequence output's
    row holds the routing of all its positions (padded ones as ``routing.UNROUTED``).
    """
    import torch

    found: list[Ran | None] = [None] * len(probes)
    pad = space.pad_id or 0
    for group in groups(probes, space):
        batch = stack([probes[i] for i in group], pad)
        tokens = batch.batch * batch.length
        with torch.inference_mode(), compute_threads(model), recording(model.model, tokens) as rec:
            values = logits_of(model(**model_inputs(model, batch, task)), task).detach()
        keys = rec.keys(batch.batch, batch.length)
        row = 0
        for index in group:
            probe = probes[index]
            # (rows, length, K) of this probe, or (rows, K) per sequence
            part = values[row : row + probe.batch]
            # (rows, length, routers * k) routing keys of the same rows
            route = None if keys is None else keys[row : row + probe.batch, : probe.length]
            row += probe.batch
            mask = torch.tensor(probe.attention_mask, dtype=torch.bool)
            if part.dim() == 3:
                part = part[:, : probe.length][mask.to(part.device)]
                route = None if route is None else route[mask]
            elif route is not None:
                route = per_sequence(route, mask)
            found[index] = Ran(part.reshape(part.shape[0], -1).cpu(), route)
    return [f for f in found if f is not None]


def outputs(model: StreamedModel, probe: ProbeInput, task: str, space: ProbeSpace) -> torch.Tensor:
    """One probe's outputs as float64 ``(rows, K)`` (see :func:`run_probes`)."""
    import torch

    return run_probes(model, [probe], task, space)[0].to(torch.float64)


def routed(model: StreamedModel, probe: ProbeInput, task: str, space: ProbeSpace) -> Ran:
    """One probe's outputs as float64 ``(rows, K)``, with their routing (see :func:`run_routed`)."""
    return run_routed(model, [probe], task, space)[0].widened()
