"""Run the oracle and the weights checks on folders; raw LoRA math for injecting faults.

Faults are injected into a correct merged checkpoint with plain torch arithmetic on the
adapter's raw tensors (:func:`lora_deltas`, :func:`rounded`), independent of the delta registry
under test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from harness.checks.weights import checks as weight_checks
from harness.io.adapter import Adapter
from harness.io.checkpoint import Checkpoint
from harness.oracle.stream import OracleResult, run_oracle
from harness.run.context import Context
from harness.run.result import CheckResult
from harness.run.runner import run_check
from harness.run.settings import Settings

PREFIX = "base_model.model."


def oracle(merged: Path, base: Path, adapter: Path | list[Path], k: float = 1.0) -> OracleResult:
    """Run the oracle on three folders."""
    adapters = adapter if isinstance(adapter, list) else [adapter]
    result, _, _ = run_oracle(Checkpoint.open(merged), Checkpoint.open(base),
                              [Adapter.open(a) for a in adapters], k)
    return result


def weight_results(merged: Path, base: Path, adapter: Path, k: float = 1.0
                   ) -> dict[str, CheckResult]:
    """Every weights check's result, by check name."""
    ctx = Context(Settings(merged=merged, base=base, adapter=adapter, ulp_tolerance=k))
    return {c.name: run_check(c, ctx) for c in weight_checks(ctx.settings)}


def lora_deltas(adapter: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """tensor name -> fp32 LoRA delta in the stored orientation, computed from raw tensors."""
    from peft.utils.other import get_pattern_key

    config = json.loads((adapter / "adapter_config.json").read_text())
    raw = load_file(adapter / "adapter_model.safetensors")
    deltas: dict[str, torch.Tensor] = {}
    for key in raw:
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")]
        a = raw[key].float()
        b = raw[f"{PREFIX}{module}.lora_B.weight"].float()
        rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        r = rp.get(get_pattern_key(rp.keys(), module), config["r"])
        alpha = ap.get(get_pattern_key(ap.keys(), module), config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        delta = (b @ a) * scale
        name = module + ".weight"
        if config.get("fan_in_fan_out") or tuple(shapes[name]) != tuple(delta.shape):
            delta = delta.T  # Conv1D: stored (in, out)
        deltas[name] = delta.contiguous()
    return deltas


def rounded(w: torch.Tensor, *deltas: torch.Tensor) -> torch.Tensor:
    """``w`` plus each delta, rounded to ``w``'s dtype after every addition (a real merge)."""
    value = w
    for delta in deltas:
        value = (value.float() + delta).to(w.dtype)
    return value
