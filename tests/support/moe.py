"""A tiny mixture-of-experts merge: a base, an adapter on its experts, router and q_proj, and
peft's merge (shared by the MoE weight, behaviour and layer tests)."""

from __future__ import annotations

from pathlib import Path

from harness.tiny import build_adapter, build_base, peft_merge
from harness.tiny_configs import MOE_PARAMETERS


class Moe:
    """A tiny MoE base, an adapter on its experts, router and q_proj, and peft's merge."""

    def __init__(self, root: Path, arch: str, **lora) -> None:
        self.arch = arch
        self.base = build_base(root / "base", arch, "BF16")
        options = {"target_modules": ["q_proj"], "target_parameters": list(MOE_PARAMETERS[arch]),
                   "r": 2, "lora_alpha": 4, **lora}
        self.adapter = build_adapter(self.base, root / "adapter", **options)
        self.merged = peft_merge(self.base, self.adapter, root / "merged")
        self.root = root
