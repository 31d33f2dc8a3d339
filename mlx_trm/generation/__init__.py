"""Inference: the recursion-aware KV cache, the decoders built on it, and text generation.

- ``cache.py``: the one slot type (fixed capacity, per-row positions, left padding, adaptive
  halting's keep-what-you-had) and why a cache is exact for a recursive model;
- ``decoders.py``: the decoder interface, fixed depth (cached and compiled, or the reference's
  full re-forward);
- ``adaptive.py``: per-token adaptive halting;
- ``speculative.py``: exact speculative recursion (early ACT steps or a small model draft,
  the full depth verifies);
- ``sampling.py``, ``generate.py``, ``stats.py``: mlx-lm's generation API on those decoders
  (``generate_step``, ``stream_generate``, ``generate``, ``batch_generate``) and its statistics;
- ``session.py``: a story written together (``mlx_trm.chat``).
"""
