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
from hypothesis import HealthCheck, settings

pytest_plugins = ["pytester"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile(
    "merge-harness-ci",
    parent=settings.get_profile("ci"),
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "merge-harness-dev",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(
    os.environ.get(
        "HYPOTHESIS_PROFILE", "merge-harness-ci" if os.environ.get("CI") else "merge-harness-dev"
    )
)
