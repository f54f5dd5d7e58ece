"""The exact weight oracle: every merged tensor against base + adapter, streamed, in ULPs.

``compare`` judges one tensor, ``stream`` runs the pass over a checkpoint, ``diagnosis`` names
the fault behind a failed tensor.

One pass reads the merged checkpoint in file order together with each tensor's base counterpart
(a reader thread stays ahead of the arithmetic; sha256 digests and NaN/Inf scans of both run on a
second thread, so the pass also yields the canonical digests the structure and hash checks need).
For a tensor the adapter changes, the reference ``R`` is computed in a wide dtype (fp32 for
half-precision checkpoints, fp64 for fp32) by the delta registry, row block by row block, together
with a bound ``S`` on how far a *correct* merge's value before its final rounding can be from
``R``. The merged tensor ``M`` passes when, elementwise,

    |M - R| <= k * ulp(|R| + S) + S

with ``k`` the ULP tolerance (a correct merge needs ``k = 1/2``: one round-to-nearest; the
default ``k = 1`` leaves a factor of two). It must also *change* wherever the reference moves
the base ``W`` by more than rounding can hide: ``|R - W| > ulp(W)/2 + S  =>  M != W``, which
catches a no-op merge of a delta too small for the tolerance check. A tensor the adapter does
not touch must be bit-identical to the base. Memory: the two tensors' bytes plus row-block
temporaries (about 2^19 elements), never a whole model.
"""
