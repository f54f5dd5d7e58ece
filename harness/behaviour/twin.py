"""The twin: a correct merge of the unmerged adapter model, rounded to the stored dtype, per layer.

The twin has A's structure (``PeftModel`` on the base). Each unit is merged by peft as it is
read: every adapter layer in it merges its delta into the freshly read base weight, and the
merged weight is rounded to the stored dtype and back, as saving the merge would. Adapter
weights that a merge stores as they are (``modules_to_save`` copies) are rounded once, when the
twin is built. Its deviation from the reference is the noise a correct merge brings, including
the one rounding the adapter model never does (see ``behaviour.measure``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError, one_line
from harness.forward.stream import Transform
from harness.forward.units import Unit

if TYPE_CHECKING:
    import torch


def _merge_plain_lora(layer: Any) -> bool:
    """Merge a plain LoRA ``Linear`` layer in one fused pass, marking it merged for peft.

    peft's own merge makes the delta, scales it, checks it for NaN and adds it: four passes
    over every weight. ``W + s * B @ A`` in one ``addmm`` is the same sum. Layers with a variant
    (DoRA), a LoRA bias or transposed weights are left to peft. Returns whether it merged.
    """
    import torch
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear) or layer.fan_in_fan_out:
        return False
    names = list(layer.active_adapters)
    if len(names) != 1 or names[0] not in layer.lora_A:
        return False
    name = names[0]
    if name in getattr(layer, "lora_variant", {}) or layer.lora_bias.get(name, False):
        return False
    base = layer.get_base_layer()
    if not isinstance(base, torch.nn.Linear):
        return False
    weight = base.weight
    lora_b, lora_a = layer.lora_B[name].weight, layer.lora_A[name].weight
    assert isinstance(lora_b, torch.Tensor) and isinstance(lora_a, torch.Tensor)
    scale = float(layer.scaling[name])
    if weight.dtype == torch.float32:
        # (out, in) += s * (out, r) @ (r, in) in place: the same gemm as addmm (beta = 1) on the
        # freshly read weight, without a second weight-sized buffer (180 MB per matrix at 7B)
        weight.data.addmm_(lora_b.float(), lora_a.float(), alpha=scale)
    else:
        # accumulated in float32 as peft does on a CPU, then back to the compute dtype
        merged = torch.addmm(weight.float(), lora_b.float(), lora_a.float(), alpha=scale)
        weight.data = merged.to(weight.dtype)
    layer.merged_adapters.append(name)
    return True


def _round(tensor: torch.Tensor, stored: torch.dtype) -> None:
    """Round ``tensor``'s values to ``stored`` and back, in place (one stored-size buffer)."""
    if tensor.dtype != stored and tensor.is_floating_point():
        tensor.data.copy_(tensor.data.to(stored))


def merge_unit(stored: torch.dtype) -> Transform:
    """The twin's per-unit step: merge every adapter layer of the unit, round what it wrote.

    Runs on a freshly read unit, whose base weights are new tensors: peft's ``safe_merge``
    writes merged copies, so nothing read is modified in place.
    """

    def transform(unit: Unit) -> None:
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer in unit.module.modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            layer.merged_adapters.clear()
            with torch.no_grad():
                if not _merge_plain_lora(layer):
                    try:
                        layer.merge(safe_merge=True)
                    except (ValueError, RuntimeError) as exc:  # peft refuses a NaN merge
                        raise HarnessError(
                            "peft cannot merge the adapter into the base:"
                            f" {one_line(exc, whole=True)}"
                        ) from None
                base = layer.get_base_layer()
                for parameter in base._parameters.values():
                    if parameter is not None:
                        _round(parameter, stored)

    return transform


def round_saved(model: Any, stored: torch.dtype) -> None:
    """Round the adapter weights a merge stores as they are (``modules_to_save`` copies)."""
    from peft.utils.other import ModulesToSaveWrapper

    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for copy in module.modules_to_save.values():
                for parameter in copy.parameters():
                    if parameter.device.type != "meta":
                        _round(parameter, stored)
