"""Build a streamed model from a folder: transformers' architecture, peft's adapter, one budget.

The one entry point the behaviour checks and the perplexity gate share: the skeleton of the
task's class from the folder's config, the weight plan over the checkpoint (refusing stored
shapes the class cannot take, as transformers' loading would), the adapter by peft when one is
given, and the hooks that stream the layers (``forward.stream``) within the pool's budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.forward.plan import plan_weights
from harness.forward.pool import Pool
from harness.forward.skeleton import attach_adapter, build_model, slots
from harness.forward.stream import StreamedModel, Transform
from harness.io.checkpoint import Checkpoint
from harness.io.models import refuse_hostile_patterns, refuse_remote_code, resolve_device

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Recipe:
    """What to build: the folder its config comes from and the checkpoint its weights come from."""

    folder: Path
    checkpoint: Checkpoint
    task: str
    label: str
    trust_remote_code: bool = False
    #: Config keys of a classification head to build the model with (labels, pad id).
    head: dict[str, Any] = field(default_factory=dict)
    #: A PEFT adapter folder, applied by peft to the model.
    adapter: Path | None = None


def build_streamed(
    recipe: Recipe,
    dtype: torch.dtype,
    *,
    device: str,
    pool: Pool,
    keep: bool = True,
    transform: Transform | None = None,
    prepare: Callable[[Any], None] | None = None,
) -> tuple[StreamedModel, dict[str, Any]]:
    """The streamed model of ``recipe`` in ``dtype`` and its load report.

    The report has ``missing_keys`` (parameters no stored tensor makes: transformers would
    initialise them randomly) and ``unexpected_keys`` (stored tensors no parameter uses).
    ``prepare`` runs on the (peft) model before its hooks are attached; ``transform`` on each
    freshly read unit. Raises HarnessError when a stored shape does not fit the class, and
    ``pool.MemoryRefusal`` when one unit cannot fit the budget. The folders are checked as
    every folder handed to transformers or peft is (``io.models.refuse_remote_code``: no symlink
    out, no pipe, no unallowed custom code; the adapter's patterns replayed within a bound).
    """
    resolve_device(device)
    if recipe.adapter is not None:
        # peft reads the adapter folder unguarded and matches its regexes with ``re``: the
        # folder passes the harness's file guards first, and the patterns a bounded replay
        refuse_remote_code(recipe.adapter, recipe.trust_remote_code)
        refuse_hostile_patterns(recipe.adapter, recipe.folder)
    plain = build_model(
        recipe.folder,
        recipe.task,
        dtype=dtype,
        trust_remote_code=recipe.trust_remote_code,
        head=recipe.head or None,
    )
    owned = slots(plain)
    plan = plan_weights(plain, recipe.checkpoint)
    name = type(plain).__name__
    if plan.mismatched:
        shown = "; ".join(
            f"{n}: stored {list(a)}, {name} needs {list(b)}" for n, a, b in plan.mismatched[:3]
        )
        raise HarnessError(
            f"{recipe.folder}: transformers cannot load it as {name}: size mismatch ({shown})"
        )
    model = plain if recipe.adapter is None else attach_adapter(plain, recipe.adapter, device)
    if prepare is not None:
        prepare(model)
    streamed = StreamedModel(
        model,
        plain,
        owned,
        plan,
        recipe.checkpoint,
        device=device,
        pool=pool,
        label=recipe.label,
        keep=keep,
        transform=transform,
    )
    return streamed, {"missing_keys": plan.missing, "unexpected_keys": plan.unexpected}
