"""Where the plugin keeps the run's :class:`~harness.run.state.State`: ``config.stash``."""

from __future__ import annotations

import pytest

from harness.run.state import State

STATE_KEY = pytest.StashKey[State]()

__all__ = ["STATE_KEY", "State"]
