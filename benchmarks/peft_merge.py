"""The usual merge: peft's load + ``merge_and_unload`` + ``save_pretrained``.

    python benchmarks/peft_merge.py BASE ADAPTER OUT [--max-shard-size 5GB]

Loads the base with transformers in its own dtype, applies the adapter with ``PeftModel``,
merges and saves. This is the reference contender of ``merge.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("adapter")
    parser.add_argument("out")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stamps = {"import": time.perf_counter() - start}
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype="auto")
    stamps["load_base"] = time.perf_counter() - start
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    stamps["merge"] = time.perf_counter() - start
    shard = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
    merged.save_pretrained(args.out, max_shard_size=shard)
    stamps["save"] = time.perf_counter() - start
    print(json.dumps({"stamps": stamps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
