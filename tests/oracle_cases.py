"""Tiny real merges and fault injectors shared by the oracle, diagnosis, merger and CLI tests.

Everything is real: transformers models saved with ``save_pretrained``, peft adapters saved by
peft (with random non-zero weights), merges by peft's ``merge_and_unload`` and by our streaming
merger. Faults are injected into a correct merged checkpoint with plain torch arithmetic on the
adapter's raw tensors, independent of the delta registry under test.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.checks.weights import checks as weight_checks
from harness.io.adapter import Adapter
from harness.io.checkpoint import Checkpoint
from harness.merger import merge_checkpoint
from harness.oracle.stream import OracleResult, run_oracle
from harness.run.context import Context
from harness.run.result import CheckResult
from harness.run.runner import run_check
from harness.run.settings import Settings
from harness.tiny import build_adapter, build_base, peft_merge

PREFIX = "base_model.model."


def _key(**kwargs: Any) -> str:
    return hashlib.sha1(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_peft_adapter(base: Path, folder: Path, config: Any, seed: int = 1, scale: float = 0.5):
    """Any peft config (IA3, LoHa, LoKr, ...) on ``base``, with random non-zero weights."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(param + noise.to(param.dtype))
    peft_model.save_pretrained(folder)
    return folder


class Workshop:
    """Builds and caches tiny bases, adapters and merges for one test session."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def base(self, arch: str = "llama", dtype: str = "BF16", shard: str | None = None) -> Path:
        """A tiny random base model."""
        folder = self.root / f"base-{arch}-{dtype}-{shard or 'single'}"
        if not folder.exists():
            build_base(folder, arch, dtype, max_shard_size=shard)
        return folder

    def adapter(self, base: Path, seed: int = 1, **lora: Any) -> Path:
        """A LoRA adapter (``lora`` -> LoraConfig) with random non-zero weights."""
        folder = self.root / f"lora-{base.name}-{seed}-{_key(**lora)}"
        if not folder.exists():
            build_adapter(base, folder, seed=seed, **lora)
        return folder

    def other_adapter(self, base: Path, peft_type: str, seed: int = 1, **config: Any) -> Path:
        """An IA3/LOHA/LOKR adapter."""
        import peft

        folder = self.root / f"{peft_type.lower()}-{base.name}-{seed}-{_key(**config)}"
        if not folder.exists():
            cls = {"IA3": peft.IA3Config, "LOHA": peft.LoHaConfig, "LOKR": peft.LoKrConfig}
            build_peft_adapter(base, folder, cls[peft_type](**config), seed=seed, scale=0.3)
        return folder

    def peft(self, base: Path, adapter: Path) -> Path:
        """peft's merge_and_unload + save_pretrained."""
        folder = self.root / f"peft-{adapter.name}"
        if not folder.exists():
            peft_merge(base, adapter, folder)
        return folder

    def ours(self, base: Path, adapter: Path | list[Path], **kwargs: Any) -> Path:
        """The streaming merger's output."""
        adapters = adapter if isinstance(adapter, list) else [adapter]
        name = "+".join(a.name for a in adapters)
        folder = self.root / f"ours-{_key(name=name, base=base.name, **kwargs)}"
        if not folder.exists():
            merge_checkpoint(base, adapters, folder, progress=False, **kwargs)
        return folder

    def folder(self, name: str) -> Path:
        """A fresh folder for a test's own output."""
        folder = self.root / "scratch" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        return folder


@pytest.fixture(scope="session")
def workshop(tmp_path_factory: pytest.TempPathFactory) -> Workshop:
    """The session's cache of tiny bases, adapters and merges."""
    return Workshop(tmp_path_factory.mktemp("oracle-workshop"))


# ---- running the oracle and the checks ------------------------------------------------------


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


def failures(result: OracleResult) -> list[str]:
    """``name: diagnosis`` of every failing tensor."""
    return [f"{t.name}: {t.diagnosis}" for t in result.tensors if not t.ok]


# ---- raw adapter math (independent of harness.deltas) ---------------------------------------


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


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


def write_faulty(merged: Path, out: Path, replace: Mapping[str, torch.Tensor]) -> Path:
    """Copy ``merged`` to ``out`` with some tensors replaced (cast to their stored dtype)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(merged, out)
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(file)
        if not set(tensors) & set(replace):
            continue
        for name in set(tensors) & set(replace):
            tensors[name] = replace[name].to(tensors[name].dtype).contiguous()
        save_file(tensors, file, metadata=metadata)
    return out


def rounded(w: torch.Tensor, *deltas: torch.Tensor) -> torch.Tensor:
    """``w`` plus each delta, rounded to ``w``'s dtype after every addition (a real merge)."""
    value = w
    for delta in deltas:
        value = (value.float() + delta).to(w.dtype)
    return value


