"""The ``behaviour`` family: the merged model computes what the unmerged adapter model computes.

On hypothesis-drawn probes each model's deviation from the reference is measured over the
non-padded positions (max and mean ``|Δlogit|``, KL divergence, top-1/top-k agreement); see
``harness.behaviour.measure`` for the rule and its calibration. Greedy decoding is compared
token by token, and divergences are tolerated only at the reference's near-ties.
"""

from __future__ import annotations

import functools
from typing import Any

from harness.behaviour.batch import outputs
from harness.behaviour.generation import (
    GENERATE_TOKENS,
    decode,
    first_divergence,
    judge_divergence,
    prompts,
    teacher_forced,
)
from harness.behaviour.layers import C_LAYER, QUANTILE, measure_layers
from harness.behaviour.layers import CALIBRATION as LAYER_CALIBRATION
from harness.behaviour.measure import (
    CALIBRATION,
    Comparer,
    merged_calibration,
    ratio_of,
    round_figure,
)
from harness.behaviour.models import (
    built_models,
    merged_f16,
    merged_loaded,
    missing_libraries,
    pool,
    release_f16,
    release_models,
    release_twin,
    setup,
    twin_model,
)
from harness.behaviour.probe import pad_rows
from harness.behaviour.routing import FLIP_CALIBRATION
from harness.behaviour.search import Search, search
from harness.checks.passes import growth
from harness.checks.sidecars import check_sidecars
from harness.errors import HarnessError
from harness.forward.pool import MemoryRefusal
from harness.forward.skeleton import NoTextPath
from harness.memory import format_size
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Family, Outcome
from harness.run.settings import Settings
from harness.strategies import probes_for

#: Failures that make the forward passes impossible here rather than the merge wrong: skips.
CANNOT_RUN = (MemoryRefusal, NoTextPath)

# ---- the checks ------------------------------------------------------------------------------


def _unavailable(ctx: Context, *, pair: bool) -> CheckResult | None:
    """The skip of a behaviour check that cannot run here, naming what it needs; else None.

    Memory is not judged here: the streamed models refuse (``MemoryRefusal``) only when one
    layer cannot fit the budget, and :func:`_cannot_run` turns that into the skip.
    """
    reason = missing_libraries()
    if reason:
        return CheckResult.skipped(reason, needs=["transformers", "peft"])
    if pair and (not ctx.has_base or not ctx.has_adapter):
        missing = [
            flag
            for flag, present in (("--base-model", ctx.has_base), ("--adapter", ctx.has_adapter))
            if not present
        ]
        return CheckResult.skipped(
            f"needs {' and '.join(missing)} to build the unmerged adapter model (merged alone:"
            " behaviour::loads checks it loads and gives finite outputs)",
            needs=missing,
        )
    if pair:
        grown = growth(ctx)
        if grown.explained:
            # peft applies the adapter to a base resized before training; that base is never
            # saved, and the one given has fewer rows, so the unmerged adapter model cannot be
            # built. Nothing the user can pass would change that: a skip, not a missing input.
            return CheckResult.skipped(
                f"the merge grew the vocabulary ({grown.describe()}): the unmerged adapter model"
                " needs the base resized before training, which is never saved; the weights"
                " family checks the old rows and the new ones exactly"
            )
    return None


def _cannot_run(exc: Exception) -> CheckResult:
    """The skip for a forward pass impossible here (one of ``CANNOT_RUN``).

    A layer beyond the memory budget leaves a check that applies to this merge unverified
    (it needs memory); a model class with no text path gives the family nothing to run.
    """
    if isinstance(exc, MemoryRefusal):
        return CheckResult.skipped(str(exc), needs=["memory"])
    return CheckResult.skipped(str(exc))


def _traffic(ctx: Context) -> list[str]:
    """Detail lines: the memory budget and what each streamed model read."""
    lines = [pool(ctx).describe()]
    for model in built_models(ctx):
        t = model.traffic
        lines.append(
            f"{model.label}: {t.passes} forward passes, {format_size(t.bytes_read)} read"
            f" ({t.units_read} units read, {t.units_kept} reused from memory)"
        )
    return lines


def check_loads(ctx: Context) -> CheckResult:
    """The merged folder loads with the task's class, fully, and gives finite outputs."""
    try:
        return _check_loads(ctx)
    except CANNOT_RUN as exc:
        return _cannot_run(exc)


def _check_loads(ctx: Context) -> CheckResult:
    import torch

    unavailable = _unavailable(ctx, pair=False)
    if unavailable is not None:
        return unavailable
    s = setup(ctx)
    streamed, info = merged_loaded(ctx)
    name = type(streamed.model).__name__
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
        half = merged_f16(ctx)
        try:
            runs.append(("F16", row, outputs(half, row, s.task, s.space)))
        finally:
            release_f16(ctx)
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
        f"loads as {name} ({s.compare}, {s.device}, streamed per layer); outputs finite on a"
        f" {probe.batch}x{probe.length} probe"
        + "".join(f" and in {d} on a {u.batch}x{u.length} probe" for d, u, _ in runs[1:])
    )
    if unexpected:
        return CheckResult(
            Outcome.WARNING,
            message + f"; {len(unexpected)} stored tensor(s) unused by {name}:"
            f" {', '.join(unexpected[:3])}",
            [s.describe(), *_traffic(ctx)],
            {"unexpected_keys": unexpected},
        )
    return CheckResult(
        Outcome.PASSED,
        message,
        [s.describe(), *_traffic(ctx)],
        {"task": s.task, "dtype": s.compare, "model_class": name},
    )


def check_equivalence(ctx: Context) -> CheckResult:
    """On hypothesis probes, M deviates from R no more than A's rounding noise allows."""
    unavailable = _unavailable(ctx, pair=True)
    if unavailable is not None:
        return unavailable
    try:
        comparer = Comparer(ctx)
    except CANNOT_RUN as exc:
        return _cannot_run(exc)
    strategy = probes_for(comparer.setup.space)
    found = search(comparer.measure_all, strategy, ctx.settings.examples)
    result = equivalence_result(comparer, found)
    result.details.extend(_traffic(ctx))
    release_twin(ctx)
    return result


def equivalence_result(comparer: Comparer, found: Search) -> CheckResult:
    """The equivalence check's result from a finished search."""
    s, tol = comparer.setup, comparer.tolerance
    details = [s.describe(), tol.describe(), CALIBRATION]
    if tol.routing is not None:
        details[2:2] = [tol.routing.describe(), FLIP_CALIBRATION]
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
        times = ratio_of(bad.merged.max_abs, max(bad.noise.max_abs, tol.noise_max))
        metrics.update(
            minimal_input=bad.probe.to_json(),
            merged=bad.merged.to_json(),
            adapter=bad.adapter.to_json(),
            twin=None if bad.twin is None else bad.twin.to_json(),
        )
        if bad.routing is not None:
            metrics.update(routing=bad.routing.to_json())
        details[:0] = [f"minimal failing input: {bad.probe.describe()}", bad.explain()]
        if found.note:
            details.append(found.note)
        if bad.routing is not None and not bad.routing.ok:
            r = bad.routing
            return CheckResult.failed(
                f"merged model routes {r.merged} of {r.positions} positions to other experts"
                f" than the {s.reference} reference (allowed {r.allowed}: a correct merge"
                f" reroutes only near-ties) on {bad.probe.describe(160)}",
                details,
                **metrics,
            )
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
        worst_ratio=round_figure(worst.ratio),
        merged_max_abs=round_figure(m_max),
        adapter_max_abs=round_figure(a_max),
    )
    agree = ""
    top1 = [f.merged.top1 for f in found.examples if f.merged.top1 is not None]
    top1_a = [f.adapter.top1 for f in found.examples if f.adapter.top1 is not None]
    if top1 and top1_a:
        mean_m, mean_a = sum(top1) / len(top1), sum(top1_a) / len(top1_a)
        agree = f"; top-1 agreement {mean_m:.1%}" + ("" if s.upcast else f" (adapter {mean_a:.1%})")
        metrics.update(
            merged_top1=round_figure(sum(top1) / len(top1)),
            adapter_top1=round_figure(sum(top1_a) / len(top1_a)),
        )
    details.append(f"worst probe ({worst.ratio:.0%} of its allowance): {worst.probe.describe()}")
    details.append(worst.explain())
    routing = ""
    counted = [f.routing for f in found.examples if f.routing is not None]
    if counted:
        moved = sum(r.merged for r in counted)
        positions = sum(r.positions for r in counted)
        allowed = sum(r.allowed for r in counted)
        most = max(counted, key=lambda r: (ratio_of(r.merged, r.allowed), r.merged))
        routing = (
            f"; routing: {moved} of {positions} positions routed differently from R (allowed"
            f" {allowed}; the most on one probe {most.merged} of {most.positions}, allowed"
            f" {most.allowed}), judged on the other {positions - moved}"
        )
        metrics.update(rerouted=moved, positions=positions, rerouted_allowed=allowed)
    message = (
        f"merged within tolerance of the {s.reference} reference on {len(found.examples)} probes:"
        f" max|Δ| {m_max:.3g} vs "
        + (
            f"a correct merge's {tol.noise_max:.3g} (the twin, calibration probe)"
            if s.upcast
            else f"adapter model's {a_max:.3g}"
        )
        + ", worst probe used"
        f" {worst.ratio:.0%} of its allowance{agree}{routing}"
    )
    return CheckResult(Outcome.PASSED, message, details, metrics)


def check_layers(ctx: Context) -> CheckResult:
    """Each layer, given the reference's input, deviates from R's no more than rounding allows."""
    unavailable = _unavailable(ctx, pair=True)
    if unavailable is not None:
        return unavailable
    try:
        figures = measure_layers(ctx)
    except CANNOT_RUN as exc:
        return _cannot_run(exc)
    finally:
        release_twin(ctx)
    s = setup(ctx)
    if not figures:
        return CheckResult.skipped(
            f"{s.task} model has no list of layers the harness can run one by one (the"
            " equivalence check compares its outputs whole)"
        )
    probe = s.space.calibration_probe()
    rule = (
        f"each layer given the reference's input (teacher-forced) on a {probe.batch}x"
        f"{probe.length} probe; figure: the {QUANTILE:.0%} quantile over positions of the RMS"
        " |Δ| over the hidden size; allowed: C_LAYER x the larger of the adapter model's and a"
        " correct merge's (the twin) + eps x the layer's output scale"
    )
    rows = [f.explain() for f in figures]
    metrics: dict[str, Any] = {
        "layers": len(figures),
        "worst": max(figures, key=lambda f: f.ratio).to_json(),
    }
    bad = [f for f in figures if not f.ok]
    if bad:
        worst = max(bad, key=lambda f: f.ratio)
        alone = (
            "; every other layer is within its allowance"
            if len(bad) == 1
            else f"; {len(bad)} of {len(figures)} layers beyond their allowance:"
            f" {', '.join(f.name for f in bad[:6])}" + (" ..." if len(bad) > 6 else "")
        )
        metrics["failed"] = [f.to_json() for f in bad]
        return CheckResult.failed(
            f"layer {worst.name} computes {worst.times_noise:.3g}x further from the"
            f" {s.reference} reference than a correct merge's rounding (allowed {C_LAYER:g}x)"
            f"{alone}",
            [rule, *rows, s.describe(), LAYER_CALIBRATION],
            **metrics,
        )
    worst = max(figures, key=lambda f: f.ratio)
    return CheckResult(
        Outcome.PASSED,
        f"each of {len(figures)} layers, given the reference's input, within rounding noise of"
        f" the reference's output; worst {worst.name} at {worst.ratio:.0%} of its allowance"
        f" ({worst.times_noise:.3g}x the noise)",
        [rule, *rows, s.describe(), LAYER_CALIBRATION, *_traffic(ctx)],
        metrics,
    )


def check_generation(ctx: Context) -> CheckResult:
    """Greedy decoding with M and A agrees, or diverges only where R's top-2 are within noise."""
    unavailable = _unavailable(ctx, pair=True)
    if unavailable is not None:
        return unavailable
    s = setup(ctx)
    if s.task not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        release_models(ctx)
        return CheckResult.skipped(f"greedy decoding applies to language models, not {s.task}")
    try:
        comparer = Comparer(ctx)
    except CANNOT_RUN as exc:
        return _cannot_run(exc)
    try:
        return _generation(ctx, comparer)
    finally:
        release_models(ctx)


def _generation(ctx: Context, comparer: Comparer) -> CheckResult:
    import torch

    s, tol = comparer.setup, comparer.tolerance
    pad = s.space.pad_id or 0
    asked = prompts(ctx.settings, s.space)
    # every prompt decoded at once by M, one pass per token, as a user's generate() does
    tokens = decode(comparer.merged, asked, GENERATE_TOKENS, pad, s.task)
    # A's greedy choice after each common prefix, in one teacher-forced pass: its logits at
    # step k are what lockstep decoding would see (the model is causal), so the first step
    # where A's argmax differs is the first divergence
    a_rows = teacher_forced(comparer.adapter, asked, tokens, pad, s.task)
    a_picks = [[int(i) for i in torch.argmax(rows, dim=-1)] for rows in a_rows]
    firsts = [first_divergence(t, a) for t, a in zip(tokens, a_picks, strict=True)]
    r_rows = a_rows
    if any(f is not None for f in firsts) and comparer.reference is not comparer.adapter:
        r_rows = teacher_forced(comparer.reference, asked, tokens, pad, s.task)
    twin_rows: list[torch.Tensor] = []

    def twin_logits(index: int, step: int) -> torch.Tensor:
        if not twin_rows:
            twin_rows.extend(teacher_forced(twin_model(ctx), asked, tokens, pad, s.task))
        return twin_rows[index][step]

    lines: list[str] = []
    tolerated = 0
    for number, (prompt, first) in enumerate(zip(asked, firsts, strict=True), 1):
        if first is None:
            lines.append(f"prompt {number}: identical for {GENERATE_TOKENS} tokens")
            continue
        index = number - 1
        found = judge_divergence(
            r_rows[index][first],
            a_rows[index][first],
            tokens[index][first],
            a_picks[index][first],
            tol,
            functools.partial(twin_logits, index, first),
        )
        where = (
            f"prompt {number} token {first + 1}: merged picks {found.merged_token}, adapter model"
            f" picks {found.adapter_token}; reference logits differ by {found.gap:.3g}"
        )
        if found.tie:
            tolerated += 1
            lines.append(
                f"{where} <= 2 x noise allowance {found.allowed:.3g}: a near tie, tolerated"
            )
            continue
        ids = list(prompt) + tokens[index][:first]
        return CheckResult.failed(
            f"greedy decoding diverges at {where}, more than 2 x the noise allowance"
            f" {found.allowed:.3g}: not a rounding tie",
            [f"prompt ids: {list(prompt)}", f"common prefix: {ids}", s.describe(), tol.describe()],
            prompt=list(prompt),
            step=first + 1,
            gap=found.gap,
            allowed=found.allowed,
        )
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
        [*lines, s.describe(), *_traffic(ctx)],
        {"prompts": count, "tolerated": tolerated, "tokens": GENERATE_TOKENS},
    )


def checks(settings: Settings) -> list[Check]:
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
            "layers",
            check_layers,
            "each layer, given the reference's input, within rounding noise of the reference's"
            " layer (finds a fault in one layer of a deep model)",
        ),
        (
            "generation",
            check_generation,
            "greedy decoding matches the unmerged adapter model (ties within noise excepted)",
        ),
        (
            "sidecars",
            check_sidecars,
            "tokenizer files and generation_config.json equal the base's (or the adapter's)",
        ),
    ]
    return [Check(Family.BEHAVIOUR, name, doc, run) for name, run, doc in spec]
