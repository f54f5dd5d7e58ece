"""The fast perplexity gate (no lm-eval): merged vs unmerged adapter model on a local text file.

The text is tokenized once and cut into equal windows of ``window`` tokens (the model's context,
at most 512, by default; at most ``max_tokens`` tokens in all). Each model scores every window;
the per-token negative log-likelihood averaged over a window is one paired observation, so the
log of the perplexity ratio ``log(ppl_merged / ppl_adapter)`` is the mean paired difference,
with a Student's t interval over the windows. The gate passes when the whole interval of the
ratio lies within ``[1 / max_ratio, max_ratio]`` (a correct merge matches its adapter model in
either direction), fails when it lies entirely outside, and is inconclusive otherwise. With
``max_base_ratio`` the merged model must also not be worse than the base by more than that
ratio (one-sided). The models are streamed layer by layer, one at a time, within the memory
budget (``--merge-memory``), in the comparison dtype of the behaviour checks (``--merge-dtype``,
else chosen for the CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from typing import Any

from harness.dtypes import to_torch
from harness.errors import HarnessError, one_line
from harness.evals.intervals import Interval, mean_interval
from harness.evals.stats import Paired, Summary, pair, summarize
from harness.evals.tokenizer import model_limits, resolve
from harness.forward.build import Recipe, build_streamed
from harness.forward.compute import default_compute
from harness.forward.pool import Pool, activation_bytes
from harness.forward.stream import StreamedModel
from harness.io.files import read_bounded
from harness.io.models import read_config
from harness.offline import enforce_offline
from harness.run.context import Context, Key
from harness.run.result import Outcome
from harness.stream.hashing import hash_file

#: Default upper bound of the window (tokens).
MAX_WINDOW = 512
#: The largest perplexity text read: far beyond any ``max_tokens`` worth scoring on a CPU.
MAX_TEXT_BYTES = 64 * 1024 * 1024


def windows(ids: list[int], window: int, max_tokens: int) -> list[list[int]]:
    """Equal windows of ``window`` tokens from the first ``max_tokens`` ids.

    A shorter tail is dropped (it would weigh its tokens differently) unless it is all there is.
    """
    ids = ids[:max_tokens]
    full = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]
    if full:
        return full
    return [ids] if len(ids) >= 2 else []


PERPLEXITY_POOL: Key[Pool] = Key("perplexity:pool")


def compute_dtype(ctx: Context) -> str:
    """The dtype the perplexity passes run in: ``--merge-dtype``, else chosen for the CPU."""
    if ctx.settings.dtype:
        return ctx.settings.dtype
    sizes: dict[str, int] = {}
    for info in ctx.merged().tensors.values():
        sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    floating = {d: n for d, n in sizes.items() if d in ("F64", "F32", "BF16", "F16")}
    stored = max(floating, key=lambda d: floating[d]) if floating else "F32"
    return default_compute(stored, ctx.settings.device)


def _load(ctx: Context, model: str, pool: Pool) -> StreamedModel:
    """One of the models, streamed layer by layer within the run's memory budget."""
    options = ctx.settings
    if model == "merged":
        assert options.merged is not None
        recipe = Recipe(options.merged, ctx.merged(), "CAUSAL_LM", "the merged model")
    elif model == "base":
        if options.base is None:
            raise HarnessError("perplexity.max_base_ratio needs the base model: pass --base-model")
        recipe = Recipe(options.base, ctx.base(), "CAUSAL_LM", "the base model")
    else:
        if options.base is None or options.adapter is None:
            raise HarnessError(
                "the perplexity gate compares with the unmerged adapter model: pass --adapter"
            )
        recipe = Recipe(
            options.base, ctx.base(), "CAUSAL_LM", "the adapter model", adapter=options.adapter
        )
    recipe = dataclasses.replace(recipe, trust_remote_code=options.trust_remote_code)
    streamed, _ = build_streamed(
        recipe, to_torch(compute_dtype(ctx)), device=options.device, pool=pool, keep=False
    )
    return streamed


def rows_per_pass(config: dict[str, Any], window: int, windows: int, budget: int) -> int:
    """How many windows one pass scores (each pass reads every weight once).

    All of them, or as many as a quarter of the budget holds in activations.
    """
    rows = max(1, windows)
    while rows > 1 and activation_bytes(config, rows, window) > budget // 4:
        rows = (rows + 1) // 2
    return rows


def window_nll(model: Any, chunks: list[list[int]], device: str, per_pass: int = 8) -> list[float]:
    """Mean per-token negative log-likelihood of each window under ``model``."""
    import torch

    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(chunks), per_pass):
            batch = chunks[start : start + per_pass]
            width = max(len(c) for c in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, chunk in enumerate(batch):
                ids[row, : len(chunk)] = torch.tensor(chunk)
                mask[row, : len(chunk)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
            targets = ids[:, 1:]  # (B, T-1)
            nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            valid = mask[:, 1:].float()
            per_window = (nll * valid).sum(dim=1) / valid.sum(dim=1)  # (B,)
            out.extend(float(v) for v in per_window.cpu())
    return out


def tokenize(ctx: Context) -> tuple[list[list[int]], str]:
    """The text's equal windows of token ids, and the fingerprint of what they depend on."""
    from transformers import AutoTokenizer

    gate = ctx.settings.config
    assert gate is not None and gate.perplexity is not None
    cfg = gate.perplexity
    folder, tokenizer_print = resolve(ctx)
    assert ctx.settings.merged is not None
    vocab, positions = model_limits(ctx.settings.merged)
    window = cfg.window or min(MAX_WINDOW, positions)
    if window > positions:
        raise HarnessError(f"perplexity.window {window} exceeds the model's context of {positions}")
    # The file the configuration names: a regular file of bounded size (a pipe would block the
    # run, /dev/zero would fill memory); a symlink may lead anywhere, as for any named file.
    data = read_bounded(cfg.text, MAX_TEXT_BYTES, what="perplexity text", confined=False)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HarnessError(f"perplexity.text {cfg.text}: not UTF-8 text: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # a broken tokenizer file is bad input, named as such
        raise HarnessError(f"tokenizer {folder}: cannot load: {one_line(exc)}") from None
    # The whole text is tokenized once and cut into windows below; silence the length warning.
    tokenizer.model_max_length = sys.maxsize
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if vocab and ids and max(ids) >= vocab:
        raise HarnessError(
            f"tokenizer {folder} produces id {max(ids)} but the model has only {vocab} tokens"
        )
    chunks = windows(ids, window, cfg.max_tokens)
    if not chunks:
        raise HarnessError(f"perplexity.text {cfg.text}: fewer than 2 tokens")
    payload = {
        "text": hash_file(cfg.text),
        "window": window,
        "max_tokens": cfg.max_tokens,
        "tokenizer": tokenizer_print,
        "dtype": compute_dtype(ctx),
        "models": list(cfg.models),
    }
    fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return chunks, fingerprint


def evaluate(ctx: Context, chunks: list[list[int]], models: tuple[str, ...]) -> dict[str, Any]:
    """Score the windows with each model in turn; return the evidence (sufficient statistics).

    Each model is streamed layer by layer within ``--merge-memory`` (``harness.forward``) and
    released before the next is built; the windows go through in as few passes as the budget's
    activations allow.
    """
    assert ctx.settings.merged is not None
    config = read_config(ctx.settings.merged)
    window = max(len(c) for c in chunks)
    pool = ctx.memo(PERPLEXITY_POOL, lambda: Pool(ctx.settings.device, ctx.settings.memory))
    per_pass = rows_per_pass(config, window, len(chunks), pool.budget)
    pool.set_reserve(activation_bytes(config, per_pass, window))
    per_model: dict[str, dict[int, float]] = {}
    restore = enforce_offline()
    try:
        for model in models:
            loaded = _load(ctx, model, pool)
            try:
                scores = window_nll(loaded, chunks, ctx.settings.device, per_pass)
            finally:
                loaded.release()
            per_model[model] = dict(enumerate(scores))
    finally:
        restore()
    evidence: dict[str, Any] = {
        "models": {m: summarize(list(v.values())).to_json() for m, v in per_model.items()},
        "pairs": {
            other: pair(per_model["merged"], per_model[other]).to_json()
            for other in models
            if other != "merged"
        },
        "tokens": sum(len(c) - 1 for c in chunks),
    }
    return evidence


def _ratio_interval(paired: Paired, confidence: float) -> Interval:
    interval = mean_interval(paired.n, paired.mean, paired.sd, confidence)
    return Interval(math.exp(interval.estimate), _exp(interval.low), _exp(interval.high))


def _exp(x: float) -> float:
    if x == math.inf:
        return math.inf
    if x == -math.inf:
        return 0.0
    return math.exp(min(x, 700.0))


def judge(
    evidence: dict[str, Any], max_ratio: float, max_base_ratio: float | None, confidence: float
) -> tuple[Outcome, str, list[str], dict[str, Any]]:
    """Apply the ratio thresholds to the evidence (pure)."""
    models = {m: Summary.from_json(s) for m, s in evidence["models"].items()}
    ppl = {m: math.exp(s.mean) for m, s in models.items()}
    ratio = _ratio_interval(Paired.from_json(evidence["pairs"]["adapter"]), confidence)
    low_bound = 1.0 / max_ratio
    span = f"[{ratio.low:.6f}, {ratio.high:.6f}]"
    if low_bound <= ratio.low and ratio.high <= max_ratio:
        outcome, verdict = Outcome.PASSED, f"within [{low_bound:.4g}, {max_ratio:.4g}]"
    elif ratio.low > max_ratio or ratio.high < low_bound:
        outcome, verdict = Outcome.FAILED, f"outside [{low_bound:.4g}, {max_ratio:.4g}]"
    else:
        outcome, verdict = Outcome.INCONCLUSIVE, f"straddles [{low_bound:.4g}, {max_ratio:.4g}]"
    parts = [
        f"perplexity merged {ppl['merged']:.5g} vs adapter {ppl['adapter']:.5g}:"
        f" ratio {ratio.estimate:.6f} {span} {verdict}"
    ]
    details = [f"adapter ratio: {outcome.value}: {ratio.estimate:.6g} {span}"]
    figures: dict[str, Any] = {
        "perplexity": {m: round(v, 6) for m, v in ppl.items()},
        "ratio": ratio.to_json(),
        "max_ratio": max_ratio,
    }
    outcomes = [outcome]
    if max_base_ratio is not None and "base" in evidence["pairs"]:
        base = _ratio_interval(Paired.from_json(evidence["pairs"]["base"]), confidence)
        if base.high <= max_base_ratio:
            base_outcome = Outcome.PASSED
        elif base.low > max_base_ratio:
            base_outcome = Outcome.FAILED
        else:
            base_outcome = Outcome.INCONCLUSIVE
        outcomes.append(base_outcome)
        parts.append(
            f"vs base {ppl['base']:.5g}: ratio {base.estimate:.5g} (max {max_base_ratio:.4g})"
        )
        details.append(
            f"base ratio: {base_outcome.value}: {base.estimate:.6g}"
            f" [{base.low:.5g}, {base.high:.5g}]"
        )
        figures["base_ratio"] = base.to_json()
        figures["max_base_ratio"] = max_base_ratio
    if Outcome.FAILED in outcomes:
        final = Outcome.FAILED
    elif Outcome.INCONCLUSIVE in outcomes:
        final = Outcome.INCONCLUSIVE
    else:
        final = Outcome.PASSED
    figures["windows"] = models["merged"].n
    figures["tokens"] = evidence.get("tokens")
    return final, "; ".join(parts) + f" over {models['merged'].n} windows", details, figures
