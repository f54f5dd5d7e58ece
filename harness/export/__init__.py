"""Verify an exported file (GGUF) against the merged checkpoint it claims to hold.

``reader`` opens a GGUF with the ``gguf`` package's own reader behind guards; ``layout`` knows
how llama.cpp's converter renames and transforms each architecture's tensors; ``encoding`` is
the per-type knowledge (exact re-encoding, dequantizing, error bounds); ``values`` streams the
tensors and compares them; ``provenance`` estimates how much of the merge the export retained;
``parameters`` and ``vocabulary`` compare the metadata. Requires the optional ``gguf`` extra.
"""
