"""Behaviour checks: the merged model computes what the unmerged adapter model computes.

Models run on the same inputs:

- **M**, the merged model, loaded from its own folder with the task's ``AutoModelFor*`` class
  exactly as a user would (so config-level faults such as re-tied embeddings, a head the class
  never builds, or missing weights show), in the comparison dtype ``C`` (``--merge-dtype``; by
  default float32 on a CPU for bf16/fp16 checkpoints, else the dtype the checkpoint stores);
- **A**, the unmerged adapter model (``PeftModel`` on the base), in ``C``;
- **R**, the reference: base upcast + adapter, unmerged, in float32 — in float64 when A runs in
  float32, so that even an fp32 A has a measurable rounding noise of its own. When ``C`` is more
  precise than the stored dtype (``Setup.upcast``), A is R;
- **T**, the twin: a correct merge of A rounded to the stored dtype. It carries the one rounding
  A never does, that of the merged weights themselves.

On a probe input each model's deviation from R is measured over the non-padded positions (max
and mean ``|Δlogit|``, KL divergence, top-1/top-k agreement). A merge is correct when M is no
further from R than rounding noise, and A's and T's deviations *are* rounding noise. So the
check passes a probe when::

    max|M-R|  <= C_MAX  * max(max|A-R|,  max|T-R|,  noise_max)  + eps(C) * max|R|
    mean|M-R| <= C_MEAN * max(mean|A-R|, mean|T-R|, noise_mean) + eps(C) * max|R|

``noise_*`` are the larger of A's and T's deviations on a fixed full-size calibration probe (the
noise on one short input can be very small by chance; the calibration floor keeps the ratio
meaningful), and the last term is one unit of the comparison dtype at the logit scale (so equal
outputs always pass). T runs on a probe only when M fails without it: T can only raise the
bound, so the verdict is the same. ``C_MAX`` and ``C_MEAN`` were calibrated on thousands of
probes of correct merges (see ``CALIBRATION``); they are printed with every result. Hypothesis
draws the probes (``--merge-examples``, derandomised) and shrinks a failure to a minimal input,
which the message shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.context import Context, Options
from harness.errors import HarnessError
from harness.probe import ProbeInput, ProbeSpace, pad_rows
from harness.result import Check, CheckResult, Kind, Outcome

if TYPE_CHECKING:
    import torch

#: Allowed ratio of M's max |Δlogit| to the noise's (see CALIBRATION).
C_MAX = 11.0
#: Allowed ratio of M's mean |Δlogit| to the noise's (see CALIBRATION).
C_MEAN = 9.0
#: How the constants were obtained (printed in the details of every result).
CALIBRATION = (
    "C_MAX, C_MEAN: 1.5x the largest ratios seen on correct tiny merges (6 architectures; fp32,"
    " bf16, fp16; LoRA, rsLoRA, DoRA, patterns, modules_to_save): 6.79, 4.21 on 4188 probes of"
    " 449 merges compared in the stored dtype (benchmarks/behaviour_calibration.py --merges 400"
    " --seed 1 --compare stored); 5.66, 5.83 on 1612 probes of 169 merges in the CPU default"
    " (--merges 150 --probes 10 --seed 1)"
)
#: Largest probe drawn: rows and tokens per row. Two rows already put a padded row beside a
#: longer one (the padding and mask paths); more rows only add forward-pass time, which at full
#: size on a CPU is the whole cost of the search (a 1.1B Llama: ~0.6 s per 32-token row).
PROBE_BATCH = 2
PROBE_LENGTH = 32
#: Greedy decoding: new tokens per prompt, prompts, and the texts used when a tokenizer loads.
GENERATE_TOKENS = 16
PROMPT_TEXTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Question: What is 12 plus 7?\nAnswer:",
)
#: Stop shrinking a failure after this many evaluations or seconds (the smallest failing input
#: seen so far is reported).
SHRINK_EVALUATIONS = 200
SHRINK_SECONDS = 120.0
#: k of the top-k agreement figure.
TOP_K = 5
#: Outputs that are probability logits (KL and top-k apply); hidden states are compared by value.
_PROBABILISTIC = frozenset({"CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "MASKED_LM", "QUESTION_ANS"})
_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_MANTISSA = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7}


# ---- setup: task, dtypes, probe space ----------------------------------------------------


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
        return _MANTISSA[self.compare] > _MANTISSA[self.stored]

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
        return "F64" if _MANTISSA[self.compare] >= _MANTISSA["F32"] else "F32"

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


def missing_libraries() -> str | None:
    """Why forward passes cannot run here, or None when transformers and peft are installed."""
    absent = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (pip install 'pytest-merge-harness[models]')"
    return None


def _stored_dtype(ctx: Context) -> str:
    """The dominant floating dtype (by bytes) of the merged checkpoint."""
    sizes: dict[str, int] = {}
    for info in ctx.merged().tensors.values():
        if info.dtype in _MANTISSA:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    return max(sizes, key=lambda k: sizes[k]) if sizes else "F32"


def _uniform_dtype(ctx: Context, which: str) -> torch.dtype | None:
    """The one floating dtype every tensor of the checkpoint holds, or None when mixed.

    A single-dtype checkpoint loads memory-mapped in that dtype and is cast after (see
    ``loading.load_pretrained``); a mixed one loads in the target dtype directly, since a cast
    through the narrower dtype would round the wider tensors.
    """
    checkpoint = ctx.merged() if which == "merged" else ctx.base()
    found = {info.dtype for info in checkpoint.tensors.values() if info.dtype in _MANTISSA}
    return _torch_dtype(found.pop()) if len(found) == 1 else None


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
    return ctx.memo("behaviour:setup", lambda: _setup(ctx))


def _setup(ctx: Context) -> Setup:
    from harness.loading import read_config, task_of

    options = ctx.options
    if options.merged is None:
        raise HarnessError("no merged model: pass --merged-model PATH")
    config = read_config(options.merged)
    adapter_config = ctx.adapter().config if ctx.has_adapter else None
    task = task_of(adapter_config, config)
    stored = _stored_dtype(ctx)
    compare = options.dtype or default_compare(stored, options.device)
    if compare not in _MANTISSA:
        raise HarnessError(f"--merge-dtype {compare}: forward passes run in F64, F32, BF16 or F16")
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
            extra_special=_tokenizer_specials(options),
            max_length=PROBE_LENGTH,
            max_batch=PROBE_BATCH,
        )
    except ValueError as exc:
        raise HarnessError(f"{options.merged / 'config.json'}: {exc}") from None
    return Setup(task, stored, compare, space, options.device, head)


def _tokenizer_specials(options: Options) -> tuple[int, ...]:
    """Special-token ids of the merged folder's tokenizer (probes draw them too)."""
    tokenizer = _tokenizer(options)
    if tokenizer is None:
        return ()
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return tuple(int(i) for i in ids if isinstance(i, int))


def _tokenizer(options: Options) -> Any:
    from harness.sidecars import SIDECAR_FILES

    folder = options.merged
    if folder is None or not any((folder / n).is_file() for n in SIDECAR_FILES[1:]):
        return None
    try:
        from transformers import AutoTokenizer

        from harness.loading import offline, quiet

        offline()
        with quiet():
            return AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=options.trust_remote_code
            )
    except Exception:  # a tokenizer that does not load only costs the text prompts
        return None


# ---- models (memoised per context, freed when the behaviour checks are done) ----------------


class _Failed:
    def __init__(self, error: HarnessError) -> None:
        self.error = error


def _held(ctx: Context, key: str, load: Callable[[], Any]) -> Any:
    """Load a model once per context; a load failure is remembered like ``Context.memo``."""
    cache: dict[str, Any] = ctx.memo("behaviour:models", dict)
    if key not in cache:
        try:
            cache[key] = load()
        except HarnessError as exc:
            cache[key] = _Failed(exc)
    value = cache[key]
    if isinstance(value, _Failed):
        raise value.error
    return value


def release_models(ctx: Context) -> None:
    """Drop the context's models (fixtures that hold one keep theirs alive)."""
    cache: dict[str, Any] = ctx.memo("behaviour:models", dict)
    cache.clear()
    # cycles inside the models would keep device memory until the next collection
    release_cache(ctx.options.device)


#: Bytes per element of each dtype a model runs in.
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}
#: Working memory on top of the weights (activations, outputs, allocator slack), as a fraction.
MEMORY_HEADROOM = 0.15


def memory_shortfall(ctx: Context, pair: bool) -> str | None:
    """Why the behaviour models cannot be held here, or None when they fit (or it is unknown).

    Counts the models not loaded yet: M in the compare dtype; with ``pair``, A in its dtype,
    R (a copy of A in the reference dtype; none in an upcast comparison) and the twin (a
    merged copy of A, held during the equivalence search). Refusing up front gives a
    clear reason where loading would end in the kernel's out-of-memory kill.
    """
    from harness.memory import shortfall

    s = setup(ctx)
    parameters = sum(info.numel for info in ctx.merged().tensors.values())
    loaded: dict[str, Any] = ctx.memo("behaviour:models", dict)
    sizes = {"merged": _ELEMENT_BYTES[s.compare]}
    if pair:
        sizes["adapter"] = _ELEMENT_BYTES[s.adapter]
        if not s.upcast:
            sizes["reference"] = _ELEMENT_BYTES[s.reference]
        if not ctx.known("behaviour:tolerance"):
            sizes["twin"] = _ELEMENT_BYTES[s.adapter]
    needed = sum(size for key, size in sizes.items() if key not in loaded) * parameters
    if not needed:
        return None
    names = {"merged": "M", "adapter": "A", "reference": "R", "twin": "the twin"}
    what = " + ".join(names[k] for k in sizes if k not in loaded)
    reason = shortfall(
        int(needed * (1 + MEMORY_HEADROOM)),
        s.device,
        f"holding {what} ({parameters / 1e9:.2f}B parameters in {s.compare})",
    )
    if reason is None:
        return None
    return f"{reason}; run it on a larger machine or with --merge-device cuda"


def _torch_dtype(code: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, _DTYPES[code])
    assert isinstance(dtype, torch.dtype)
    return dtype


def merged_model(ctx: Context) -> Any:
    """M: the merged checkpoint loaded from its folder as a user would, in the compare dtype."""
    return merged_loaded(ctx)[0]


def merged_loaded(ctx: Context) -> tuple[Any, dict[str, Any]]:
    """M and transformers' load info (missing and unexpected keys)."""
    from harness.loading import load_pretrained

    s = setup(ctx)
    merged = ctx.options.merged
    assert merged is not None
    result: tuple[Any, dict[str, Any]] = _held(
        ctx,
        "merged",
        lambda: load_pretrained(
            merged,
            s.task,
            dtype=_torch_dtype(s.compare),
            device=s.device,
            trust_remote_code=ctx.options.trust_remote_code,
            stored=_uniform_dtype(ctx, "merged"),
        ),
    )
    return result


def _needs_pair(ctx: Context) -> tuple[Any, Any]:
    options = ctx.options
    if options.base is None or options.adapter is None:
        raise HarnessError("needs --base-model and --adapter")
    return options.base, options.adapter


def adapter_model(ctx: Context) -> Any:
    """A: the unmerged adapter model (PeftModel on the base) in the adapter dtype."""
    from harness.loading import load_peft

    s = setup(ctx)
    base, adapter = _needs_pair(ctx)
    return _held(
        ctx,
        "adapter",
        lambda: load_peft(
            base,
            adapter,
            s.task,
            dtype=_torch_dtype(s.adapter),
            device=s.device,
            trust_remote_code=ctx.options.trust_remote_code,
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
    import copy

    s = setup(ctx)
    adapter = adapter_model(ctx)
    if s.upcast:
        return adapter
    return _held(ctx, "reference", lambda: copy.deepcopy(adapter).to(_torch_dtype(s.reference)))


def twin_model(ctx: Context) -> Any:
    """The twin: a correct merge stored in the stored dtype, run in A's dtype (held until released).

    A copy of A merged by peft (``merge_and_unload``) with every merged weight rounded to the
    stored dtype: what a correct merge saved in that dtype computes. Its deviation from R is
    the noise a correct merge brings, including the one rounding A never does, that of the
    merged weights themselves.
    """
    adapter = adapter_model(ctx)
    stored = _torch_dtype(setup(ctx).stored)
    return _held(ctx, "twin", lambda: build_twin(adapter, stored))


def _merge_plain_lora(layer: Any) -> None:
    """Merge a plain LoRA ``Linear`` layer in one fused pass, marking it merged for peft.

    peft's own merge makes the delta, scales it, checks it for NaN and adds it: four passes
    over every weight, which at full size cost more than the forward passes of the search (at
    1.1B: 20 s for 154 layers on the benchmark machine). ``W + s * B @ A`` in one ``addmm`` is
    the same sum. Layers with a variant (DoRA), a LoRA bias or transposed weights are left to
    peft.
    """
    import torch
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear) or layer.merged or layer.fan_in_fan_out:
        return
    names = list(layer.active_adapters)
    if len(names) != 1 or names[0] not in layer.lora_A:
        return
    name = names[0]
    if name in getattr(layer, "lora_variant", {}) or layer.lora_bias.get(name, False):
        return
    base = layer.get_base_layer()
    if not isinstance(base, torch.nn.Linear):
        return
    weight = base.weight
    lora_b, lora_a = layer.lora_B[name].weight, layer.lora_A[name].weight
    assert isinstance(lora_b, torch.Tensor) and isinstance(lora_a, torch.Tensor)
    # (out, in) + s * (out, r) @ (r, in), accumulated in float32 as peft does on a CPU
    merged = torch.addmm(
        weight.float(), lora_b.float(), lora_a.float(), alpha=float(layer.scaling[name])
    )
    base.weight = torch.nn.Parameter(merged.to(weight.dtype), requires_grad=False)
    layer.merged_adapters.append(name)


def _round_to(model: Any, stored: torch.dtype, shared: set[int]) -> None:
    """Round every floating parameter of ``model`` to ``stored`` and back, as saving would.

    Parameters whose storage is ``shared`` with another model get a new tensor where the
    rounding changes them (a tied parameter stays tied); the others are rounded in place.
    """
    import torch

    replaced: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is None or not parameter.is_floating_point():
                    continue
                if id(parameter) in replaced:
                    module._parameters[name] = replaced[id(parameter)]
                    continue
                if parameter.dtype == stored:
                    continue
                rounded = parameter.detach().to(stored).to(parameter.dtype)
                if parameter.data_ptr() not in shared:
                    parameter.copy_(rounded)
                elif not torch.equal(rounded, parameter):
                    fresh = torch.nn.Parameter(rounded, requires_grad=False)
                    replaced[id(parameter)] = fresh
                    module._parameters[name] = fresh


def build_twin(adapter: Any, stored: torch.dtype) -> Any:
    """Merge a copy of the ``PeftModel`` ``adapter`` and round what the merge wrote to ``stored``.

    For LoRA the copy shares every tensor with ``adapter`` and the merge writes new ones
    (peft's ``safe_merge`` merges into a clone), so only the merged weights take new memory; at
    full size a whole copy costs more than the merge itself. Other adapter types merge a whole
    copy. Either way ``adapter`` is left untouched, which is verified.
    """
    import copy

    import torch
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from harness.loading import quiet

    originals = list(adapter.parameters())
    versions = [p._version for p in originals]
    layers = [m for m in adapter.modules() if isinstance(m, BaseTunerLayer)]
    if all(isinstance(m, LoraLayer) for m in layers):
        # new Parameter objects over the same storage: assigning .data in the copy leaves A's be
        memo: dict[int, Any] = {
            id(p): torch.nn.Parameter(p.data, requires_grad=p.requires_grad) for p in originals
        }
        twin = copy.deepcopy(adapter, memo)
    else:
        twin = copy.deepcopy(adapter)
    shared = {p.data_ptr() for p in originals}
    with torch.no_grad():
        for layer in twin.modules():
            _merge_plain_lora(layer)
    try:
        with quiet():
            merged = twin.merge_and_unload(safe_merge=True)
    except (ValueError, RuntimeError) as exc:  # peft refuses a merge that gives NaN
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HarnessError(f"peft cannot merge the adapter into the base: {first}") from None
    _round_to(merged, stored, shared)
    if [p._version for p in originals] != versions:
        raise HarnessError("internal error: merging the twin wrote into the adapter model")
    return merged


def release_twin(ctx: Context) -> None:
    """Drop the twin (the checks after the search need only its calibration figures)."""
    cache: dict[str, Any] = ctx.memo("behaviour:models", dict)
    cache.pop("twin", None)
    release_cache(ctx.options.device)


def release_cache(device: str) -> None:
    """Return freed accelerator memory (a no-op on a CPU)."""
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def base_model(ctx: Context) -> Any:
    """The base model alone (no adapter), in the adapter dtype."""
    from harness.loading import load_pretrained

    s = setup(ctx)
    base = ctx.options.base
    if base is None:
        raise HarnessError("needs --base-model")
    return _held(
        ctx,
        "base",
        lambda: load_pretrained(
            base,
            s.task,
            dtype=_torch_dtype(s.adapter),
            device=s.device,
            trust_remote_code=ctx.options.trust_remote_code,
            head=s.head,
        )[0],
    )


# ---- measuring -------------------------------------------------------------------------


#: Models below this many parameters run their CPU forward passes on one thread: their matrices
#: are too small to split, and on a busy machine extra threads only wait for each other (a
#: tiny model's forward pass was 6x slower on two contended threads than on one).
SMALL_MODEL_PARAMETERS = 5_000_000


@contextlib.contextmanager
def compute_threads(model: Any) -> Iterator[None]:
    """Run a small model's CPU forward passes single-threaded (restored afterwards)."""
    import torch

    small = getattr(model, "_merge_harness_small", None)
    if small is None:
        parameters = list(model.parameters())
        small = parameters[0].device.type == "cpu" and (
            sum(p.numel() for p in parameters) < SMALL_MODEL_PARAMETERS
        )
        model._merge_harness_small = small
    if not small:
        yield
        return
    # torch's thread count is per calling thread: set it in the thread that computes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def outputs(model: Any, probe: ProbeInput, task: str, device: str) -> torch.Tensor:
    """The model's outputs on ``probe`` at the non-padded positions, as float64 ``(rows, K)``.

    Per-token outputs (LM logits, token classes, hidden states) keep only positions whose mask
    is 1; per-sequence outputs (classification logits) keep every row.
    """
    import torch

    batch = probe.tensors(device)
    with torch.inference_mode(), compute_threads(model):
        out = model(**batch)
    if task == "QUESTION_ANS":
        values = torch.stack([out.start_logits, out.end_logits], dim=-1)
    elif getattr(out, "logits", None) is not None:
        values = out.logits
    else:
        values = out.last_hidden_state
    values = values.detach().to(torch.float64)
    if values.dim() == 3:
        # (batch, length, K)[mask] -> (tokens, K)
        values = values[batch["attention_mask"].bool()]
    return values.reshape(values.shape[0], -1).cpu()


@dataclass(frozen=True)
class Deviation:
    """How far one model's outputs are from the reference's on one probe."""

    max_abs: float
    mean_abs: float
    kl_mean: float | None = None
    kl_max: float | None = None
    top1: float | None = None
    topk: float | None = None

    def to_json(self) -> dict[str, float | None]:
        """JSON-able figures."""
        return {k: _round(v) for k, v in self.__dict__.items()}


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    if not math.isfinite(value):
        return value
    return float(f"{value:.4g}")


def deviation(values: torch.Tensor, reference: torch.Tensor, probabilistic: bool) -> Deviation:
    """|Δ| statistics, and for logits KL(R || x) and top-1 / top-k agreement, over rows."""
    import torch

    diff = (values - reference).abs()
    finite = bool(torch.isfinite(values).all())
    max_abs = float(diff.max()) if finite else math.inf
    mean_abs = float(diff.mean()) if finite else math.inf
    if not probabilistic or not finite:
        return Deviation(max_abs, mean_abs)
    log_r = torch.log_softmax(reference, dim=-1)
    log_x = torch.log_softmax(values, dim=-1)
    # KL(R || x) per row: sum_j p_R (log p_R - log p_x)
    kl = (log_r.exp() * (log_r - log_x)).sum(dim=-1).clamp_min(0.0)
    k = min(TOP_K, reference.shape[-1])
    top_r = reference.topk(k, dim=-1).indices
    top_x = values.topk(k, dim=-1).indices
    top1 = float((top_r[:, 0] == top_x[:, 0]).double().mean())
    # fraction of R's top-k tokens that x also ranks in its top-k
    overlap = (top_r.unsqueeze(-1) == top_x.unsqueeze(-2)).any(-1).double().mean()
    return Deviation(max_abs, mean_abs, float(kl.mean()), float(kl.max()), top1, float(overlap))


@dataclass(frozen=True)
class Tolerance:
    """The pass rule: M's deviation within ``c`` times A's (floored by calibration) plus a ULP."""

    c_max: float
    c_mean: float
    noise_max: float
    noise_mean: float
    eps: float
    #: which model's deviation on which probe set the noise floor
    source: str = "the adapter model on the calibration probe"

    def limits(self, noise: Deviation, scale: float) -> tuple[float, float]:
        """Allowed max and mean |Δ| of M on a probe whose own rounding noise is ``noise``."""
        return (
            self.max_allowed(noise.max_abs, scale),
            self.c_mean * max(noise.mean_abs, self.noise_mean) + self.eps * scale,
        )

    def max_allowed(self, noise_max: float, scale: float) -> float:
        """Allowed max |Δ| where the noise's max |Δ| is ``noise_max`` and R's max |R| ``scale``."""
        return self.c_max * max(noise_max, self.noise_max) + self.eps * scale

    def describe(self) -> str:
        """The rule with its figures."""
        return (
            f"allowed: max|M-R| <= {self.c_max:g} x max(max|A-R|, max|T-R|, {self.noise_max:.3g})"
            f" + eps x max|R|, mean|M-R| <= {self.c_mean:g} x max(mean|A-R|, mean|T-R|,"
            f" {self.noise_mean:.3g}) + eps x max|R| (eps = {self.eps:.3g}; T the twin, run on a"
            f" probe only where it can change the verdict); noise floor from {self.source}"
        )

    def to_json(self) -> dict[str, float | str]:
        """JSON-able figures."""
        return {k: v if isinstance(v, str) else float(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Figures:
    """One probe's measurement and verdict."""

    probe: ProbeInput
    merged: Deviation
    adapter: Deviation
    scale: float
    allowed_max: float
    allowed_mean: float
    #: the twin's deviation, measured only when M exceeded the allowance without it
    twin: Deviation | None = None

    @property
    def noise(self) -> Deviation:
        """The probe's own rounding noise: the larger of A's and the twin's deviations."""
        if self.twin is None:
            return self.adapter
        return Deviation(
            max(self.adapter.max_abs, self.twin.max_abs),
            max(self.adapter.mean_abs, self.twin.mean_abs),
        )

    @property
    def ok(self) -> bool:
        """Whether M is within tolerance on this probe (NaN never is)."""
        return self.merged.max_abs <= self.allowed_max and self.merged.mean_abs <= self.allowed_mean

    @property
    def ratio(self) -> float:
        """How much of the allowance M uses (>1 fails): the larger of the two criteria."""
        return max(
            _ratio(self.merged.max_abs, self.allowed_max),
            _ratio(self.merged.mean_abs, self.allowed_mean),
        )

    def explain(self) -> str:
        """The figures of this probe in one line."""
        return (
            f"max|M-R| {self.merged.max_abs:.3g} (allowed {self.allowed_max:.3g}; A"
            f" {self.adapter.max_abs:.3g}{self._twin('max_abs')}), mean|M-R|"
            f" {self.merged.mean_abs:.3g} (allowed {self.allowed_mean:.3g}; A"
            f" {self.adapter.mean_abs:.3g}{self._twin('mean_abs')}), logit scale"
            f" {self.scale:.3g}" + _agreement(self.merged, self.adapter)
        )

    def _twin(self, figure: str) -> str:
        return "" if self.twin is None else f", twin {getattr(self.twin, figure):.3g}"


def _agreement(merged: Deviation, adapter: Deviation) -> str:
    if merged.top1 is None or adapter.top1 is None:
        return ""
    return (
        f", top-1 agreement {merged.top1:.1%} (A {adapter.top1:.1%}), KL"
        f" {merged.kl_mean or 0:.2g} (A {adapter.kl_mean or 0:.2g})"
    )


def _ratio(value: float, allowed: float) -> float:
    if math.isnan(value):
        return math.inf
    if allowed <= 0:
        return 0.0 if value <= 0 else math.inf
    return value / allowed


def merged_calibration(ctx: Context) -> torch.Tensor:
    """M's outputs on the calibration probe (computed once: ``loads`` and the tolerance share)."""
    s = setup(ctx)
    return ctx.memo(
        "behaviour:merged-calibration",
        lambda: outputs(merged_model(ctx), s.space.calibration_probe(), s.task, s.device),
    )


def tolerance(ctx: Context) -> Tolerance:
    """The calibrated tolerance of this run (its noise floor measured once per context).

    The floor is the larger of two deviations from R on the calibration probe: A's (its
    rounding noise in the compare dtype; zero in an upcast comparison, where A is R) and the
    twin's, a correct merge of A stored in the stored dtype. The twin carries the one rounding
    A never does, that of the merged weights themselves: with an adapter much larger than the
    weights it merges into, that rounding can exceed A's compute noise even in fp32.
    """

    def measure() -> Tolerance:
        s = setup(ctx)
        probabilistic = s.task in _PROBABILISTIC
        calibration = s.space.calibration_probe()
        ref = outputs(reference_model(ctx), calibration, s.task, s.device)
        twin = deviation(
            outputs(twin_model(ctx), calibration, s.task, s.device), ref, probabilistic
        )
        noises = [twin]
        source = f"a correct merge stored in {s.stored} (the twin)"
        if not s.upcast:
            adapter = outputs(adapter_model(ctx), calibration, s.task, s.device)
            noises.append(deviation(adapter, ref, probabilistic))
            source = f"the larger of the adapter model's and {source}'s"
        source += " deviation on the calibration probe"

        def largest(values: list[float]) -> float:
            finite = [v for v in values if math.isfinite(v)]
            return max(finite, default=0.0)

        return Tolerance(
            C_MAX,
            C_MEAN,
            largest([n.max_abs for n in noises]),
            largest([n.mean_abs for n in noises]),
            2.0 ** -_MANTISSA[s.compare],
            source,
        )

    result: Tolerance = ctx.memo("behaviour:tolerance", measure)
    return result


class Comparer:
    """Runs M, A and R on probes and judges each against the calibrated tolerance."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.setup = setup(ctx)
        self.merged = merged_model(ctx)
        self.adapter = adapter_model(ctx)
        self.reference = reference_model(ctx)
        self.probabilistic = self.setup.task in _PROBABILISTIC
        self.calibration = self.setup.space.calibration_probe()
        self.tolerance = tolerance(ctx)

    def _run(self, model: Any, probe: ProbeInput) -> torch.Tensor:
        return outputs(model, probe, self.setup.task, self.setup.device)

    def measure(self, probe: ProbeInput) -> Figures:
        """M's and A's deviations from R on ``probe``, and the verdict."""
        ref = self._run(self.reference, probe)
        merged = deviation(self._run(self.merged, probe), ref, self.probabilistic)
        # A is R in an upcast comparison: its deviation is zero without a second forward pass
        adapter_out = ref if self.adapter is self.reference else self._run(self.adapter, probe)
        adapter = deviation(adapter_out, ref, self.probabilistic)
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        figures = Figures(probe, merged, adapter, scale, *self.tolerance.limits(adapter, scale))
        if figures.ok or not math.isfinite(merged.max_abs):
            return figures
        # Only a larger noise can turn this verdict: measure the twin's on this probe too (on a
        # correct merge this is rare, so the search costs two or three forward passes a probe)
        twin = deviation(self._run(twin_model(self.ctx), probe), ref, self.probabilistic)
        figures = dataclasses.replace(figures, twin=twin)
        allowed_max, allowed_mean = self.tolerance.limits(figures.noise, scale)
        return dataclasses.replace(figures, allowed_max=allowed_max, allowed_mean=allowed_mean)


# ---- the property search -------------------------------------------------------------------


@dataclass
class Search:
    """The outcome of a hypothesis search for a probe on which M is out of tolerance."""

    examples: list[Figures] = field(default_factory=list)
    minimal: Figures | None = None
    evaluations: int = 0
    note: str = ""

    @property
    def worst(self) -> Figures | None:
        """The generated probe that used most of its allowance."""
        return max(self.examples, key=lambda f: f.ratio, default=None)


def _size(probe: ProbeInput) -> tuple[int, int, int, int]:
    return (probe.tokens, probe.batch, probe.length, sum(sum(r) for r in probe.input_ids))


def search(measure: Callable[[ProbeInput], Figures], strategy: Any, examples: int) -> Search:
    """Draw up to ``examples`` probes; on a failure shrink it to a minimal failing probe.

    Derandomised (the same inputs every run). Shrinking stops after ``SHRINK_EVALUATIONS``
    evaluations or ``SHRINK_SECONDS``; the smallest failing probe seen so far is then reported.
    Called from inside a user's own ``@given`` test, the search runs in a worker thread of its
    own: it is an independent property run, not a nested one (hypothesis keeps its test context
    per thread). The worker is reused, since hypothesis sets up each new thread with a full
    garbage collection.
    """
    from hypothesis.control import currently_in_test_context

    if not currently_in_test_context():
        return _search(measure, strategy, examples)
    found: Search = _worker().submit(_search, measure, strategy, examples).result()
    return found


_WORKER: list[Any] = []


def _worker() -> Any:
    """The one thread that runs searches requested from inside a hypothesis test."""
    if not _WORKER:
        from concurrent.futures import ThreadPoolExecutor

        _WORKER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-harness-search"))
    return _WORKER[0]


def _search(measure: Callable[[ProbeInput], Figures], strategy: Any, examples: int) -> Search:
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings
    from hypothesis.errors import HypothesisException, NoSuchExample

    result = Search()
    failing: dict[ProbeInput, Figures] = {}
    state = {"first_failure": 0.0, "exhausted": False}

    def fails(probe: ProbeInput) -> bool:
        if state["exhausted"]:
            # out of budget: only already-known failures count, so shrinking ends at once
            return probe in failing
        figures = measure(probe)
        result.evaluations += 1
        if not failing:
            result.examples.append(figures)
        if figures.ok:
            return False
        if not failing:
            state["first_failure"] = time.perf_counter()
        failing[probe] = figures
        spent = time.perf_counter() - state["first_failure"]
        if len(failing) and (
            result.evaluations > SHRINK_EVALUATIONS + examples or spent > SHRINK_SECONDS
        ):
            state["exhausted"] = True
            result.note = "shrinking stopped early (budget spent); smallest failure so far shown"
        return True

    config = settings(
        parent=settings.get_profile("ci"),
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=True,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
    )
    from harness.offline import private_hypothesis_storage

    try:
        with private_hypothesis_storage():  # no .hypothesis/ in the user's folder
            found = find(strategy, fails, settings=config)
        result.minimal = failing.get(found) or measure(found)
    except NoSuchExample:
        result.minimal = None
    except HypothesisException as exc:  # e.g. flaky outputs on a nondeterministic device
        if not failing:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HarnessError(f"the probe search stopped: {type(exc).__name__}: {first}") from None
        result.minimal = failing[min(failing, key=_size)]
        result.note = f"hypothesis stopped shrinking ({type(exc).__name__})"
    if result.minimal is None and failing:
        result.minimal = failing[min(failing, key=_size)]
    return result


# ---- the checks ------------------------------------------------------------------------------


def _skip_reason(ctx: Context, *, pair: bool) -> str | None:
    reason = missing_libraries()
    if reason:
        return reason
    if pair and (not ctx.has_base or not ctx.has_adapter):
        missing = " and ".join(
            flag
            for flag, present in (("--base-model", ctx.has_base), ("--adapter", ctx.has_adapter))
            if not present
        )
        return (
            f"needs {missing} to build the unmerged adapter model (merged alone:"
            " behaviour::loads checks it loads and gives finite outputs)"
        )
    return None


def check_loads(ctx: Context) -> CheckResult:
    """The merged folder loads with the task's auto class, fully, and gives finite outputs."""
    import torch

    reason = _skip_reason(ctx, pair=False) or memory_shortfall(ctx, pair=False)
    if reason:
        return CheckResult.skipped(reason)
    s = setup(ctx)
    model, info = merged_loaded(ctx)
    name = type(model).__name__
    missing = list(info.get("missing_keys", []))
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        return CheckResult.failed(
            f"{name} initialised {len(missing)} weight(s) randomly because the merged checkpoint"
            f" lacks them: {shown}",
            [s.describe()],
            missing_keys=missing,
        )
    probe = s.space.calibration_probe()
    runs = [(s.compare, probe, merged_calibration(ctx))]
    if s.stored == "F16" and s.compare != "F16":
        # fp16's range (65504) is what overflows; compare in fp32 cannot show it, so one row
        # also runs in fp16 (the weights hold fp16 values: the casts are exact)
        row = pad_rows([list(probe.input_ids[0])], "none", 0)
        runs.append(("F16", row, _outputs_in(model, "F16", row, s)))
    for dtype, used, values in runs:
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            return CheckResult.failed(
                f"{name} gives {bad} non-finite output value(s) of {values.numel()} on a"
                f" {used.batch}x{used.length} probe (overflow in {dtype}?)",
                [s.describe(), f"probe: {used.describe()}"],
                nonfinite=bad,
            )
    unexpected = list(info.get("unexpected_keys", []))
    message = (
        f"loads as {name} ({s.compare}, {s.device}); outputs finite on a"
        f" {probe.batch}x{probe.length} probe"
        + "".join(f" and in {d} on a {u.batch}x{u.length} probe" for d, u, _ in runs[1:])
    )
    if unexpected:
        return CheckResult(
            Outcome.WARNING,
            message + f"; {len(unexpected)} stored tensor(s) unused by {name}:"
            f" {', '.join(unexpected[:3])}",
            [s.describe()],
            {"unexpected_keys": unexpected},
        )
    return CheckResult.passed(message, task=s.task, dtype=s.compare, model_class=name)


def _outputs_in(model: Any, dtype: str, probe: ProbeInput, s: Setup) -> torch.Tensor:
    """``model``'s outputs on ``probe`` computed in ``dtype`` (the model is cast back after)."""
    before = next(model.parameters()).dtype
    model.to(_torch_dtype(dtype))
    try:
        return outputs(model, probe, s.task, s.device)
    finally:
        model.to(before)


def check_equivalence(ctx: Context) -> CheckResult:
    """On hypothesis probes, M deviates from R no more than A's rounding noise allows."""
    reason = _skip_reason(ctx, pair=True) or memory_shortfall(ctx, pair=True)
    if reason:
        return CheckResult.skipped(reason)
    comparer = Comparer(ctx)
    strategy = comparer.setup.space.strategy()
    found = search(comparer.measure, strategy, ctx.options.examples)
    release_twin(ctx)
    return equivalence_result(comparer, found)


def equivalence_result(comparer: Comparer, found: Search) -> CheckResult:
    """The equivalence check's result from a finished search."""
    s, tol = comparer.setup, comparer.tolerance
    details = [s.describe(), tol.describe(), CALIBRATION]
    metrics: dict[str, Any] = {
        "probes": len(found.examples),
        "evaluations": found.evaluations,
        "tolerance": tol.to_json(),
        "setup": {
            "task": s.task,
            "stored": s.stored,
            "compare": s.compare,
            "adapter": s.adapter,
            "reference": s.reference,
            "device": s.device,
        },
    }
    if found.minimal is not None:
        bad = found.minimal
        times = _ratio(bad.merged.max_abs, max(bad.noise.max_abs, tol.noise_max))
        metrics.update(
            minimal_input=bad.probe.to_json(),
            merged=bad.merged.to_json(),
            adapter=bad.adapter.to_json(),
            twin=None if bad.twin is None else bad.twin.to_json(),
        )
        details[:0] = [f"minimal failing input: {bad.probe.describe()}", bad.explain()]
        if found.note:
            details.append(found.note)
        if bad.merged.max_abs > bad.allowed_max:
            what = f"max|Δ| {bad.merged.max_abs:.3g} > allowed {bad.allowed_max:.3g}"
        else:
            what = f"mean|Δ| {bad.merged.mean_abs:.3g} > allowed {bad.allowed_mean:.3g}"
        return CheckResult.failed(
            f"merged model deviates from the {s.reference} reference {times:.3g}x more than"
            f" rounding noise ({what}) on {bad.probe.describe(160)}",
            details,
            **metrics,
        )
    worst = found.worst
    if worst is None:
        raise HarnessError("no probe input was evaluated (hypothesis drew none)")
    m_max = max(f.merged.max_abs for f in found.examples)
    a_max = max(f.adapter.max_abs for f in found.examples)
    metrics.update(
        worst_ratio=_round(worst.ratio), merged_max_abs=_round(m_max), adapter_max_abs=_round(a_max)
    )
    agree = ""
    top1 = [f.merged.top1 for f in found.examples if f.merged.top1 is not None]
    top1_a = [f.adapter.top1 for f in found.examples if f.adapter.top1 is not None]
    if top1 and top1_a:
        mean_m, mean_a = sum(top1) / len(top1), sum(top1_a) / len(top1_a)
        agree = f"; top-1 agreement {mean_m:.1%}" + ("" if s.upcast else f" (adapter {mean_a:.1%})")
        metrics.update(
            merged_top1=_round(sum(top1) / len(top1)),
            adapter_top1=_round(sum(top1_a) / len(top1_a)),
        )
    details.append(f"worst probe ({worst.ratio:.0%} of its allowance): {worst.probe.describe()}")
    details.append(worst.explain())
    message = (
        f"merged within tolerance of the {s.reference} reference on {len(found.examples)} probes:"
        f" max|Δ| {m_max:.3g} vs "
        + (
            f"a correct merge's {tol.noise_max:.3g} (the twin, calibration probe)"
            if s.upcast
            else f"adapter model's {a_max:.3g}"
        )
        + ", worst probe used"
        f" {worst.ratio:.0%} of its allowance{agree}"
    )
    return CheckResult(Outcome.PASSED, message, details, metrics)


# ---- generation --------------------------------------------------------------------------


def prompts(ctx: Context, space: ProbeSpace) -> list[list[int]]:
    """Prompts as token ids.

    The texts go through the merged folder's tokenizer when it loads and its ids fit the
    vocabulary; otherwise seeded random ids are used.
    """
    tokenizer = _tokenizer(ctx.options)
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
    import random

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


def check_generation(ctx: Context) -> CheckResult:
    """Greedy decoding with M and A agrees, or diverges only where R's top-2 are within noise."""
    import torch

    reason = _skip_reason(ctx, pair=True)
    if reason:
        return CheckResult.skipped(reason)
    s = setup(ctx)
    if s.task != "CAUSAL_LM":
        release_models(ctx)
        return CheckResult.skipped(f"greedy decoding applies to causal LMs, not {s.task}")
    reason = memory_shortfall(ctx, pair=True)
    if reason:
        return CheckResult.skipped(reason)
    comparer = Comparer(ctx)
    tol = comparer.tolerance
    lines: list[str] = []
    tolerated = 0
    for number, prompt in enumerate(prompts(ctx, s.space), 1):
        # M decodes token by token with its cache, as a user's generate() does
        merged = Greedy(comparer.merged, prompt, s.device)
        tokens: list[int] = []
        for step in range(GENERATE_TOKENS):
            tokens.append(int(torch.argmax(merged.logits)))
            if step + 1 < GENERATE_TOKENS:
                merged.push(tokens[-1])
        # A's greedy choice after each common prefix, in one teacher-forced pass: its logits at
        # position P-1+k are what lockstep decoding would see at step k (the model is causal),
        # so the first position where A's argmax differs is the first divergence
        forced = pad_rows([prompt + tokens[:-1]], "none", 0)
        # (P + N - 1, vocab) -> the N positions that predict generated tokens
        a_rows = comparer._run(comparer.adapter, forced)[len(prompt) - 1 :]
        a_picks = [int(i) for i in torch.argmax(a_rows, dim=-1)]
        first = next(
            (k for k, (m, a) in enumerate(zip(tokens, a_picks, strict=True)) if m != a), None
        )
        if first is None:
            lines.append(f"prompt {number}: identical for {GENERATE_TOKENS} tokens")
            continue
        m_tok, a_tok, a = tokens[first], a_picks[first], a_rows[first]
        ids = prompt + tokens[:first]
        prefix = pad_rows([ids], "none", 0)
        r = (
            a
            if comparer.reference is comparer.adapter
            else comparer._run(comparer.reference, prefix)[-1]
        )
        gap = abs(float(r[m_tok] - r[a_tok]))
        noise = float((a - r).abs().max())
        allowed = tol.max_allowed(noise, float(r.abs().max()))
        if gap > 2 * allowed:
            # only a larger noise can tolerate it: the twin's on this prefix
            twin = comparer._run(twin_model(ctx), prefix)[-1]
            noise = max(noise, float((twin - r).abs().max()))
            allowed = tol.max_allowed(noise, float(r.abs().max()))
        where = (
            f"prompt {number} token {first + 1}: merged picks {m_tok}, adapter model"
            f" picks {a_tok}; reference logits differ by {gap:.3g}"
        )
        if gap <= 2 * allowed:
            tolerated += 1
            lines.append(f"{where} <= 2 x noise allowance {allowed:.3g}: a near tie, tolerated")
            continue
        release_models(ctx)
        return CheckResult.failed(
            f"greedy decoding diverges at {where}, more than 2 x the noise allowance"
            f" {allowed:.3g}: not a rounding tie",
            [f"prompt ids: {prompt}", f"common prefix: {ids}", s.describe(), tol.describe()],
            prompt=prompt,
            step=first + 1,
            gap=gap,
            allowed=allowed,
        )
    release_models(ctx)
    count = len(lines)
    message = (
        f"greedy decoding identical on {count - tolerated} of {count} prompts for"
        f" {GENERATE_TOKENS} tokens"
    )
    if tolerated:
        message += f"; {tolerated} divergence(s) at reference near-ties (tolerated)"
    return CheckResult(
        Outcome.PASSED,
        message,
        [*lines, s.describe()],
        {"prompts": count, "tolerated": tolerated, "tokens": GENERATE_TOKENS},
    )


def _check_sidecars(ctx: Context) -> CheckResult:
    from harness.sidecars import check_sidecars

    return check_sidecars(ctx)


def checks(options: Options) -> list[Check]:
    """The behaviour family."""
    spec = [
        (
            "loads",
            check_loads,
            "loads with the task's AutoModelFor* class, no weight left random, finite outputs",
        ),
        (
            "equivalence",
            check_equivalence,
            "on hypothesis probes, deviates from an fp32 reference no more than the unmerged"
            " adapter model",
        ),
        (
            "generation",
            check_generation,
            "greedy decoding matches the unmerged adapter model (ties within noise excepted)",
        ),
        (
            "sidecars",
            _check_sidecars,
            "tokenizer files and generation_config.json equal the base's (or the adapter's)",
        ),
    ]
    return [Check("behaviour", name, Kind.BEHAVIOUR, doc, run) for name, run, doc in spec]
