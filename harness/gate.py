"""The gate: configuration, and the decision applied once per run on the controller."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.context import Options
from harness.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from harness.plugin.state import State

KNOWN_KEYS = frozenset({"ulp_tolerance", "checks", "config_allow", "inconclusive_blocks"})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: bad TOML: {exc}") from None


def load_settings(options: Options, rootdir: Path) -> None:
    """Read the gate configuration into ``options.settings``; raise ConfigError when invalid."""
    path = options.config_path
    table: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"--merge-config {path}: no such file")
        data = _read_toml(path)
        table = data.get("tool", {}).get("merge-harness", data) if path.name == "pyproject.toml" else data
    else:
        pyproject = rootdir / "pyproject.toml"
        standalone = rootdir / "merge-harness.toml"
        if pyproject.is_file():
            found = _read_toml(pyproject).get("tool", {}).get("merge-harness")
            if isinstance(found, dict):
                table, path = found, pyproject
        if path is None and standalone.is_file():
            table, path = _read_toml(standalone), standalone
    unknown = sorted(set(table) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    options.settings = dict(table)
    if "ulp_tolerance" in table:
        options.ulp_tolerance = float(table["ulp_tolerance"])


def apply_gate(state: State, exitstatus: int) -> int | None:
    """Decide the run's exit status from the results; None keeps pytest's own."""
    return None
