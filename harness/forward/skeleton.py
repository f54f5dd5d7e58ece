"""Models without weights: transformers builds the architecture, peft adds the adapter.

:func:`build_model` makes the task's model class from a folder's config on the meta device (the
modules and their code, no weight memory; buffers such as rotary frequencies are real).
:func:`attach_adapter` wraps such a model with ``PeftModel.from_pretrained``, peft's own loading,
so the adapter's layers, names and dtypes are exactly peft's. Nothing is written anywhere: the
base is never a disk-offloaded transformers model, whose peft loading would rewrite the touched
shards into ``-peft`` copies relative to the working directory.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError, one_line
from harness.io.models import AUTO_CLASSES, auto_class, quiet, read_config, refuse_remote_code

if TYPE_CHECKING:
    import torch


class NoTextPath(HarnessError):
    """The model class has no forward pass on token ids alone (a skip, not a failure)."""


@dataclass(frozen=True)
class Slot:
    """One weight of a skeleton: the module that owns it, its attribute and its name.

    ``name`` is the parameter's name in the plain transformers model (what the weight plan
    uses); ``meta`` the meta-device parameter put back when the weight is released.
    """

    module: Any
    attr: str
    name: str
    meta: Any


def model_class(task: str, config: dict[str, Any]) -> Any:
    """The class a user loads ``config`` with for ``task``.

    The task's auto class, except for models whose ``architectures`` names a transformers
    ``*ForConditionalGeneration`` class (vision-language models, encoder-decoders such as T5,
    BART or Whisper): that class itself, the one the checkpoint was saved from.
    """
    import transformers

    for name in config.get("architectures") or []:
        if (
            isinstance(name, str)
            and name.endswith("ForConditionalGeneration")
            and task in ("CAUSAL_LM", "SEQ_2_SEQ_LM")
        ):
            found = getattr(transformers, name, None)
            if found is not None:
                return found
    if task not in AUTO_CLASSES:
        return auto_class(task)  # raises the one-line "not supported" error
    return auto_class(task)


def _has_experts_choice() -> bool:
    """Whether this transformers lets a model choose its MoE experts' implementation."""
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "get_correct_experts_implementation")


def _require_text_path(model: Any) -> None:
    forward = getattr(model, "forward", None)
    parameters = inspect.signature(forward).parameters if forward is not None else {}
    if "input_ids" not in parameters:
        needs = [p for p in ("pixel_values", "input_features", "input_values") if p in parameters]
        raise NoTextPath(
            f"{type(model).__name__} has no forward pass on token ids alone (it takes"
            f" {', '.join(needs) or 'other inputs'}): transformers gives it no text path"
        )


def build_model(
    folder: Path,
    task: str,
    *,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    head: dict[str, Any] | None = None,
) -> Any:
    """The model of ``folder``'s config for ``task``, on the meta device, in eval mode.

    ``head`` overrides config keys of a classification head (labels, pad id), as loading the
    base for a classification adapter needs. Raises HarnessError with a one-line cause when
    transformers cannot build it.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    refuse_remote_code(folder, trust_remote_code)
    cls = model_class(task, read_config(folder))
    options: dict[str, Any] = {}
    if dtype == torch.float64 and _has_experts_choice():
        # the fused MoE kernels (grouped matmuls) have no float64: the model's eager experts
        # (a no-op for models without experts)
        options["experts_implementation"] = "eager"
    try:
        with quiet():
            config = AutoConfig.from_pretrained(
                folder, local_files_only=True, trust_remote_code=trust_remote_code, **(head or {})
            )
            with init_empty_weights():
                if hasattr(cls, "from_config"):
                    model = cls.from_config(
                        config, dtype=dtype, trust_remote_code=trust_remote_code, **options
                    )
                else:
                    model = cls._from_config(config, dtype=dtype, **options)
    except HarnessError:
        raise
    except Exception as exc:  # any construction error is the input's, reported in one line
        raise HarnessError(
            f"{folder}: transformers cannot build it as {cls.__name__}: {one_line(exc)}"
        ) from None
    _require_text_path(model)
    model.eval()
    return model


def slots(model: Any) -> list[Slot]:
    """Every meta-device weight of ``model`` (a plain transformers model), by owner and name.

    A module reachable by several paths (an embedding shared by an encoder and a decoder) is
    listed once, under its first name, as transformers names its parameters.
    """
    found: list[Slot] = []
    for prefix, module in model.named_modules():
        for attr, parameter in module._parameters.items():
            if parameter is not None and parameter.device.type == "meta":
                name = f"{prefix}.{attr}" if prefix else attr
                found.append(Slot(module, attr, name, parameter))
    return found


def _match_saved_copies(model: Any) -> None:
    """Cast each ``modules_to_save`` copy to its original module's dtype.

    peft makes the copy from the base module and copies the saved values into it, in the
    base's dtype; its low-memory loading assigns the saved tensors as they are instead.
    """
    from peft.utils.other import ModulesToSaveWrapper

    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        dtypes = {p.dtype for p in module.original_module.parameters() if p.is_floating_point()}
        if len(dtypes) != 1:
            continue
        dtype = dtypes.pop()
        for copy in module.modules_to_save.values():
            for parameter in copy.parameters():
                if parameter.is_floating_point() and parameter.dtype != dtype:
                    parameter.data = parameter.data.to(dtype)


def attach_adapter(model: Any, adapter: Path, device: str) -> Any:
    """``PeftModel.from_pretrained`` on a meta-device ``model``: the adapter real, the base meta.

    peft moves each adapter layer to its base layer's device; on the meta device that would drop
    the adapter's values. So while peft loads, every base weight is a zero-size placeholder on
    ``device`` (a scalar expanded to the weight's shape: no memory, never written, since peft's
    low-memory loading assigns what it loads), and the meta weights are put back after.
    """
    import torch
    from peft import PeftModel

    owned = slots(model)
    target = torch.device(device)
    for slot in owned:
        placeholder = torch.zeros((), dtype=slot.meta.dtype, device=target).expand(slot.meta.shape)
        slot.module._parameters[slot.attr] = torch.nn.Parameter(placeholder, requires_grad=False)
    try:
        with quiet():
            wrapped = PeftModel.from_pretrained(
                model, adapter, is_trainable=False, low_cpu_mem_usage=True
            )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise HarnessError(
            f"{adapter}: peft cannot apply it to the base: {one_line(exc, whole=True)}"
        ) from None
    finally:
        for slot in owned:
            slot.module._parameters[slot.attr] = slot.meta
    _match_saved_copies(wrapped)
    leftover = [
        name
        for name, p in wrapped.named_parameters()
        if p.device.type != "meta" and p.stride() and 0 in p.stride() and p.numel() > 1
    ]
    if leftover:
        raise HarnessError(
            f"internal error: peft kept base placeholders in the adapter model: {leftover[:3]}"
        )
    wrapped.eval()
    return wrapped
