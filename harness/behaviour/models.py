"""The models the behaviour checks compare, loaded once per run and released after.

- **M**, the merged model, loaded from its own folder with the task's ``AutoModelFor*`` class
  exactly as a user would (so config-level faults such as re-tied embeddings, a head the class
  never builds, or missing weights show), in the comparison dtype ``C`` (``--merge-dtype``; by
  default float32 on a CPU for bf16/fp16 checkpoints, else the dtype the checkpoint stores);
- **A**, the unmerged adapter model (``PeftModel`` on the base), in ``C``;
- **R**, the reference: base upcast + adapter, unmerged, in float32 — in float64 when A runs in
  float32, so that even an fp32 A has a measurable rounding noise of its own. When ``C`` is more
  precise than the stored dtype (``Setup.upcast``), A is R;
- **T**, the twin: a correct merge of A rounded to the stored dtype (``behaviour.twin``). It
  carries the one rounding A never does, that of the merged weights themselves.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.behaviour.probe import ProbeSpace
from harness.behaviour.twin import build_twin
from harness.dtypes import ITEMSIZE, MANTISSA_BITS, to_torch
from harness.errors import HarnessError
from harness.evals.tokenizer import TOKENIZER_FILES
from harness.extras import install_hint
from harness.io.models import (
    load_peft,
    load_pretrained,
    quiet,
    read_config,
    refuse_remote_code,
    task_of,
)
from harness.memory import shortfall
from harness.run.context import Context, Key
from harness.run.settings import Settings

if TYPE_CHECKING:
    import torch

#: Largest probe drawn: rows and tokens per row. Two rows already put a padded row beside a
#: longer one (the padding and mask paths); more rows only add forward-pass time, which at full
#: size on a CPU is the whole cost of the search (a 1.1B Llama: ~0.6 s per 32-token row).
PROBE_BATCH = 2
PROBE_LENGTH = 32
#: Working memory on top of the weights (activations, outputs, allocator slack), as a fraction.
MEMORY_HEADROOM = 0.15


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
                f" merge rounded to {self.stored}; device {self.device}"
            )
        return (
            f"task {self.task}; merged in {self.compare} (stored {self.stored}), adapter model in"
            f" {self.adapter}, reference in {self.reference}; device {self.device}"
        )


SETUP: Key[Setup] = Key("behaviour:setup")
MERGED: Key[tuple[Any, dict[str, Any]]] = Key("behaviour:merged")
ADAPTER: Key[Any] = Key("behaviour:adapter")
REFERENCE: Key[Any] = Key("behaviour:reference")
TWIN: Key[Any] = Key("behaviour:twin")
BASE: Key[Any] = Key("behaviour:base")
#: The calibrated tolerance (``behaviour.measure``); once it is known the twin is not needed.
TOLERANCE: Key[Any] = Key("behaviour:tolerance")
_MODELS = (MERGED, ADAPTER, REFERENCE, TWIN, BASE)


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


def _uniform_dtype(ctx: Context, which: str) -> torch.dtype | None:
    """The one floating dtype every tensor of the checkpoint holds, or None when mixed.

    A single-dtype checkpoint loads memory-mapped in that dtype and is cast after (see
    ``harness.io.models.load_pretrained``); a mixed one loads in the target dtype directly,
    since a cast through the narrower dtype would round the wider tensors.
    """
    checkpoint = ctx.merged() if which == "merged" else ctx.base()
    found = {info.dtype for info in checkpoint.tensors.values() if info.dtype in MANTISSA_BITS}
    return to_torch(found.pop()) if len(found) == 1 else None


def default_compare(stored: str, device: str) -> str:
    """The comparison dtype when ``--merge-dtype`` is not given.

    On a CPU, half-precision matmuls are emulated: a 1.1B Llama's forward pass on 4x32 tokens
    took 16.0 s in bf16 and 2.6 s in fp32 on the benchmark machine. Upcasting bf16 or fp16
    weights to fp32 is exact, so a CPU compares in float32 (the storage rounding is measured by
    a correctly merged twin, see :func:`twin_model`). An accelerator compares in the stored
    dtype, as the model is served.
    """
    if device.split(":")[0] == "cpu" and stored in ("BF16", "F16"):
        return "F32"
    return stored


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
    compare = settings.dtype or default_compare(stored, settings.device)
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


def release_models(ctx: Context) -> None:
    """Drop the context's models (fixtures that hold one keep theirs alive)."""
    for key in _MODELS:
        ctx.forget(key)
    # cycles inside the models would keep device memory until the next collection
    release_cache(ctx.settings.device)


def memory_shortfall(ctx: Context, pair: bool) -> str | None:
    """Why the behaviour models cannot be held here, or None when they fit (or it is unknown).

    Counts the models not loaded yet: M in the compare dtype; with ``pair``, A in its dtype,
    R (a copy of A in the reference dtype; none in an upcast comparison) and the twin (a
    merged copy of A, held during the equivalence search). Refusing up front gives a
    clear reason where loading would end in the kernel's out-of-memory kill.
    """
    s = setup(ctx)
    parameters = sum(info.numel for info in ctx.merged().tensors.values())
    sizes = {"M": (MERGED, ITEMSIZE[s.compare])}
    if pair:
        sizes["A"] = (ADAPTER, ITEMSIZE[s.adapter])
        if not s.upcast:
            sizes["R"] = (REFERENCE, ITEMSIZE[s.reference])
        if not ctx.known(TOLERANCE):
            sizes["the twin"] = (TWIN, ITEMSIZE[s.adapter])
    missing = {name: size for name, (key, size) in sizes.items() if not ctx.known(key)}
    needed = sum(missing.values()) * parameters
    if not needed:
        return None
    what = " + ".join(missing)
    reason = shortfall(
        int(needed * (1 + MEMORY_HEADROOM)),
        s.device,
        f"holding {what} ({parameters / 1e9:.2f}B parameters in {s.compare})",
    )
    if reason is None:
        return None
    return f"{reason}; run it on a larger machine or with --merge-device cuda"


def merged_model(ctx: Context) -> Any:
    """M: the merged checkpoint loaded from its folder as a user would, in the compare dtype."""
    return merged_loaded(ctx)[0]


def merged_loaded(ctx: Context) -> tuple[Any, dict[str, Any]]:
    """M and transformers' load info (missing and unexpected keys)."""
    s = setup(ctx)
    merged = ctx.settings.merged
    if merged is None:
        raise HarnessError("no merged model: pass --merged-model PATH")
    return ctx.memo(
        MERGED,
        lambda: load_pretrained(
            merged,
            s.task,
            dtype=to_torch(s.compare),
            device=s.device,
            trust_remote_code=ctx.settings.trust_remote_code,
            stored=_uniform_dtype(ctx, "merged"),
        ),
    )


def _needs_pair(ctx: Context) -> tuple[Any, Any]:
    settings = ctx.settings
    if settings.base is None or settings.adapter is None:
        raise HarnessError("needs --base-model and --adapter")
    return settings.base, settings.adapter


def adapter_model(ctx: Context) -> Any:
    """A: the unmerged adapter model (PeftModel on the base) in the adapter dtype."""
    s = setup(ctx)
    base, adapter = _needs_pair(ctx)
    return ctx.memo(
        ADAPTER,
        lambda: load_peft(
            base,
            adapter,
            s.task,
            dtype=to_torch(s.adapter),
            device=s.device,
            trust_remote_code=ctx.settings.trust_remote_code,
            head=s.head,
            stored=_uniform_dtype(ctx, "base"),
        ),
    )


def reference_model(ctx: Context) -> Any:
    """R: base upcast + adapter, unmerged, in float32 (float64 when A runs in float32).

    Made by upcasting a copy of A: A holds the base weights as stored and the adapter weights
    in float32 (peft's autocast), so the upcast copy has exactly the values loading the base in
    the reference dtype would give, at a fraction of the cost of a second load. When A already
    runs more precisely than the checkpoint stores (``Setup.upcast``), A is R.
    """
    s = setup(ctx)
    adapter = adapter_model(ctx)
    if s.upcast:
        return adapter
    return ctx.memo(REFERENCE, lambda: copy.deepcopy(adapter).to(to_torch(s.reference)))


def twin_model(ctx: Context) -> Any:
    """The twin: a correct merge stored in the stored dtype, run in A's dtype (held until released).

    A copy of A merged by peft (``merge_and_unload``) with every merged weight rounded to the
    stored dtype: what a correct merge saved in that dtype computes. Its deviation from R is
    the noise a correct merge brings, including the one rounding A never does, that of the
    merged weights themselves.
    """
    adapter = adapter_model(ctx)
    stored = to_torch(setup(ctx).stored)
    return ctx.memo(TWIN, lambda: build_twin(adapter, stored))


def release_twin(ctx: Context) -> None:
    """Drop the twin (the checks after the search need only its calibration figures)."""
    ctx.forget(TWIN)
    release_cache(ctx.settings.device)


def release_cache(device: str) -> None:
    """Return freed accelerator memory (a no-op on a CPU)."""
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def base_model(ctx: Context) -> Any:
    """The base model alone (no adapter), in the adapter dtype."""
    s = setup(ctx)
    base = ctx.settings.base
    if base is None:
        raise HarnessError("needs --base-model")
    return ctx.memo(
        BASE,
        lambda: load_pretrained(
            base,
            s.task,
            dtype=to_torch(s.adapter),
            device=s.device,
            trust_remote_code=ctx.settings.trust_remote_code,
            head=s.head,
        )[0],
    )

