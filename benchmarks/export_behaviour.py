"""The exported GGUF's behaviour through llama.cpp against the merged model's, per token.

    python benchmarks/export_behaviour.py            # needs llama-cpp-python installed

The ``export`` checks compare weights and metadata; only running the file shows one whose
every weight is right but whose runtime output is wrong. This script runs the tiny merge of
fixtures/gguf through transformers (float32) and each committed GGUF through llama.cpp
(``llama-cpp-python``, which builds llama.cpp from source when installed: too slow for CI),
on the same token ids, and prints the largest and the root-mean-square logit difference and
the top-1 agreement:

- ``llama-f32.gguf`` calibrates the noise floor: llama.cpp's kernels against torch's;
- ``llama-{f16,bf16,q8_0}.gguf`` add the quantization noise of each type;
- ``faults/rope-theta.gguf`` and a copy of ``llama-q8_0.gguf`` whose RMS norm epsilon was
  changed with ``gguf_set_metadata`` have the right weights (the values check passes on both;
  the parameters check names the change) but compute something else.

A file whose RMS difference exceeds ``--margin`` times the worst of the faithful files is
flagged.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GGUF = REPO / "fixtures" / "gguf"
TEXT = REPO / "fixtures" / "text" / "sample.txt"
FAITHFUL = ("f32", "f16", "bf16", "q8_0")


def reference_logits(tokens: list[list[int]]) -> list[np.ndarray]:
    """The merged model's logits (float32, transformers) for each sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(GGUF / "llama" / "merged", dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in tokens:
            out.append(model(torch.tensor([ids])).logits[0].numpy())
    return out


def gguf_logits(path: Path, tokens: list[list[int]]) -> list[np.ndarray]:
    """llama.cpp's logits for each sequence."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                seed=0)
    out = []
    for ids in tokens:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return out


def compare(found: list[np.ndarray], expected: list[np.ndarray]) -> tuple[float, float, float]:
    """(largest and root-mean-square logit difference, fraction of positions with the same
    top-1 token)."""
    pairs = list(zip(found, expected, strict=True))
    largest = max(float(np.abs(a - b).max()) for a, b in pairs)
    rms = float(np.sqrt(np.mean(np.concatenate([((a - b) ** 2).ravel() for a, b in pairs]))))
    same = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in pairs])))
    return largest, rms, same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--margin", type=float, default=2.0)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GGUF / "llama" / "merged")
    lines = [ln for ln in TEXT.read_text().splitlines() if ln.strip()]
    tokens = []
    for i in range(args.sequences):
        text = " ".join(lines[i : i + 4])
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
        tokens.append(ids[: args.length])
    expected = reference_logits(tokens)
    with tempfile.TemporaryDirectory() as scratch:
        epsilon = Path(scratch) / "norm-eps.gguf"
        shutil.copy2(GGUF / "llama-q8_0.gguf", epsilon)
        subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_set_metadata", str(epsilon),
                        "llama.attention.layer_norm_rms_epsilon", "0.01", "--force"],
                       check=True, capture_output=True)
        files = {f"llama-{t}.gguf": GGUF / f"llama-{t}.gguf" for t in FAITHFUL}
        files["faults/rope-theta.gguf"] = GGUF / "faults" / "rope-theta.gguf"
        files["q8_0, rms epsilon 1e-6 -> 0.01"] = epsilon
        logits = {name: gguf_logits(path, tokens) for name, path in files.items()}
    figures = {name: compare(found, expected) for name, found in logits.items()}
    faithful = logits["llama-q8_0.gguf"]
    floor = max(figures[f"llama-{t}.gguf"][1] for t in FAITHFUL)
    print(f"{len(tokens)} sequences of up to {args.length} tokens; reference: the merged model"
          " in transformers, float32")
    print(f"| file | max abs logit diff | RMS logit diff | top-1 agreement | RMS vs faithful"
          f" q8_0 in llama.cpp | verdict (RMS > {args.margin:g} x faithful worst"
          f" {floor:.3g}) |")
    print("|---|---|---|---|---|---|")
    for name, (diff, rms, same) in figures.items():
        against = compare(logits[name], faithful)[1]
        verdict = "differs" if rms > args.margin * floor else "within noise"
        print(f"| {name} | {diff:.3g} | {rms:.3g} | {same:.1%} | {against:.3g} | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
