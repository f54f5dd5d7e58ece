"""The models the behaviour checks compare, built once per run and streamed layer by layer.

- **M**, the merged model: the task's class built by transformers from the merged folder's
  config, exactly the class a user loads, with the weights read per layer from the merged
  checkpoint by transformers' own loading rules (so config-level faults such as re-tied
  embeddings, a head the class never builds, or missing weights show), in the comparison dtype
  ``C`` (``--merge-dtype``; by default chosen for the CPU, see ``forward.compute``);
- **A**, the unmerged adapter model: ``PeftModel.from_pretrained`` on the base (peft's own
  layers), the base weights streamed from the base checkpoint, the adapter resident, in ``C``;
- **R**, the reference: base upcast + adapter, unmerged, in float32 — in float64 when A runs in
  float32, so that even an fp32 A has a measurable rounding noise of its own. When ``C`` is more
  precise than the stored dtype (``Setup.upcast``), A is R;
- **T**, the twin: A's structure with each layer merged by peft as it is read and the merged
  weights rounded to the stored dtype (``behaviour.twin``): a correct merge, carrying the one
  rounding A never does.

Every model holds only the layers in flight (and those kept between passes) within one memory
budget (``--merge-memory``, ``forward.pool``); a model one of whose layers cannot fit is refused
with the figures (``forward.pool.MemoryRefusal``), and the checks skip with that reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.behaviour.probe import ProbeSpace
from harness.behaviour.twin import merge_unit, round_saved
from harness.dtypes import ITEMSIZE, MANTISSA_BITS, to_torch
from harness.errors import HarnessError
from harness.evals.tokenizer import TOKENIZER_FILES
from harness.extras import install_hint
from harness.forward.build import Recipe, build_streamed
from harness.forward.compute import default_compute
from harness.forward.pool import Pool, activation_bytes
from harness.forward.stream import StreamedModel, Transform
from harness.io.checkpoint import Checkpoint
from harness.io.models import quiet, read_config, refuse_remote_code, task_of
from harness.run.context import Context, Key
from harness.run.settings import Settings

#: Largest probe drawn: rows and tokens per row. Two rows already put a padded row beside a
#: longer one (the padding and mask paths); more rows only add forward-pass time.
PROBE_BATCH = 2
PROBE_LENGTH = 32
#: Most probes measured in one pass of a model: bounds the activations held back in the budget
#: (20 probes of up to 2 x 32 tokens, and the calibration probe: 1344 tokens).
PROBES_PER_PASS = 20


@dataclass(frozen=True)
class Setup:
    """What the behaviour checks compare, resolved once per run."""

    task: str
    #: dtype the merged checkpoint stores (dominant floating dtype by bytes).
    stored: str
    #: dtype M and A run in.
    compare: str
    space: ProbeSpace
    device: str
    #: config keys of a classification head passed when loading the base (labels, pad id).
    head: dict[str, Any] = field(default_factory=dict)

    @property
    def upcast(self) -> bool:
        """Whether M computes more precisely than it stores (the reference is then A itself)."""
        return MANTISSA_BITS[self.compare] > MANTISSA_BITS[self.stored]

    @property
    def adapter(self) -> str:
        """The dtype A runs in: the comparison dtype."""
        return self.compare

    @property
    def reference(self) -> str:
        """The dtype R runs in.

        In an upcast comparison A (no merge, no rounding of merged weights) is R itself, and
        the rounding a correct merge stored in the stored dtype brings is measured on the twin.
        Otherwise R is A upcast, to float64 when A runs in float32 so that A has a measurable
        noise of its own.
        """
        if self.upcast:
            return self.compare
        return "F64" if MANTISSA_BITS[self.compare] >= MANTISSA_BITS["F32"] else "F32"

    def describe(self) -> str:
        """One line naming the models and dtypes."""
        if self.upcast:
            return (
                f"task {self.task}; merged and adapter model in {self.compare} (stored"
                f" {self.stored}); reference = the adapter model; noise floor from a correct"
                f" merge rounded to {self.stored}; device {self.device}; layers streamed from"
                " the checkpoints"
            )
        return (
            f"task {self.task}; merged in {self.compare} (stored {self.stored}), adapter model in"
            f" {self.adapter}, reference in {self.reference}; device {self.device}; layers"
            " streamed from the checkpoints"
        )


SETUP: Key[Setup] = Key("behaviour:setup")
POOL: Key[Pool] = Key("behaviour:pool")
MERGED: Key[tuple[StreamedModel, dict[str, Any]]] = Key("behaviour:merged")
MERGED_F16: Key[StreamedModel] = Key("behaviour:merged-f16")
ADAPTER: Key[StreamedModel] = Key("behaviour:adapter")
REFERENCE: Key[StreamedModel] = Key("behaviour:reference")
TWIN: Key[StreamedModel] = Key("behaviour:twin")
BASE: Key[StreamedModel] = Key("behaviour:base")
#: The calibrated tolerance (``behaviour.measure``); once it is known the twin is not needed.
TOLERANCE: Key[Any] = Key("behaviour:tolerance")
_MODELS = (MERGED, MERGED_F16, ADAPTER, REFERENCE, TWIN, BASE)


def missing_libraries() -> str | None:
    """Why forward passes cannot run here, or None when transformers and peft are installed."""
    absent = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if absent:
        return f"{' and '.join(absent)} not installed ({install_hint('models')})"
    return None


def _stored_dtype(ctx: Context) -> str:
    """The dominant floating dtype (by bytes) of the merged checkpoint."""
    sizes: dict[str, int] = {}
    for info in ctx.merged().tensors.values():
        if info.dtype in MANTISSA_BITS:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    return max(sizes, key=lambda k: sizes[k]) if sizes else "F32"


def setup(ctx: Context) -> Setup:
    """Resolve the task, dtypes and probe space (cached in the context)."""
    return ctx.memo(SETUP, lambda: _setup(ctx))


def _setup(ctx: Context) -> Setup:
    settings = ctx.settings
    if settings.merged is None:
        raise HarnessError("no merged model: pass --merged-model PATH")
    config = read_config(settings.merged)
    adapter_config = ctx.adapter().config if ctx.has_adapter else None
    task = task_of(adapter_config, config)
    stored = _stored_dtype(ctx)
    compare = settings.dtype or default_compute(stored, settings.device)
    head: dict[str, Any] = {
        k: config[k]
        for k in ("num_labels", "id2label", "label2id", "pad_token_id")
        if k in config and task in ("SEQ_CLS", "TOKEN_CLS")
    }
    if "id2label" in head:
        head["num_labels"] = len(head["id2label"])
    try:
        space = ProbeSpace.from_config(
            config,
            task=task,
            extra_special=_tokenizer_specials(settings),
            max_length=PROBE_LENGTH,
            max_batch=PROBE_BATCH,
        )
    except ValueError as exc:
        raise HarnessError(f"{settings.merged / 'config.json'}: {exc}") from None
    return Setup(task, stored, compare, space, settings.device, head)


def _tokenizer_specials(settings: Settings) -> tuple[int, ...]:
    """Special-token ids of the merged folder's tokenizer (probes draw them too)."""
    tokenizer = load_tokenizer(settings)
    if tokenizer is None:
        return ()
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return tuple(int(i) for i in ids if isinstance(i, int))


def load_tokenizer(settings: Settings) -> Any:
    """The merged folder's tokenizer, loaded offline, or None when it has none that loads."""
    folder = settings.merged
    if folder is None or not any((folder / n).is_file() for n in TOKENIZER_FILES):
        return None
    try:
        refuse_remote_code(folder, settings.trust_remote_code)
    except HarnessError:  # the structure and security checks report why
        return None
    try:
        from transformers import AutoTokenizer

        with quiet():
            return AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=settings.trust_remote_code
            )
    except Exception:  # a tokenizer that does not load only costs the text prompts
        return None


def pool(ctx: Context) -> Pool:
    """The memory budget every streamed model of this run shares (``--merge-memory``).

    Activations of the largest pass the checks make (up to ``PROBES_PER_PASS`` probes and the
    calibration probe, in the widest dtype a model runs in) are held back from the start.
    """

    def create() -> Pool:
        s = setup(ctx)
        merged = ctx.settings.merged
        config = read_config(merged) if merged is not None else {}
        itemsize = max(ITEMSIZE[s.compare], ITEMSIZE[s.reference])
        made = Pool(s.device, requested=ctx.settings.memory)
        # a search pass: its probes and the calibration probe (generation's passes are smaller)
        rows = (min(ctx.settings.examples, PROBES_PER_PASS) + 1) * PROBE_BATCH
        made.set_reserve(activation_bytes(config, rows, PROBE_LENGTH, itemsize))
        return made

    return ctx.memo(POOL, create)


def release_models(ctx: Context) -> None:
    """Drop the context's models and every layer kept for them."""
    for key in _MODELS:
        _release(ctx, key)
    release_cache(ctx.settings.device)


def _peek(ctx: Context, key: Key[Any]) -> StreamedModel | None:
    """The streamed model memoised under ``key``, or None (not built, or failed to build)."""
    if not ctx.known(key):
        return None

    def nothing() -> Any:
        return None

    try:
        value = ctx.memo(key, nothing)
    except Exception:  # a remembered failure holds no model
        return None
    model = value[0] if isinstance(value, tuple) else value
    return model if isinstance(model, StreamedModel) else None


def built_models(ctx: Context) -> list[StreamedModel]:
    """The streamed models built so far in this context (M, A, R, the twin, the base)."""
    found: list[StreamedModel] = []
    for key in _MODELS:
        model = _peek(ctx, key)
        if model is not None and model not in found:
            found.append(model)
    return found


def release_f16(ctx: Context) -> None:
    """Drop M in fp16 (built for one row of the range check)."""
    _release(ctx, MERGED_F16)


def _release(ctx: Context, key: Key[Any]) -> None:
    model = _peek(ctx, key)
    if model is not None:
        model.release()
    ctx.forget(key)


def _streamed(
    ctx: Context,
    folder: Path,
    checkpoint: Checkpoint,
    label: str,
    dtype: str,
    *,
    head: dict[str, Any] | None = None,
    adapter: Path | None = None,
    transform: Transform | None = None,
    keep: bool = True,
) -> tuple[StreamedModel, dict[str, Any]]:
    """Build ``folder``'s model (with ``adapter`` by peft) streamed from ``checkpoint``."""
    s = setup(ctx)
    recipe = Recipe(
        folder,
        checkpoint,
        s.task,
        label,
        trust_remote_code=ctx.settings.trust_remote_code,
        head=head or {},
        adapter=adapter,
    )
    stored = to_torch(s.stored)
    return build_streamed(
        recipe,
        to_torch(dtype),
        device=s.device,
        pool=pool(ctx),
        keep=keep,
        transform=transform,
        prepare=None if transform is None else lambda model: round_saved(model, stored),
    )


def merged_loaded(ctx: Context) -> tuple[StreamedModel, dict[str, Any]]:
    """M and the load report (the keys transformers would call missing and unexpected)."""
    s = setup(ctx)
    merged = ctx.settings.merged
    if merged is None:
        raise HarnessError("no merged model: pass --merged-model PATH")
    return ctx.memo(
        MERGED, lambda: _streamed(ctx, merged, ctx.merged(), "the merged model", s.compare)
    )


def merged_model(ctx: Context) -> StreamedModel:
    """M: the merged checkpoint as a user loads it, streamed, in the compare dtype."""
    return merged_loaded(ctx)[0]


def merged_f16(ctx: Context) -> StreamedModel:
    """M computed in fp16 (the range check of fp16 checkpoints compared in a wider dtype)."""
    merged = ctx.settings.merged
    if merged is None:
        raise HarnessError("no merged model: pass --merged-model PATH")
    return ctx.memo(
        MERGED_F16,
        lambda: _streamed(ctx, merged, ctx.merged(), "the merged model in F16", "F16", keep=False)[
            0
        ],
    )


def _needs_pair(ctx: Context) -> tuple[Path, Path]:
    settings = ctx.settings
    if settings.base is None or settings.adapter is None:
        raise HarnessError("needs --base-model and --adapter")
    return settings.base, settings.adapter


def adapter_model(ctx: Context) -> StreamedModel:
    """A: the unmerged adapter model (PeftModel on the base) in the adapter dtype."""
    s = setup(ctx)
    base, adapter = _needs_pair(ctx)
    return ctx.memo(
        ADAPTER,
        lambda: _streamed(
            ctx, base, ctx.base(), "the adapter model", s.adapter, head=s.head, adapter=adapter
        )[0],
    )


def reference_model(ctx: Context) -> StreamedModel:
    """R: base + adapter, unmerged, in the reference dtype (A itself in an upcast comparison).

    Built like A in the wider dtype: peft keeps the adapter's weights in float32 or wider, and
    the base weights are read and cast per layer, the same values loading the base in the
    reference dtype would give.
    """
    s = setup(ctx)
    if s.upcast or s.reference == s.adapter:
        return adapter_model(ctx)
    base, adapter = _needs_pair(ctx)
    return ctx.memo(
        REFERENCE,
        lambda: _streamed(
            ctx, base, ctx.base(), "the reference model", s.reference, head=s.head, adapter=adapter
        )[0],
    )


def twin_model(ctx: Context) -> StreamedModel:
    """The twin: A merged layer by layer by peft, merged weights rounded to the stored dtype.

    Its deviation from R is the noise a correct merge brings, including the one rounding A
    never does, that of the merged weights themselves. Its layers are not kept between passes
    (it runs on few probes), leaving the budget to M and A.
    """
    s = setup(ctx)
    base, adapter = _needs_pair(ctx)
    stored = to_torch(s.stored)
    return ctx.memo(
        TWIN,
        lambda: _streamed(
            ctx,
            base,
            ctx.base(),
            "the twin (a correct merge)",
            s.adapter,
            head=s.head,
            adapter=adapter,
            transform=merge_unit(stored),
            keep=False,
        )[0],
    )


def release_twin(ctx: Context) -> None:
    """Drop the twin (the checks after the search need only its calibration figures)."""
    _release(ctx, TWIN)
    release_cache(ctx.settings.device)


def release_cache(device: str) -> None:
    """Return freed accelerator memory (a no-op on a CPU)."""
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def base_model(ctx: Context) -> StreamedModel:
    """The base model alone (no adapter), in the adapter dtype."""
    s = setup(ctx)
    base = ctx.settings.base
    if base is None:
        raise HarnessError("needs --base-model")
    return ctx.memo(
        BASE, lambda: _streamed(ctx, base, ctx.base(), "the base model", s.adapter, head=s.head)[0]
    )
