"""What in a model or adapter folder would make a loader import code from it.

transformers imports Python files shipped in the folder when a JSON file it reads names them
under ``auto_map``: ``config.json`` for the model, but also ``tokenizer_config.json`` for the
tokenizer and ``processor_config.json``, ``preprocessor_config.json`` and the other processor
configs for processors; ``custom_pipelines`` does the same for pipelines, and peft's
``auto_mapping`` in ``adapter_config.json`` names the module ``AutoPeftModel`` imports for the
base class (code only when that is not one of transformers' own modules).
Every JSON file of the folder whose name says it is a configuration is in scope, and the keys
are looked for at any depth (a composite config nests the configs of its parts).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.io.files import exists, read_json

#: Keys through which a loader imports code named by the folder.
CODE_KEYS = ("auto_map", "custom_pipelines", "auto_mapping")
#: JSON files every loader of a model, tokenizer, processor or adapter reads.
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
    "adapter_config.json",
    "chat_template.json",
)


@dataclass(frozen=True)
class CustomCode:
    """One configuration file that asks for custom code: the file and the keys that do."""

    file: Path
    keys: tuple[str, ...]


def config_files(folder: Path) -> list[Path]:
    """The configuration files of ``folder``: the known names, and any ``*config*.json``."""
    found = {folder / name for name in CONFIG_FILES if exists(folder / name)}
    found.update(p for p in folder.glob("*config*.json") if exists(p))
    return sorted(found)


def _builtin_mapping(key: str, value: Any) -> bool:
    """Whether this is an ``auto_mapping`` naming a class transformers itself defines."""
    if key != "auto_mapping" or not isinstance(value, dict):
        return False
    library = value.get("parent_library")
    return isinstance(library, str) and (
        library == "transformers" or library.startswith("transformers.models.")
    )


def _keys(value: Any) -> Iterator[str]:
    """Every code-loading key set (non-empty) anywhere in a parsed JSON document."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if key in CODE_KEYS and inner and not _builtin_mapping(key, inner):
                    yield key
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


def custom_code(folder: Path) -> list[CustomCode]:
    """The configuration files of ``folder`` that name custom code (read with the file guards).

    Raises :class:`~harness.errors.CheckpointError` for a configuration file that may not be read
    (a symlink out of the folder, a pipe, too large, malformed).
    """
    found = []
    for path in config_files(folder):
        keys = tuple(sorted(set(_keys(read_json(path)))))
        if keys:
            found.append(CustomCode(path, keys))
    return found


def scripts(folder: Path) -> list[str]:
    """The Python files shipped in ``folder`` (what an ``auto_map`` would import)."""
    return sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
