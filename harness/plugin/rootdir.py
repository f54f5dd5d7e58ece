"""Keep pytest's rootdir and cache away from the model folders a merge run reads.

pytest picks its rootdir (and the ini file, and ``.pytest_cache``) from the path-like command
line arguments *before* it loads plugins. With the space form ``--merged-model /data/merged``
it cannot know that ``/data/merged`` is an option's value, takes it for a test path, and makes
the checkpoint folder (or a common parent of the model folders) the rootdir: the cache is then
written next to the models, a config file above them applies, and node ids print as
``../merge::...``. Once the plugin's options are known, :func:`pin` redoes that determination
with the real positional arguments and relocates the cache into a private temporary folder
unless the user chose one. No pytest hook runs earlier with the config in hand, so this sets
the few attributes pytest set from the first determination (``_rootpath``, ``_inipath``,
``_inicfg``); tests/test_readonly.py pins the behaviour on every pytest the project supports.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from _pytest.config.findpaths import ConfigValue, determine_setup

#: The flags of the plugin whose separate value pytest's first parse mistakes for a path.
VALUE_FLAGS = (
    "--merged-model",
    "--base-model",
    "--adapter",
    "--merge-config",
    "--merge-lock",
    "--merge-report",
    "--merge-summary",
    "--merge-shard",
    "--export",
)


def _given_space_form(args: list[str]) -> bool:
    """Whether a path option was given as ``--flag VALUE`` (two arguments)."""
    return any(arg in VALUE_FLAGS for arg in args[:-1])


def _ini_table(config: pytest.Config) -> dict[str, Any]:
    """The parsed ini values (``_inicfg`` from pytest 9.1, ``inicfg`` in 9.0)."""
    state = vars(config)
    table: dict[str, Any] = state["_inicfg"] if "_inicfg" in state else state["inicfg"]
    return table


def _set_ini_table(config: pytest.Config, table: dict[str, Any]) -> None:
    setattr(config, "_inicfg" if "_inicfg" in vars(config) else "inicfg", table)


def _cache_dir_chosen(config: pytest.Config) -> bool:
    overrides = config.known_args_namespace.override_ini or []
    return "cache_dir" in _ini_table(config) or any(
        o.startswith("cache_dir=") for o in overrides
    )


def pin(config: pytest.Config, args: list[str]) -> None:
    """Redo the rootdir determination without the option values, and move the cache.

    Called from ``pytest_load_initial_conftests`` when a merge run is asked for. An explicit
    ``-c`` is the user's choice and is left alone; an explicit ``--rootdir`` is kept, but the
    ini file is looked for again (pytest also looked for it above the option values).
    """
    ns = config.known_args_namespace
    if not ns.inifilename and _given_space_form(args):
        rootpath, inipath, inicfg, ignored = determine_setup(
            inifile=None,
            override_ini=ns.override_ini,
            args=list(ns.file_or_dir),
            rootdir_cmd_arg=ns.rootdir or None,
            invocation_dir=config.invocation_params.dir,
        )
        if (rootpath, inipath) != (config.rootpath, config.inipath):
            # pytest put the wrong ini file's addopts in front of the arguments: take them out
            # (its "-p" plugins, if any, were imported before any plugin could intervene)
            wrong = list(config.getini("addopts")) if inipath != config.inipath else []
            if wrong and args[: len(wrong)] == wrong:
                del args[: len(wrong)]
            old_cut = str(config.inipath.parent if config.inipath else config.rootpath)
            config._rootpath = rootpath
            config._inipath = inipath
            _set_ini_table(config, inicfg)
            config._ignored_config_files = ignored
            config._inicache.clear()
            config._parser.extra_info["rootdir"] = str(rootpath)
            config._parser.extra_info["inifile"] = str(inipath)
            if ns.confcutdir == old_cut:
                ns.confcutdir = str(inipath.parent if inipath else rootpath)
    if not _cache_dir_chosen(config):
        folder = Path(tempfile.mkdtemp(prefix="merge-harness-pytest-cache-"))
        _ini_table(config)["cache_dir"] = ConfigValue(str(folder), origin="override", mode="ini")
        config._inicache.pop("cache_dir", None)
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
