"""Deliberate merge faults, injected by editing a copy of a merged checkpoint's safetensors."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _scale(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    # alpha/r used where alpha/sqrt(r) was meant (rsLoRA ignored) at r=4: the delta doubles
    return base + 2 * delta


def _sign(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return base - delta


def _transpose(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    # fan_in_fan_out mishandled: the delta added transposed (only possible on square weights)
    return base + delta.T if delta.dim() == 2 and delta.shape[0] == delta.shape[1] else base + delta


#: fault name -> (merged tensor from base and true delta, in float64)
DELTA_FAULTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "scale": _scale,
    "sign": _sign,
    "transpose": _transpose,
}
FAULTS = (*DELTA_FAULTS, "layer")
#: dtypes the fault matrix rotates through
DTYPE_ROTATION = ("F32", "BF16", "F16")
_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _base_tensors(base: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in _files(base):
        tensors.update(load_file(file))
    return tensors


def inject(merged: Path, base: Path, fault: str, out: Path) -> Path:
    """Copy ``merged`` to ``out`` with ``fault`` applied to every tensor the merge changed.

    ``layer``: the merge is undone in the last transformer layer (not applied to a layer).
    """
    shutil.copytree(merged, out)
    original = _base_tensors(base)
    for file in _files(out):
        tensors = load_file(file)
        changed = [
            n for n, t in tensors.items() if n in original and not torch.equal(t, original[n])
        ]
        last = max((int(m.group(1)) for n in changed if (m := _LAYER.search(n))), default=None)
        for name in changed:
            w = original[name].double()
            delta = tensors[name].double() - w
            if fault == "layer":
                hit = (m := _LAYER.search(name)) is not None and int(m.group(1)) == last
                new = w if hit else tensors[name].double()
            else:
                new = DELTA_FAULTS[fault](w, delta)
            tensors[name] = new.to(tensors[name].dtype).contiguous()
        save_file(tensors, file, metadata={"format": "pt"})
    return out


def retie(merged: Path, out: Path) -> Path:
    """A config that re-ties the embeddings after an lm_head merge: ``tie_word_embeddings``
    set and the (merged) ``lm_head.weight`` dropped, as saving a tied model writes it."""
    shutil.copytree(merged, out)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for file in _files(out):
        tensors = load_file(file)
        if tensors.pop("lm_head.weight", None) is not None:
            save_file(tensors, file, metadata={"format": "pt"})
    return out


def scale_layer(merged: Path, base: Path, out: Path, layer: int, times: float) -> Path:
    """Copy ``merged`` to ``out`` with layer ``layer`` holding ``base + times * (merged - base)``.

    ``times`` 2 doubles that layer's delta, 0 leaves the layer unmerged; every other tensor is
    kept as it is.
    """
    shutil.copytree(merged, out)
    pattern = re.compile(rf"\.(?:layers|h)\.{layer}\.")
    original = _base_tensors(base)
    for file in _files(out):
        tensors = load_file(file)
        for name, value in tensors.items():
            if pattern.search(name) and name in original:
                w = original[name].double()
                tensors[name] = (w + times * (value.double() - w)).to(value.dtype).contiguous()
        save_file(tensors, file, metadata={"format": "pt"})
    return out
