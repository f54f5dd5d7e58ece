"""The naive check a user would write: load base + adapter and the merged model, compare logits.

    python benchmarks/naive_verify.py BASE ADAPTER MERGED [--batch 2] [--length 64]

Loads the base with transformers in its own dtype, wraps it with ``PeftModel`` (unmerged
adapter), loads the merged model from its folder, runs one batch of random token ids through
both and prints max |Δlogit| and top-1 agreement. This is contender (a) of ``verify.py``; it
holds both models in memory at once, as such scripts do.
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
    parser.add_argument("merged")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stamps = {"import": time.perf_counter() - start}
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype="auto")
    adapted = PeftModel.from_pretrained(base, args.adapter)
    adapted.eval()
    stamps["load_adapted"] = time.perf_counter() - start
    merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype="auto")
    merged.eval()
    stamps["load_merged"] = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, merged.config.vocab_size, (args.batch, args.length), generator=generator)
    with torch.no_grad():
        # (batch, length) -> (batch, length, vocab)
        expected = adapted(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    stamps["forward"] = time.perf_counter() - start
    diff = (got - expected).abs()
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(json.dumps({"max_abs_logit_diff": diff.max().item(),
                      "mean_abs_logit_diff": diff.mean().item(),
                      "top1_agreement": agree, "stamps": stamps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
