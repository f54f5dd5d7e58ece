"""Read a PEFT adapter folder: ``adapter_config.json`` plus ``adapter_model.safetensors``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.checkpoint import SafetensorsFile, TensorInfo, read_header, read_json, tensor_from_bytes
from harness.errors import AdapterError, CheckpointError

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
#: peft prefixes every saved key with this; the rest is the base model's module path.
KEY_PREFIX = "base_model.model."


@dataclass
class Adapter:
    """A validated adapter folder: its config and lazily read tensors (peft key names)."""

    root: Path
    config: dict[str, Any]
    file: SafetensorsFile | None
    tensors: dict[str, TensorInfo]
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Adapter:
        """Open and validate an adapter folder; raise :class:`AdapterError` if invalid."""
        root = Path(path)
        if not root.exists():
            raise AdapterError(f"{root}: no such adapter folder")
        if not root.is_dir():
            raise AdapterError(f"{root}: expected an adapter folder, found a file")
        config_path = root / CONFIG_FILE
        if not config_path.is_file():
            raise AdapterError(f"{root}: no {CONFIG_FILE} (not a PEFT adapter folder)")
        try:
            config = read_json(config_path)
        except CheckpointError as exc:
            raise AdapterError(f"{CONFIG_FILE}: {str(exc).split(': ', 1)[-1]}") from None
        if not isinstance(config, dict):
            raise AdapterError(f"{CONFIG_FILE}: not a JSON object")
        if not isinstance(config.get("peft_type"), str):
            raise AdapterError(f"{CONFIG_FILE}: missing peft_type")
        weights = root / WEIGHTS_FILE
        if weights.is_file():
            try:
                sfile = read_header(weights)
            except CheckpointError as exc:
                raise AdapterError(str(exc)) from None
            return cls(root, config, sfile, dict(sfile.tensors))
        if (root / PICKLE_FILE).is_file():
            return cls._open_pickle(root, config, allow_pickle)
        raise AdapterError(f"{root}: no {WEIGHTS_FILE}")

    @classmethod
    def _open_pickle(cls, root: Path, config: dict[str, Any], allow_pickle: bool) -> Adapter:
        if not allow_pickle:
            raise AdapterError(
                f"{root}: only a pickle {PICKLE_FILE}; refusing to unpickle. Save with"
                " safetensors, or pass --merge-allow-pickle (loads with weights_only=True)"
            )
        import torch

        from harness.dtypes import from_torch

        try:
            state = torch.load(root / PICKLE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only raises many types for hostile pickles
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AdapterError(f"{PICKLE_FILE}: refused by weights_only loading: {first}") from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise AdapterError(f"{PICKLE_FILE}: not a flat state dict of tensors")
        infos = {
            k: TensorInfo(k, from_torch(v.dtype), tuple(v.shape), root, 0, v.numel() * v.element_size())
            for k, v in state.items()
        }
        return cls(root, config, None, infos, state)

    @property
    def peft_type(self) -> str:
        """The adapter type as peft names it (``LORA``, ``IA3``, ``LOHA``, ...)."""
        return str(self.config["peft_type"]).upper()

    @property
    def base_model_name_or_path(self) -> str | None:
        """Where the adapter says its base model is (a local folder or a hub id)."""
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    def tensor(self, key: str) -> torch.Tensor:
        """One adapter tensor by its saved key, as a CPU tensor."""
        if self._pickled is not None:
            return self._pickled[key]
        info = self.tensors[key]
        buffer = bytearray(info.nbytes)
        with info.file.open("rb", buffering=0) as handle:
            handle.seek(info.start)
            got = handle.readinto(buffer)
        if got != info.nbytes:
            raise AdapterError(f"{info.file.name}: truncated while reading {key!r}")
        return tensor_from_bytes(info, buffer)


def discover_base(adapter_path: Path) -> Path:
    """The local base folder named by an adapter's ``base_model_name_or_path``.

    Relative paths are tried against the current folder and the adapter's folder. A hub id is a
    usage error: the harness never downloads.
    """
    adapter = Adapter.open(adapter_path)
    name = adapter.base_model_name_or_path
    if name is None:
        raise AdapterError(
            f"{CONFIG_FILE}: no base_model_name_or_path; pass --base-model"
        )
    candidates = [Path(name)] if os.path.isabs(name) else [Path(name), adapter_path / name]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise AdapterError(
        f"{CONFIG_FILE}: base_model_name_or_path {name!r} is not a local folder (the harness"
        " works offline and never downloads); pass --base-model PATH"
    )
