"""The ``merge-harness`` command: hash and merge subcommands, errors, the subcommand registry."""

from __future__ import annotations

import json

import pytest
from support.checkpoints import read_tensors

from harness import cli
from harness.io.checkpoint import Checkpoint
from harness.stream.hashing import hash_checkpoint


def test_hash_prints_the_canonical_digest(workshop, capsys):
    base = workshop.base("llama", "BF16")
    assert cli.main(["hash", str(base)]) == 0
    digest, path = capsys.readouterr().out.split()
    assert digest == hash_checkpoint(Checkpoint.open(base)).digest
    assert path == str(base)


def test_hash_json_is_the_manifest(workshop, capsys):
    base = workshop.base("llama", "BF16", shard="20KB")
    assert cli.main(["hash", "--json", str(base)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["digest"] == hash_checkpoint(Checkpoint.open(base)).digest
    assert len(manifest["files"]) == 3


@pytest.mark.parametrize("argv", [["hash", "missing"], ["merge", "missing", "adapter", "out"]])
def test_bad_input_is_one_line_and_exit_4(tmp_path, capsys, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"merge-harness {argv[0]}: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_merge_writes_the_merge(workshop, tmp_path, capsys):
    base = workshop.base("llama", "BF16")
    adapter = workshop.adapter(base)
    out = tmp_path / "merged"
    assert cli.main(["merge", str(base), str(adapter), str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    expected = read_tensors(workshop.peft(base, adapter))
    assert all(t.equal(expected[n]) for n, t in read_tensors(out).items())
    assert cli.main(["merge", str(base), str(adapter), str(out), "--no-progress"]) == 4
    assert "already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert cli.main(["merge", str(base), str(adapter), str(out), "--no-progress",
                     "--overwrite", "--max-shard-size", "20000"]) == 0
    assert len(list(out.glob("*.safetensors"))) == 3


def test_merge_takes_several_adapters_in_order(workshop, tmp_path):
    base = workshop.base("llama", "BF16")
    first = workshop.adapter(base, seed=1, target_modules=["q_proj"])
    second = workshop.adapter(base, seed=2, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "merged"
    assert cli.main(["merge", str(base), str(first), str(second), str(out),
                     "--no-progress"]) == 0
    expected = read_tensors(workshop.ours(base, [first, second]))
    assert all(t.equal(expected[n]) for n, t in read_tensors(out).items())


def test_subcommands_are_a_registry(capsys):
    seen = []

    def add_arguments(parser):
        parser.add_argument("word")

    def run(args):
        seen.append(args.word)
        return 7

    cli.register(cli.Command("echo-test", "test command", add_arguments, run))
    try:
        assert cli.main(["echo-test", "hello"]) == 7
        assert seen == ["hello"]
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        listing = capsys.readouterr().out
        for name in ("hash", "merge", "gate", "echo-test"):
            assert name in listing
    finally:
        cli.COMMANDS.pop("echo-test")
