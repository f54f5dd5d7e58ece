"""The bad inputs as data: how each is made, what the user runs, what they must see.

Each :class:`Case` damages private copies of a correct tiny merge (:class:`support.damage.Good`)
and returns the plugin arguments; ``tests/test_badinput.py`` runs every case from an empty folder
exactly as a user would and asserts the exit status, the one-line message (an fnmatch pattern)
and that no traceback was printed. :func:`render_case_table` renders the same cases as the
documentation's markdown table; importing this module needs neither torch nor a test run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from support.damage import (
    TASK_YAML,
    Good,
    adapter_config,
    adapter_file,
    adapter_pickle,
    adapter_text,
    adapter_truncated,
    adapter_weights,
    auto_map,
    bad_json,
    base_file,
    base_truncated,
    config_text,
    duplicate_key,
    edited_header,
    empty_folder,
    escape_symlink,
    fifo,
    file_for_folder,
    folder_named_file,
    header_length,
    index_text,
    make_adapter,
    make_base,
    make_merged,
    make_sharded,
    merged_and_base,
    missing_shard,
    nan_weight,
    overlap,
    past_end,
    pickle_only,
    remap_shard,
    single_symlink,
    stale_shard,
    task_yaml,
    total_size,
    truncated,
    two_shards,
    unknown_dtype,
    with_config_file,
    with_lock,
    with_lock_keys,
    with_tasks,
)


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, what the user runs, what they must see."""

    id: str
    input: str
    what: str
    #: Damages the copies and returns the plugin arguments.
    make: Callable[[Good], list[str]]
    status: int
    #: fnmatch pattern of the message; ``{root}`` is the inputs folder.
    message: str
    #: The check that must fail with it (exit 1), e.g. "structure::loads"; None for exit 4.
    check: str | None = None
    families: str = "structure,security,hash"



AD = "{root}/adapter"
WEIGHTS = "structure,weights"
M = "{root}/merged"
MF = "{root}/merged/model.safetensors"
IDX = "{root}/sharded/model.safetensors.index.json"

CASES = [
    # -- the merged model ---------------------------------------------------------------------
    Case("merged-missing", "merged", "missing path",
         lambda g: merged_and_base(g.root / "nope", g), 4,
         "--merged-model {root}/nope: no such file or folder"),
    Case("merged-file", "merged", "a file where a folder is expected",
         make_merged(file_for_folder), 1,
         "{root}/merged.safetensors: expected a checkpoint folder, found a file",
         "structure::loads"),
    Case("merged-is-adapter", "merged", "the adapter folder passed as the merged model",
         lambda g: merged_and_base(g.adapter, g), 4,
         "--merged-model {root}/adapter: this is a PEFT adapter folder (adapter_config.json, no"
         " model weights); did you mean --adapter?*"),
    Case("merged-empty", "merged", "an empty folder", make_merged(empty_folder), 1,
         "{root}/empty: no model.safetensors, index or shards in this folder", "structure::loads"),
    Case("merged-truncated", "merged", "a truncated safetensors file (tail cut)",
         make_merged(truncated(cut=100)), 1,
         MF + ": truncated: tensor * ends at data byte * but the file holds * data bytes",
         "structure::loads"),
    Case("merged-stub", "merged", "a safetensors file of 5 bytes",
         make_merged(truncated(keep=5)), 1, MF + ": truncated safetensors file (5 bytes)",
         "structure::loads"),
    Case("header-beyond-file", "merged", "header length larger than the file",
         make_merged(header_length(lambda size: size + 1)), 1,
         MF + ": truncated: header declares * bytes but the file has * bytes",
         "structure::loads"),
    Case("header-absurd", "merged", "header length 2**60 (never allocated)",
         make_merged(header_length(lambda size: 2**60)), 1,
         MF + ": header length 1152921504606846976 exceeds the 100000000 byte limit*",
         "structure::loads"),
    Case("header-json", "merged", "malformed header JSON", make_merged(bad_json), 1,
         MF + ": malformed safetensors header: *", "structure::loads"),
    Case("header-duplicate", "merged", "a tensor named twice in one header",
         make_merged(duplicate_key), 1,
         MF + ": malformed safetensors header: duplicate key *", "structure::loads"),
    Case("offsets-overlap", "merged", "overlapping tensor offsets",
         make_merged(edited_header(overlap)), 1, MF + ": tensor * overlaps the previous tensor",
         "structure::loads"),
    Case("offsets-past-end", "merged", "offsets past the end of the file",
         make_merged(edited_header(past_end)), 1,
         MF + ": truncated: tensor * ends at data byte * but the file holds * data bytes",
         "structure::loads"),
    Case("dtype-unknown", "merged", "an unknown dtype",
         make_merged(edited_header(unknown_dtype)), 1, MF + ": tensor *: unknown dtype 'F13'",
         "structure::loads"),
    Case("index-missing-shard", "merged", "index names a missing shard",
         make_sharded(missing_shard), 1,
         IDX + ": lists shard model-0000*.safetensors which does not exist", "structure::loads"),
    Case("index-dotdot", "merged", "index names a shard `../x.safetensors`",
         make_sharded(lambda f: remap_shard(f, "../x.safetensors")), 1,
         IDX + ": shard '../x.safetensors' is not a .safetensors file name inside the folder",
         "structure::loads"),
    Case("index-absolute", "merged", "index names an absolute shard path",
         make_sharded(lambda f: remap_shard(f, "/etc/x.safetensors")), 1,
         IDX + ": shard '/etc/x.safetensors' is not a .safetensors file name inside the folder",
         "structure::loads"),
    Case("shard-symlink-out", "merged", "a shard that is a symlink leaving the folder",
         make_sharded(escape_symlink), 1,
         "{root}/sharded/model-0000*.safetensors: symlink resolves outside its folder*",
         "structure::loads"),
    Case("single-symlink-out", "merged", "model.safetensors a symlink leaving the folder",
         make_merged(single_symlink), 1, MF + ": symlink resolves outside its folder*",
         "structure::loads"),
    Case("tensor-in-two-shards", "merged", "one tensor stored in two shards",
         make_sharded(two_shards), 1,
         "{root}/sharded: tensor * is stored in both model-0000*.safetensors and"
         " model-0000*.safetensors", "structure::loads"),
    Case("stale-shard", "merged", "a shard file the index does not list",
         make_sharded(stale_shard), 1,
         IDX + ": shard file(s) model-00009-of-00009.safetensors present but not in the index*",
         "structure::loads"),
    Case("index-json", "merged", "malformed index JSON", make_sharded(index_text("{oops")), 1,
         IDX + ": malformed JSON: *", "structure::loads"),
    Case("index-total", "merged", "index total_size disagrees with the shards",
         make_sharded(total_size), 1,
         IDX + ": total_size * but the shards hold * tensor bytes", "structure::loads"),
    Case("pickle-only", "merged", "a pickle-only checkpoint (default)", make_merged(pickle_only),
         1, M + ": only pickle checkpoint(s) (pytorch_model.bin); refusing to unpickle*",
         "structure::loads"),
    Case("nonfinite", "merged", "a NaN in a weight", make_merged(nan_weight), 1,
         "1 tensor(s) hold NaN/Inf; first 'model.layers.0.mlp.down_proj.weight': 1 NaN*",
         "structure::all_finite"),
    Case("fifo", "merged", "model.safetensors is a named pipe (would block)",
         make_merged(fifo), 1, MF + ": not a regular file (a pipe, socket or device)",
         "structure::loads"),
    Case("folder-as-file", "merged", "model.safetensors is a folder",
         make_merged(folder_named_file), 1, MF + ": not a regular file (a folder)",
         "structure::loads"),
    Case("config-json", "merged", "config.json with bad syntax", make_merged(config_text("{,}")), 1,
         M + "/config.json: malformed JSON: *", "structure::loads"),
    Case("config-not-object", "merged", "config.json that is not an object",
         make_merged(config_text("[1, 2]")), 1, M + "/config.json: not a JSON object",
         "structure::loads"),
    Case("auto-map", "merged", "config.json with auto_map custom code",
         make_merged(auto_map), 1,
         M + "/config.json has auto_map (custom code (modeling_evil.py)); refusing custom code:"
         " pass --merge-trust-remote-code to allow", "security::no_remote_code"),
    # -- the base model -----------------------------------------------------------------------
    Case("base-missing", "base", "missing path",
         lambda g: ["--merged-model", str(g.merged), "--base-model", str(g.root / "nope")], 4,
         "--base-model {root}/nope: no such file or folder"),
    Case("base-file", "base", "a file where a folder is expected", make_base(base_file), 1,
         "{root}/base.safetensors: expected a checkpoint folder, found a file",
         "structure::same_tensor_names"),
    Case("base-empty", "base", "an empty folder", make_base(empty_folder), 1,
         "{root}/empty: no model.safetensors, index or shards in this folder",
         "structure::same_tensor_names"),
    Case("base-truncated", "base", "a truncated safetensors file", make_base(base_truncated), 1,
         "{root}/base/model.safetensors: truncated: tensor * ends at data byte*",
         "structure::same_tensor_names"),
    Case("base-mismatch", "base", "a base that does not match the merged model (hidden size)",
         lambda g: ["--merged-model", str(g.merged), "--base-model", str(g.foreign.wide_base)], 1,
         "* tensor(s) changed shape; 'lm_head.weight': base [128, 64], merged [128, 32]",
         "structure::same_shapes"),
    # -- the adapter --------------------------------------------------------------------------
    Case("adapter-missing", "adapter", "missing path",
         lambda g: [*merged_and_base(g.merged, g), "--adapter", str(g.root / "nope")], 4,
         "--adapter {root}/nope: no such file or folder"),
    Case("adapter-file", "adapter", "a file where a folder is expected",
         make_adapter(adapter_file), 1,
         "{root}/adapter.safetensors: expected an adapter folder, found a file",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-empty", "adapter", "an empty folder", make_adapter(empty_folder), 1,
         "{root}/empty: no adapter_config.json (not a PEFT adapter folder)",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-config-json", "adapter", "adapter_config.json with bad syntax",
         make_adapter(adapter_text('{"r": 4,')), 1, "adapter_config.json: malformed JSON: *",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-no-type", "adapter", "adapter_config.json without peft_type",
         make_adapter(adapter_config(lambda c: c.pop("peft_type"))), 1,
         "adapter_config.json: missing peft_type", "weights::adapter_supported", WEIGHTS),
    Case("adapter-r0", "adapter", "r = 0", make_adapter(adapter_config(lambda c: c.update(r=0))),
         1, "adapter_config.json: r must be a positive integer, got 0",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-negative-alpha", "adapter", "a negative lora_alpha",
         make_adapter(adapter_config(lambda c: c.update(lora_alpha=-4))), 1,
         "adapter_config.json: lora_alpha must be >= 0, got -4", "weights::adapter_supported",
         WEIGHTS),
    Case("adapter-unknown-type", "adapter", "an unknown adapter type",
         make_adapter(adapter_config(lambda c: c.update(peft_type="FOO"))), 1,
         "adapter type FOO is not verifiable by merge-harness (verifiable: *)",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-targets-nothing", "adapter", "target modules matching nothing in the base",
         make_adapter(adapter_weights(
             lambda t: {k.replace(".layers.", ".blocks."): v for k, v in t.items()})), 1,
         "adapter module 'model.blocks.*' matches no tensor of the base checkpoint*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-no-weights", "adapter", "an adapter file with no tensors",
         make_adapter(adapter_weights(lambda t: {})), 1,
         "adapter_model.safetensors: no adapter weights (target_modules * matched nothing*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-truncated", "adapter", "a truncated adapter_model.safetensors",
         make_adapter(adapter_truncated), 1,
         AD + "/adapter_model.safetensors: truncated: tensor * ends at data byte*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-pickle", "adapter", "a pickle-only adapter (default)",
         make_adapter(adapter_pickle), 1,
         AD + ": only a pickle adapter_model.bin; refusing to unpickle*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-hidden-size", "adapter", "an adapter for a different hidden size",
         lambda g: [*merged_and_base(g.merged, g), "--adapter", str(g.foreign.wide_adapter)], 1,
         "adapter module '*': the delta is * but the base weight is *",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-architecture", "adapter", "an adapter for a different architecture (GPT-2)",
         lambda g: [*merged_and_base(g.merged, g), "--adapter", str(g.foreign.gpt2_adapter)], 1,
         "adapter module 'transformer.h.0.attn.c_attn' matches no tensor of the base checkpoint*",
         "weights::adapter_supported", WEIGHTS),
    Case("adapter-merge-mismatch", "adapter",
         "no --merged-model: an adapter that cannot be merged into the base",
         lambda g: ["--base-model", str(g.base), "--adapter", str(g.foreign.wide_adapter)], 4,
         "cannot merge * into {root}/base: adapter module '*': the delta is * but the base weight"
         " is *", None, WEIGHTS),
    Case("adapter-hub-base", "adapter", "no --base-model, and the adapter names a hub model",
         lambda g: ["--adapter", str(adapter_config(
             lambda c: c.update(base_model_name_or_path="meta-llama/Llama-2-7b-hf"))(g))], 4,
         "--adapter: *base_model_name_or_path 'meta-llama/Llama-2-7b-hf' is not a local folder*"),
    # -- the lock file ------------------------------------------------------------------------
    Case("lock-syntax", "lock", "a lock file with bad JSON syntax", with_lock('{"digests": '), 1,
         "{root}/merge-harness.lock: bad JSON lock file: *", "lock::digests", "structure,lock"),
    Case("lock-unknown-key", "lock", "a lock file with an unknown key",
         with_lock_keys({"surprise": 1}), 1, "{root}/merge-harness.lock: unknown key(s) surprise",
         "lock::digests", "structure,lock"),
    Case("lock-unknown-digest", "lock", "a lock file with an unknown digest",
         with_lock_keys({"digests": {"merged": "ab", "extra": "cd"}}), 1,
         "{root}/merge-harness.lock: unknown digest(s) extra", "lock::digests", "structure,lock"),
    Case("lock-format", "lock", "a lock file of another format",
         with_lock_keys({"format": "something/2"}), 1,
         "{root}/merge-harness.lock: unsupported lock format 'something/2'*", "lock::digests",
         "structure,lock"),
    # -- the lm-eval tasks ----------------------------------------------------------------------
    Case("tasks-missing", "tasks", "benchmark.include_path naming a missing folder",
         with_tasks(lambda root: None), 4,
         "{root}/gate.toml: benchmark.include_path: *no such folder", None, "benchmark"),
    Case("tasks-empty", "tasks", "a tasks folder without the task",
         with_tasks(task_yaml(None)), 1,
         "benchmark task 'tiny_choice' is not defined under {root}/tasks (no task YAML found)",
         "benchmark::tiny_choice.acc", "benchmark"),
    Case("tasks-yaml", "tasks", "a task YAML with bad syntax",
         with_tasks(task_yaml("task: tiny_choice\n  bad: [\n")), 1,
         "benchmark task 'tiny_choice' is not defined under {root}/tasks*",
         "benchmark::tiny_choice.acc", "benchmark"),
    Case("tasks-data", "tasks", "a task whose local data file is missing",
         with_tasks(task_yaml(TASK_YAML)), 1,
         "{root}/tasks/tiny_choice.yaml: data file 'data/test.jsonl' not found*",
         "benchmark::tiny_choice.acc", "benchmark"),
    # -- the gate configuration ---------------------------------------------------------------
    Case("config-syntax", "config", "a gate config file with bad TOML syntax",
         with_config_file("checks = [structure\n"), 4, "{root}/merge-harness.toml: *"),
    Case("config-unknown-key", "config", "a gate config file with an unknown key",
         with_config_file("max_dorp = 0.1\n"), 4, "{root}/merge-harness.toml: *max_dorp*"),
    Case("config-missing", "config", "--merge-config naming a missing file",
         lambda g: [*merged_and_base(g.merged, g), "--merge-config", str(g.root / "no.toml")], 4,
         "*{root}/no.toml*"),
]


def render_case_table() -> str:
    """The cases as a markdown table: input, bad input, exit status, failing check, message.

    The message is the pattern the tests match, as the user sees it: usage errors (exit 4) after
    ``ERROR:``, the inputs folder shown as ``.``, and each ``*`` (text that varies: tensor names,
    sizes) shown as ``…``.
    """
    rows = [
        "| input | bad input | exit | failing check | what the user sees |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:
        message = case.message.replace("{root}", ".").replace("*", "…")
        if case.check is None:
            message = f"ERROR: {message}"
        check = f"`{case.check}`" if case.check else "(usage error)"
        what = case.what.replace("*", "\\*")
        cells = [case.input, what, str(case.status), check, f"`{message}`"]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
