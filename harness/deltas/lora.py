"""The registry entry for ``peft_type == "LORA"``: plan one edit per LoRA module.

Which edit a module gets (``lowrank.LoraLinear``, ``LoraEmbedding``, ``LoraBias``, or
``dora.LoraDora``), in which orientation (``fan_in_fan_out``), and which LoRA variants are
refused by name because peft merges them with code of their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.architectures import CONV1D_MODEL_TYPES, CONV1D_MODULES
from harness.deltas.base import Edit, Target
from harness.deltas.dora import LoraDora
from harness.deltas.experts import plan_parameters
from harness.deltas.lowrank import LoraBias, LoraEmbedding, LoraLinear, LoraScale
from harness.deltas.tokens import token_rows
from harness.errors import AdapterError, UnsupportedAdapterError

if TYPE_CHECKING:
    from harness.io.adapter import Adapter

#: LoRA variants peft merges with code of their own that the registry does not reproduce.
UNSUPPORTED_VARIANTS = {
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
}
def fan_in_fan_out(
    target: Target, module: str, shape: tuple[int, ...], out_features: int, in_features: int
) -> bool:
    """Whether the base weight is stored ``(in, out)`` (transformers' ``Conv1D``).

    peft decides per module from its class (``Conv1D`` forces ``fan_in_fan_out=True``,
    ``nn.Linear`` forces False), whatever the config says. Without a model class the stored shape
    decides when it is not square; a square weight is a ``Conv1D`` exactly in the architectures
    that use one, for their projection modules.
    """
    direct = shape == (out_features, in_features)
    transposed = shape == (in_features, out_features)
    if direct and not transposed:
        return False
    if transposed and not direct:
        return True
    if not direct:
        raise AdapterError(
            f"adapter module {module!r}: the delta is {out_features}x{in_features} but the base"
            f" weight is {'x'.join(map(str, shape))}"
        )
    return target.model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_MODULES



class LoraType:
    """The registry entry for ``peft_type == "LORA"``."""

    peft_type = "LORA"

    def plan(self, adapter: Adapter, index: int, target: Target) -> list[Edit]:
        """One edit per LoRA module (and per ``lora_B.bias`` and trainable-token set)."""
        config = adapter.config
        for key, name in UNSUPPORTED_VARIANTS.items():
            if config.get(key):
                raise UnsupportedAdapterError(
                    f"adapter type LORA with {name} is not verifiable by merge-harness"
                )
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower() == "mica":
            raise UnsupportedAdapterError(
                "adapter type LORA with MiCA (init_lora_weights='mica') is not verifiable by"
                " merge-harness"
            )
        edits, covered = plan_parameters(adapter, index, target)
        for module, roles in sorted(adapter.layout.modules.items()):
            if module in covered:
                continue
            unknown = sorted(set(roles) - _LORA_ROLES)
            if unknown:
                raise AdapterError(
                    f"adapter module {module!r}: unexpected tensor {unknown[0]} in a LORA adapter"
                )
            if "trainable_tokens_delta" in roles:
                edits += token_rows(adapter, index, target, module, roles["trainable_tokens_delta"],
                                    config.get("trainable_token_indices"))
            edits += self._module(adapter, index, target, module, roles)
        return edits

    def _module(
        self, adapter: Adapter, index: int, target: Target, module: str, roles: dict[str, str]
    ) -> list[Edit]:
        scale = LoraScale(adapter.config, module, matcher=adapter.patterns)
        edits: list[Edit] = []
        if "lora_A" in roles or "lora_B" in roles:
            if "lora_A" not in roles or "lora_B" not in roles:
                raise AdapterError(
                    f"adapter module {module!r}: lora_A without lora_B or vice versa"
                )
            a_key, b_key, embedding = roles["lora_A"], roles["lora_B"], False
        elif "lora_embedding_A" in roles or "lora_embedding_B" in roles:
            if "lora_embedding_A" not in roles or "lora_embedding_B" not in roles:
                raise AdapterError(
                    f"adapter module {module!r}: lora_embedding_A without lora_embedding_B"
                )
            a_key, b_key, embedding = roles["lora_embedding_A"], roles["lora_embedding_B"], True
        else:
            if "lora_magnitude_vector" in roles or "lora_B.bias" in roles:
                raise AdapterError(f"adapter module {module!r}: DoRA/bias tensors without lora_A")
            return edits
        if adapter.config.get("use_dora") and "lora_magnitude_vector" not in roles:
            raise AdapterError(
                f"adapter module {module!r}: use_dora is set but the adapter holds no"
                " lora_magnitude_vector for it (a DoRA adapter without its magnitudes is broken;"
                " peft would renormalise to untrained magnitudes)"
            )
        a_info, b_info = adapter.tensors[a_key], adapter.tensors[b_key]
        if len(a_info.shape) != 2 or len(b_info.shape) != 2:
            raise UnsupportedAdapterError(
                f"adapter type LORA on a convolution ({module!r}) is not verifiable by"
                " merge-harness"
            )
        tensor = module + ".weight"
        base = target.resolve(tensor, module)
        info = target.tensors[base]
        if len(info.shape) != 2:
            raise UnsupportedAdapterError(
                f"adapter type LORA on a {len(info.shape)}-d weight ({module!r}) is not verifiable"
                " by merge-harness"
            )
        out_features, in_features = b_info.shape[0], a_info.shape[1]
        if embedding:
            # Embedding weights are (num_embeddings, dim) and the delta is (B @ A).T: the
            # orientation of a Conv1D. More rows than the base: a vocabulary grown before
            # training, which a copy of the resized embedding must explain (deltas.growth).
            if info.shape[1:] != (out_features,) or in_features < info.shape[0]:
                raise AdapterError(
                    f"adapter module {module!r}: embedding delta is {in_features}x{out_features}"
                    f" but the base weight is {'x'.join(map(str, info.shape))}"
                )
            transposed = True
        else:
            transposed = fan_in_fan_out(target, module, info.shape, out_features, in_features)
        common: dict[str, Any] = dict(a_key=a_key, b_key=b_key, scale=scale, transposed=transposed)
        if "lora_magnitude_vector" in roles:
            edits.append(LoraDora(adapter, module, tensor, base, info, index,
                                  magnitude_key=roles["lora_magnitude_vector"], **common))
        elif embedding:
            edits.append(LoraEmbedding(adapter, module, tensor, base, info, index, **common))
        else:
            edits.append(LoraLinear(adapter, module, tensor, base, info, index, **common))
        if "lora_B.bias" in roles:
            bias = module + ".bias"
            if bias not in target.tensors:
                raise AdapterError(
                    f"adapter module {module!r}: lora_bias=True but the base has no {bias!r}"
                    " (peft cannot merge it either)"
                )
            edits.append(LoraBias(adapter, module, bias, bias, target.tensors[bias], index,
                                  key=roles["lora_B.bias"], scale=scale))
        return edits


_LORA_ROLES = frozenset(
    {
        "lora_A", "lora_B", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
        "lora_magnitude_vector", "trainable_tokens_delta",
    }
)
