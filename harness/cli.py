"""The ``merge-harness`` console command: a small registry of subcommands.

    merge-harness hash PATH [--json]
    merge-harness merge BASE ADAPTER [ADAPTER ...] OUT [--max-shard-size SIZE] [--overwrite]
    merge-harness gate ...            (the CI gate, see :mod:`harness.action`)
    merge-harness combine PART.json...  (the parts of a sharded run, see :mod:`harness.combine`)

A subcommand is a :class:`Command` (arguments + a ``run`` returning the exit status) added with
:func:`register`; :func:`lazy` registers one whose module is imported only when it is used.

Exit statuses, the same rule as pytest's: 0 success; 1 the gate failed (``gate`` passes
pytest's own status through, 5 when no check ran); 4 a usage error: bad arguments, or an input
that cannot be used (one line on stderr, never a traceback); 130 interrupted; 141 the reader of
the output went away (``merge-harness hash --json | head``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from harness.errors import HarnessError, one_line
from harness.gate.report import harness_version
from harness.io.checkpoint import Checkpoint
from harness.merger import Terminated, merge_checkpoint, sigterm_unwinds
from harness.stream.hashing import dumps_manifest, hash_checkpoint
from harness.text import escape_controls

#: Exit status for bad arguments or unusable input (pytest's usage error).
USAGE_ERROR = 4
#: Exit status when stdout's reader closed the pipe (128 + SIGPIPE, as a shell reports it).
BROKEN_PIPE = 141


class Parser(argparse.ArgumentParser):
    """argparse with pytest's usage-error status (4) instead of argparse's 2."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and the cause, exit with :data:`USAGE_ERROR`."""
        self.print_usage(sys.stderr)
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")
#: Exit statuses of ``merge``; on every one but 0 nothing is left at OUT or beside it.
MERGE_EXIT = {"failed": USAGE_ERROR, "interrupted": 130, "terminated": 143}


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, argument setup and body."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: name -> subcommand, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add (or replace) a subcommand."""
    COMMANDS[command.name] = command
    return command


def lazy(name: str, help: str, module: str) -> Command:
    """A subcommand implemented by ``module.add_arguments(parser)`` and ``module.run(args)``."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).run(args))

    return Command(name, help, add_arguments, run)


# ---- hash ---------------------------------------------------------------------------------


def _hash_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="a checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="read a pickle checkpoint (torch.load with weights_only=True)",
    )


def _hash_run(args: argparse.Namespace) -> int:

    manifest = hash_checkpoint(Checkpoint.open(args.path, allow_pickle=args.allow_pickle))
    if args.json:
        print(dumps_manifest(manifest))
    else:
        print(f"{manifest.digest}  {escape_controls(args.path)}")
    return 0


# ---- merge --------------------------------------------------------------------------------


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="the base checkpoint folder")
    parser.add_argument(
        "adapters", metavar="ADAPTER", nargs="+",
        help="PEFT adapter folder(s), merged in the order given",
    )
    parser.add_argument("out", metavar="OUT", help="the folder to write (must not exist)")
    parser.add_argument(
        "--max-shard-size", metavar="SIZE", default=None,
        help="re-shard to this size (5GB, 500MB, 2GiB or bytes; default: the base's shards)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="read pickle base/adapter weights (torch.load with weights_only=True)",
    )
    parser.epilog = (
        "exit status: 0 written; 4 not written, with a one-line cause on stderr (bad input, OUT"
        " exists or another merge into it is running, a write error such as a full disk); 130"
        " interrupted (Ctrl-C); 143 terminated (SIGTERM). Unless 0, nothing is left at OUT or"
        " beside it."
    )


def _merge_run(args: argparse.Namespace) -> int:
    """Merge; every failure is one line on stderr, never a traceback (exit codes: MERGE_EXIT)."""

    def say(text: str) -> None:
        print(f"merge-harness merge: {one_line(text)}", file=sys.stderr)

    size: int | str | None = args.max_shard_size
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    try:
        with sigterm_unwinds():
            out = merge_checkpoint(
                Path(args.base),
                [Path(a) for a in args.adapters],
                Path(args.out),
                max_shard_size=size,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                allow_pickle=args.allow_pickle,
                notify=say,
            )
    except Terminated:
        say("terminated (SIGTERM); nothing was written")
        return MERGE_EXIT["terminated"]
    except KeyboardInterrupt:
        say("interrupted; nothing was written")
        return MERGE_EXIT["interrupted"]
    except (HarnessError, OSError) as exc:
        say(str(exc) if isinstance(exc, HarnessError) else f"{exc.strerror or exc}")
        return MERGE_EXIT["failed"]
    except MemoryError:
        say("ran out of memory; nothing was written")
        return MERGE_EXIT["failed"]
    except Exception as exc:  # a bug, still one line: the user's inputs are not at fault
        say(f"internal error: {type(exc).__name__}: {exc}")
        return MERGE_EXIT["failed"]
    print(escape_controls(str(out)))
    return 0


register(Command("hash", "print a checkpoint's canonical content digest", _hash_arguments,
                 _hash_run))
register(Command("merge", "merge PEFT adapter(s) into a base checkpoint, streaming",
                 _merge_arguments, _merge_run))
register(lazy("gate", "run the merge checks as a CI gate (reports, annotations)",
              "harness.action"))
register(lazy("combine", "judge the parts of a sharded run (--merge-shard K/N) together",
              "harness.combine"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per registered command."""
    parser = Parser(
        prog="merge-harness",
        description="Prove a merged LoRA/PEFT checkpoint is the merge it claims to be.",
    )
    parser.add_argument(
        "--version", action="version", version=f"merge-harness {harness_version()}"
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    for command in COMMANDS.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a :class:`HarnessError` is one line on stderr and exit status 4."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.handler
    try:
        status = command.run(args)
        sys.stdout.flush()
        return status
    except HarnessError as exc:
        print(f"merge-harness {command.name}: {one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"merge-harness {command.name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away: stop writing (no traceback, no second error at exit).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
