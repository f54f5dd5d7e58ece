"""The architecture parameters an export declares, against the merged model's ``config.json``.

The converter copies them from the config (``TextModel.set_gguf_parameters``): a GGUF whose
context length or rope theta was overridden at conversion, or that was converted from a folder
with another config, runs with the wrong positions even though every weight is right. Floats are
stored as float32, so the config's values are rounded to float32 before they are compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from harness.export.reader import ExportFile

Keys = gguf.Keys.LLM
Attention = gguf.Keys.Attention
Rope = gguf.Keys.Rope


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rope settings: transformers 5's ``rope_parameters``, else the older ``rope_scaling``.

    Mirrors the converter: the top-level ``rope_theta`` fills in when the table has none.
    """
    table = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = dict(table) if isinstance(table, dict) else {}
    params = dict(params.get("full_attention", params))
    if "rope_theta" not in params:
        theta = _first(config, "rope_theta", "rotary_emb_base")
        if theta is not None:
            params["rope_theta"] = theta
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def _scaling(kind: str) -> Callable[[dict[str, Any]], Any]:
    """The converter writes a scaling type and factor only for linear and yarn."""

    def get(config: dict[str, Any]) -> Any:
        params = rope_parameters(config)
        rope_type = str(params.get("rope_type") or "")
        if rope_type not in ("linear", "yarn") or params.get("factor") is None:
            return None
        if kind == "type":
            return rope_type
        if kind == "factor":
            return params["factor"]
        return params.get("original_max_position_embeddings") if rope_type == "yarn" else None

    return get


@dataclass(frozen=True)
class Parameter:
    """One parameter: its config name (messages), GGUF key and how to read the config."""

    name: str
    key: str
    expected: Callable[[dict[str, Any]], Any]
    is_float: bool = False
    #: Written for every architecture (else compared only when the export has the key: some
    #: converter classes leave it out, e.g. Gemma's rope theta and Qwen2's vocabulary size).
    always: bool = False


def _keys(*names: str) -> Callable[[dict[str, Any]], Any]:
    return lambda config: _first(config, *names)


PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "max_position_embeddings",
        Keys.CONTEXT_LENGTH,
        _keys("max_position_embeddings", "n_ctx", "n_positions", "max_length",
              "max_sequence_length", "model_max_length"),
        always=True,
    ),
    Parameter("hidden_size", Keys.EMBEDDING_LENGTH, _keys("hidden_size", "n_embd", "dim"),
              always=True),
    Parameter("num_hidden_layers", Keys.BLOCK_COUNT, _keys("num_hidden_layers", "n_layer"),
              always=True),
    Parameter(
        "intermediate_size",
        Keys.FEED_FORWARD_LENGTH,
        _keys("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
              "n_inner", "hidden_dim"),
    ),
    Parameter("num_attention_heads", Attention.HEAD_COUNT,
              _keys("num_attention_heads", "n_head", "n_heads"), always=True),
    Parameter("num_key_value_heads", Attention.HEAD_COUNT_KV,
              _keys("num_key_value_heads", "n_kv_heads")),
    Parameter("rms_norm_eps", Attention.LAYERNORM_RMS_EPS, _keys("rms_norm_eps", "norm_eps"),
              is_float=True),
    Parameter("rope_theta", Rope.FREQ_BASE, lambda c: rope_parameters(c).get("rope_theta"),
              is_float=True),
    Parameter("rope_scaling.rope_type", Rope.SCALING_TYPE, _scaling("type")),
    Parameter("rope_scaling.factor", Rope.SCALING_FACTOR, _scaling("factor"), is_float=True),
    Parameter("rope_scaling.original_max_position_embeddings", Rope.SCALING_ORIG_CTX_LEN,
              _scaling("original")),
    Parameter("head_dim", Attention.KEY_LENGTH, _keys("head_dim")),
    Parameter("vocab_size", Keys.VOCAB_SIZE, _keys("vocab_size")),
)


@dataclass(frozen=True)
class Mismatch:
    """One parameter whose exported value differs from the merged model's."""

    name: str
    key: str
    merged: Any
    export: Any

    def line(self) -> str:
        """``rope_theta: merged 10000, export 500000 (llama.rope.freq_base)``."""
        return f"{self.name}: merged {_show(self.merged)}, export {_show(self.export)} ({self.key})"


def _show(value: Any) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _same(expected: Any, found: Any, is_float: bool) -> bool:
    if is_float:
        if not isinstance(expected, (int, float)) or not isinstance(found, (int, float)):
            return False
        return bool(np.float32(expected) == np.float32(found))
    return bool(expected == found)


def compare_parameters(export: ExportFile, config: dict[str, Any]) -> tuple[list[Mismatch], int]:
    """Mismatching parameters, and how many were compared (both sides declare them)."""
    flat = dict(config)
    text = config.get("text_config")
    if isinstance(text, dict):
        flat.update(text)
    mismatches: list[Mismatch] = []
    compared = 0
    for parameter in PARAMETERS:
        expected = parameter.expected(flat)
        if expected is None:
            continue
        compared += 1
        key = export.key(parameter.key)
        found = export.fields.get(key)
        if found is None and not parameter.always:
            continue
        if not _same(expected, found, parameter.is_float):
            mismatches.append(Mismatch(parameter.name, key, expected, found))
    return mismatches, compared
