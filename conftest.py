"""Root conftest of merge-harness's own tests: pytester, torch pre-import, hypothesis profiles."""

from __future__ import annotations

import os

# pytester's in-process runs evict modules imported during the run; importing torch (and the
# model libraries, and torch._dynamo which transformers pulls in lazily and which registers
# native operator libraries that cannot be registered twice) here keeps one copy for the session.
import peft  # noqa: F401
import safetensors.torch  # noqa: F401
import torch
import torch._dynamo  # noqa: F401
import transformers  # noqa: F401

# The settings profiles merge-harness-ci / merge-harness-dev are public: harness.strategies
# registers them on import (derived from hypothesis' built-in "ci" profile).
from harness.strategies import load_profile

pytest_plugins = ["pytester"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

load_profile()
