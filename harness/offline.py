"""Offline by default: the harness never reaches the Hugging Face Hub or any other server.

Every model, adapter, tokenizer and dataset the harness loads is local. The environment variables
below make ``huggingface_hub``, ``transformers`` and ``datasets`` refuse any download; they are
read when those libraries are imported, so modules that are already imported are switched too.
A user's explicit ``HF_HUB_OFFLINE=0`` is overridden for the duration of the run, on purpose:
a CI gate that checks a pull request's checkpoint must not fetch code or weights it names.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

#: What is set while the harness runs.
OFFLINE_ENVIRONMENT: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
}
#: (module, attribute) pairs that cache the offline switch at import time.
_CACHED_SWITCHES = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)


def enforce_offline() -> Callable[[], None]:
    """Switch every Hugging Face library to offline mode; return a function that undoes it."""
    saved_env = {name: os.environ.get(name) for name in OFFLINE_ENVIRONMENT}
    os.environ.update(OFFLINE_ENVIRONMENT)
    saved_attrs: list[tuple[object, str, object]] = []
    for module_name, attr in _CACHED_SWITCHES:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            saved_attrs.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)

    def restore() -> None:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, attr, old in saved_attrs:
            setattr(module, attr, old)

    return restore


def is_offline() -> bool:
    """Whether the environment currently asks the Hugging Face libraries to stay offline."""
    return all(os.environ.get(name) == value for name, value in OFFLINE_ENVIRONMENT.items())


@contextlib.contextmanager
def private_hypothesis_storage() -> Iterator[None]:
    """Point hypothesis' storage (its ``constants`` cache) at a temporary folder for a while.

    Hypothesis writes ``.hypothesis/`` into the current folder even with ``database=None`` (it
    caches constants found in local source files). The harness writes only to its own temp
    folders and the paths the user names, so its own searches use a private, deleted folder;
    a user's own hypothesis tests in the same session keep their usual storage.
    """
    from hypothesis import configuration

    previous = vars(configuration).get("__hypothesis_home_directory")
    with tempfile.TemporaryDirectory(prefix="merge-harness-hypothesis-") as folder:
        configuration.set_hypothesis_home_dir(folder)
        try:
            yield
        finally:
            configuration.set_hypothesis_home_dir(previous)
