"""Structure checks: what can be proven from headers, configs and a finite-value scan.

The merged checkpoint alone must load as safetensors, have a consistent index, hold no adapter
leftovers and only finite values. Against the base it must have the same tensor names, shapes,
dtypes and parameter count, the same data size (a LoRA merge adds ``B @ A`` into weights that
already exist, so the files stay the same size), a ``config.json`` that differs only in allowed
keys, and tied embeddings that agree between config and weights.
"""

from __future__ import annotations

from typing import Any

from harness.architectures import (
    CONFIG_ALLOWED,
    CONFIG_PROVENANCE,
    INPUT_EMBEDDINGS,
    LEFTOVER_MARKERS,
    OUTPUT_HEADS,
    TIE_DEFAULT,
    find_suffix,
)
from harness.checks.passes import growth, merged_scan
from harness.checks.sizes import justified_sizes
from harness.deltas.layouts import StoredLayout
from harness.io.checkpoint import Checkpoint
from harness.io.configs import compare_configs
from harness.run.check import Check
from harness.run.context import Context
from harness.run.result import CheckResult, Family
from harness.run.settings import Settings
from harness.text import shown


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"


def _first(names: list[str], limit: int = 3) -> str:
    quoted = ", ".join(shown(n) for n in names[:limit])
    return quoted + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---- merged alone ----------------------------------------------------------------------


def check_loads(ctx: Context) -> CheckResult:
    """The merged folder opens as safetensors with valid headers (pickle refused)."""
    merged = ctx.merged()
    kind = "opted-in pickle" if merged.is_pickle else "safetensors"
    return CheckResult.passed(
        f"{len(merged.tensors)} tensors in {max(len(merged.files), 1)} {kind} file(s),"
        f" {_human(merged.file_bytes or merged.data_bytes)}",
        tensors=len(merged.tensors),
        files=len(merged.files),
    )


def check_index(ctx: Context) -> CheckResult:
    """``model.safetensors.index.json`` lists exactly the shards present, totals agree."""
    merged = ctx.merged()
    if merged.index is None:
        return CheckResult.passed("single-file checkpoint, no index needed")
    return CheckResult.passed(
        f"index maps {len(merged.tensors)} tensors to {len(merged.files)} shards;"
        f" total_size {merged.data_bytes} matches",
        shards=len(merged.files),
    )


def check_no_leftovers(ctx: Context) -> CheckResult:
    """No key of an unmerged PEFT model (``lora_A``, ``base_layer``, ``modules_to_save``...)."""
    merged = ctx.merged()
    leftovers = sorted(n for n in merged.tensors if any(m in n for m in LEFTOVER_MARKERS))
    if leftovers:
        return CheckResult.failed(
            f"{len(leftovers)} adapter leftover tensor(s) in the merged checkpoint:"
            f" {_first(leftovers)} (was the model saved before merge_and_unload?)",
            leftovers=leftovers,
        )
    return CheckResult.passed("no lora_/base_layer/modules_to_save keys")


def check_finite(ctx: Context) -> CheckResult:
    """Every floating-point tensor is free of NaN and Inf."""
    scan = merged_scan(ctx)
    if scan.nonfinite:
        name = sorted(scan.nonfinite)[0]
        bad = scan.nonfinite[name]
        return CheckResult.failed(
            f"{len(scan.nonfinite)} tensor(s) hold NaN/Inf; first {name!r}: {bad.nan} NaN,"
            f" {bad.inf} Inf, element {bad.first_index} = {bad.first_value}",
            [f"{n}: {v.nan} NaN, {v.inf} Inf" for n, v in sorted(scan.nonfinite.items())[:10]],
            tensors=sorted(scan.nonfinite),
        )
    return CheckResult.passed("all floating-point tensors are finite")


# ---- against the base ------------------------------------------------------------------


def _pair(ctx: Context) -> tuple[Checkpoint, Checkpoint] | CheckResult:
    if not ctx.has_base:
        return CheckResult.skipped("no --base-model given", needs=["--base-model"])
    return ctx.merged(), ctx.base()


def allowed_extra(merged: Checkpoint, base: Checkpoint) -> set[str]:
    """Tensors a merge may add: an untied output head when the base tied it and the merge unties."""
    base_tied = (base.config or {}).get("tie_word_embeddings", TIE_DEFAULT)
    merged_tied = (merged.config or {}).get("tie_word_embeddings", TIE_DEFAULT)
    if base_tied and not merged_tied:
        return {n for n in merged.tensors if n.endswith(OUTPUT_HEADS)} - set(base.tensors)
    return set()


def check_same_names(ctx: Context) -> CheckResult:
    """The merged checkpoint holds exactly the base's tensor names."""
    pair = _pair(ctx)
    if isinstance(pair, CheckResult):
        return pair
    merged, base = pair
    missing = sorted(set(base.tensors) - set(merged.tensors))
    extra = sorted(set(merged.tensors) - set(base.tensors) - allowed_extra(merged, base))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing from the merge: {_first(missing)}")
        if extra:
            parts.append(f"{len(extra)} extra tensor(s) not in the base: {_first(extra)}")
        hint = _layout_hint(base, extra) or _layout_hint(merged, missing)
        return CheckResult.failed(hint + "; ".join(parts), missing=missing, extra=extra)
    return CheckResult.passed(f"same {len(base.tensors)} tensor names as the base")


def _layout_hint(per_expert: Checkpoint, names: list[str]) -> str:
    """Why names differ when one checkpoint stores MoE experts fused and the other per expert."""
    model_type = str((per_expert.config or {}).get("model_type") or "")
    layout = StoredLayout(per_expert.tensors, model_type)
    stacked = [n for n in names if any(p.expert is not None for p in layout.pieces(n))]
    if not stacked:
        return ""
    return (
        f"{stacked[0]!r} is the other checkpoint's per-expert tensors fused into one: one"
        " checkpoint stores the MoE experts fused (transformers 5 with"
        " save_original_format=False), the other per expert; save both in the same layout. "
    )


def check_same_shapes(ctx: Context) -> CheckResult:
    """Every shared tensor has the base's shape, or rows the adapter explains (grown vocab)."""
    pair = _pair(ctx)
    if isinstance(pair, CheckResult):
        return pair
    merged, base = pair
    grown = growth(ctx)
    changed = [
        (n, base.tensors[n].shape, merged.tensors[n].shape)
        for n in sorted(set(base.tensors) & set(merged.tensors))
        if base.tensors[n].shape != merged.tensors[n].shape and n not in grown.explained
    ]
    if changed:
        name, was, now = changed[0]
        why = grown.unexplained.get(name)
        return CheckResult.failed(
            f"{len(changed)} tensor(s) changed shape; {name!r}: base {list(was)}, merged"
            f" {list(now)}" + (f" -- {why}" if why else ""),
            [f"{n}: {list(a)} -> {list(b)}" for n, a, b in changed[:10]],
        )
    if grown.explained:
        return CheckResult.passed(
            "all shapes equal to the base but rows the adapter explains (a vocabulary grown"
            f" before training): {grown.describe()}"
        )
    return CheckResult.passed("all shapes equal to the base")


def check_same_dtypes(ctx: Context) -> CheckResult:
    """Every shared tensor has the base's dtype (a silent upcast doubles the size)."""
    pair = _pair(ctx)
    if isinstance(pair, CheckResult):
        return pair
    merged, base = pair
    changed = [
        (n, base.tensors[n].dtype, merged.tensors[n].dtype)
        for n in sorted(set(base.tensors) & set(merged.tensors))
        if base.tensors[n].dtype != merged.tensors[n].dtype
    ]
    if changed:
        name, was, now = changed[0]
        return CheckResult.failed(
            f"{len(changed)} tensor(s) changed dtype; {name!r}: base {was}, merged {now}"
            " (silent upcast? save with the base's torch_dtype)",
            [f"{n}: {a} -> {b}" for n, a, b in changed[:10]],
        )
    return CheckResult.passed("all dtypes equal to the base")


def check_parameter_count(ctx: Context) -> CheckResult:
    """The merged model has as many parameters as the base (an untied head excepted)."""
    pair = _pair(ctx)
    if isinstance(pair, CheckResult):
        return pair
    merged, base = pair
    extra = allowed_extra(merged, base)
    added = _grown_elements(ctx, merged)
    count = merged.parameter_count - sum(merged.tensors[n].numel for n in extra) - added
    if count != base.parameter_count:
        return CheckResult.failed(
            f"parameter count {count:,} differs from the base's {base.parameter_count:,}"
            f" by {count - base.parameter_count:+,}",
            merged=count,
            base=base.parameter_count,
        )
    note = f" (plus an untied output head of {merged.parameter_count - count - added:,})" if (
        extra) else ""
    if added:
        note += f" (plus {added:,} in rows the adapter explains: {growth(ctx).describe()})"
    return CheckResult.passed(f"{count:,} parameters, as the base{note}", parameters=count)


def _grown_elements(ctx: Context, merged: Checkpoint, nbytes: bool = False) -> int:
    """Elements (or bytes) the explained growths add to the merged checkpoint."""
    total = 0
    for name, grown in growth(ctx).explained.items():
        info = merged.tensors[name]
        per_row = (info.nbytes if nbytes else info.numel) // max(grown.rows, 1)
        total += per_row * grown.extra_rows
    return total


def check_size_invariant(ctx: Context) -> CheckResult:
    """Merged files are the base's size up to header slack: the expected outcome of a merge."""
    pair = _pair(ctx)
    if isinstance(pair, CheckResult):
        return pair
    merged, base = pair
    extra = allowed_extra(merged, base)
    added = _grown_elements(ctx, merged, nbytes=True)
    merged_data = merged.data_bytes - sum(merged.tensors[n].nbytes for n in extra) - added
    headers = sum(8 + f.header_size for f in merged.files) + sum(
        8 + f.header_size for f in base.files
    )
    diff = merged.file_bytes - base.file_bytes
    figures = dict(
        merged_bytes=merged.file_bytes,
        base_bytes=base.file_bytes,
        merged_data_bytes=merged_data,
        base_data_bytes=base.data_bytes,
        header_slack=headers,
    )
    if merged_data != base.data_bytes:
        ratio = merged_data / base.data_bytes if base.data_bytes else float("inf")
        return CheckResult.failed(
            f"merged tensor data is {_human(merged_data)}, the base's {_human(base.data_bytes)}"
            f" ({ratio:.2f}x): a merge must not change the size of the weights",
            metrics=figures,
        )
    untied = (
        f" plus an untied head of {_human(merged.data_bytes - merged_data - added)}" if extra
        else ""
    )
    if added:
        untied += f" plus {_human(added)} in rows the adapter explains ({growth(ctx).describe()})"
    return CheckResult.passed(
        f"same size as the base: {_human(merged_data)} of tensors{untied}, files differ by"
        f" {diff:+} header bytes. Expected: a LoRA merge adds scale*B@A into existing weights",
        **figures,
    )


def _config_pair(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]] | CheckResult:
    if not ctx.has_base:
        return CheckResult.skipped("no --base-model given", needs=["--base-model"])
    merged, base = ctx.merged(), ctx.base()
    if base.config is None:
        return CheckResult.skipped("the base folder has no config.json")
    if merged.config is None:
        return CheckResult.failed(
            "the merged folder has no config.json: transformers cannot load it"
        )
    return merged.config, base.config


def check_config(ctx: Context) -> CheckResult:
    """``config.json`` means the base's, up to allowed keys (dtype, tying, vocab, provenance...).

    Both files are read through transformers' config class for their ``model_type`` (see
    :mod:`harness.io.configs`), so a base written by transformers 4 and a merge saved by
    transformers 5 compare by meaning, not spelling.
    """
    pair = _config_pair(ctx)
    if isinstance(pair, CheckResult):
        return pair
    merged, base = pair
    extra = ctx.settings.config.config_allow
    allowed = CONFIG_ALLOWED | CONFIG_PROVENANCE | extra
    comparison = compare_configs(base, merged, allowed)
    how = (
        f"read as {comparison.read_as}" if comparison.read_as
        else f"compared as written: {comparison.note or 'no common config class'}"
    )
    if comparison.changes:
        first = comparison.changes[0]
        return CheckResult.failed(
            f"config.json differs from the base in {len(comparison.changes)} key(s) outside the"
            f" allow-list; {first.describe()} ({how})",
            [change.describe() for change in comparison.changes[:10]],
            keys=[change.key for change in comparison.changes],
        )
    written = sorted(k for k in set(merged) | set(base) if merged.get(k) != base.get(k))
    groups = [
        ("allowed changes", [k for k in written if k in CONFIG_ALLOWED | extra]),
        ("provenance keys", [k for k in written if k in CONFIG_PROVENANCE]),
        ("spelled differently, same meaning",
         [k for k in written if k not in allowed]),
    ]
    notes = "".join(f"; {label}: {', '.join(keys)}" for label, keys in groups if keys)
    return CheckResult.passed(f"config.json matches the base ({how}{notes})")


def check_tied_embeddings(ctx: Context) -> CheckResult:
    """``tie_word_embeddings`` agrees with the stored input and output embeddings."""
    merged = ctx.merged()
    if merged.config is None:
        return CheckResult.skipped("no config.json in the merged folder")
    tied = bool(merged.config.get("tie_word_embeddings", TIE_DEFAULT))
    inp = find_suffix(merged.tensors, INPUT_EMBEDDINGS)
    out = find_suffix(merged.tensors, OUTPUT_HEADS)
    if inp is None:
        return CheckResult.skipped("no recognisable input embedding tensor")
    if tied:
        if out is None:
            return CheckResult.passed(f"tied: only {inp!r} stored, shared as the output head")
        justified_sizes(ctx)
        same = merged.read_bytes(inp) == merged.read_bytes(out)
        if not same:
            return CheckResult.failed(
                f"config ties embeddings but {out!r} differs from {inp!r}: transformers will"
                f" re-tie on load and silently discard the merged {out!r}; set"
                " tie_word_embeddings=false",
            )
        return CheckResult.passed(f"tied, and {out!r} equals {inp!r}")
    if out is None:
        return CheckResult.failed(
            f"config unties embeddings but no output head is stored (only {inp!r}):"
            " transformers will initialise a random head"
        )
    return CheckResult.passed(f"untied: {inp!r} and {out!r} stored separately")


def checks(settings: Settings) -> list[Check]:
    """The structure family."""
    spec = [
        ("loads", check_loads, "opens as safetensors; pickle refused"),
        ("index_valid", check_index, "index lists exactly the shards present; totals agree"),
        ("no_adapter_leftovers", check_no_leftovers, "no lora_/base_layer/modules_to_save keys"),
        ("all_finite", check_finite, "no NaN or Inf"),
        ("same_tensor_names", check_same_names, "same tensor names as the base"),
        ("same_shapes", check_same_shapes, "same shapes as the base"),
        ("same_dtypes", check_same_dtypes, "same dtypes as the base"),
        ("parameter_count", check_parameter_count, "same parameter count as the base"),
        ("size_invariant", check_size_invariant, "same size as the base up to header slack"),
        ("config_allowlist", check_config, "config.json differs only in allowed keys"),
        ("tied_embeddings", check_tied_embeddings, "tying in config agrees with the weights"),
    ]
    reports = {"loads": frozenset({"merged"}), "same_tensor_names": frozenset({"base"})}
    return [
        Check(Family.STRUCTURE, name, doc, run, reports.get(name, frozenset()),
              streamed=name == "all_finite")
        for name, run, doc in spec
    ]

