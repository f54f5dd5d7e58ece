"""The twin: a correct merge of the unmerged adapter model, rounded to the stored dtype.

Its deviation from the reference is the noise a correct merge brings, including the one rounding
the adapter model never does, that of the merged weights themselves (see ``behaviour.measure``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError, one_line
from harness.io.models import quiet

if TYPE_CHECKING:
    import torch


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
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

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
        raise HarnessError(
            f"peft cannot merge the adapter into the base: {one_line(exc, whole=True)}"
        ) from None
    _round_to(merged, stored, shared)
    if [p._version for p in originals] != versions:
        raise HarnessError("internal error: merging the twin wrote into the adapter model")
    return merged

