"""Recursion-aware KV caches: one KV slot per layer application of a forward.

Why a cache is exact for a recursive model: every stage of the recursion (each L_level / flat
block application, in every H cycle and ACT step) maps the sequence position by position except
for causal attention, so a stage's output at position p depends only on its inputs at positions
<= p, and by induction so does every latent. Running new positions through the stages in order,
appending their keys and values (after RoPE) to the slot of each layer application, therefore
gives exactly the full re-forward's result, and dropping the last n entries of every slot
(``trim``) leaves exactly the cache of the shorter sequence. The model consumes the slots in
execution order: ``halt_max_steps * H_cycles * (L_cycles + 1) * L_layers`` of them.

Two kinds of slot share one contract with the attention code (``layers.attention``): modules
read ``cache.offset`` for their RoPE positions (an int, or an int32 array [B] of per-row
positions), take their mask from ``cache.make_mask(T, ...)`` and call
``cache.update_and_fetch(k, v)``. A cache may also offer ``cache.rope(x, freqs)``, RoPE at its
positions from a table shared by all slots; dense ``Attention`` uses it when present.

- ``model.make_cache()`` returns stock ``mlx_lm.models.cache.KVCache`` slots, so everything
  mlx-lm does with a cache (batched generation via ``merge``, prompt-cache files, trimming,
  ``--kv-bits`` quantization) works on them unchanged.
- :class:`BatchKVCache` slots (this module, for ``mlx_trm.generate``'s compiled decoder) share
  one :class:`CachePositions`: fixed-capacity buffers, the write column and per-row left padding
  as arrays. Nothing in a decode step is a Python int, so one ``mx.compile``-d function runs a
  step through all slots without retracing; batches of prompts of different lengths are
  left-padded, with per-row RoPE offsets and pad keys masked.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


class CachePositions:
    """Where a batch stands in its fixed-capacity buffers, shared by all slots of one cache.

    ``index`` (int32 scalar array) is the buffer column the next token is written to; row ``b``'s
    prompt is left-padded by ``left_padding[b]`` columns, so its RoPE position at column ``c`` is
    ``c - left_padding[b]`` and columns before ``left_padding[b]`` are masked from every query.
    All slots are written at the same column during a forward; the caller advances ``index``
    once the forward has run (:meth:`advance`).
    """

    def __init__(self, index: mx.array, left_padding: mx.array, capacity: int,
                 window: int | None = None):
        self.index = index
        self.left_padding = left_padding
        self.capacity = capacity
        # Attention reads only the first ``window`` columns (all when None). A decode step's
        # attention costs in proportion to the columns read, so the decoder keeps the window a
        # little past the written columns instead of reading the whole buffer.
        self.window = window
        self._masks: dict[int, mx.array] = {}
        # Derived arrays are built once per forward and shared by every slot: each operation
        # in a decode step costs microseconds of overhead, and there are 56 slots.
        self._offset: mx.array | None = None
        self._start: mx.array | None = None
        # keyed by id(freqs); the entry keeps freqs alive so the id cannot be reused
        self._tables: dict[tuple[int, int], tuple[mx.array, mx.array, mx.array]] = {}

    @property
    def offset(self) -> mx.array:
        """Per-row RoPE position [B] of the first new token (``mx.fast.rope`` takes a vector)."""
        if self._offset is None:
            self._offset = self.index - self.left_padding
        return self._offset

    @property
    def start(self) -> mx.array:
        """``index`` as the [1] start vector of ``mx.slice_update``."""
        if self._start is None:
            self._start = self.index.reshape(1)
        return self._start

    @property
    def columns(self) -> int:
        """How many leading buffer columns attention reads."""
        return self.capacity if self.window is None else min(self.window, self.capacity)

    def make_mask(self, n: int) -> mx.array:
        """Boolean [B, 1, n, columns]: causal over the written columns, pad columns hidden.

        A pad query would see no key at all (a NaN softmax whose NaN later meets real rows as
        0 * NaN), so pad queries see themselves; their outputs are never read by a real token.
        Computed once per forward and shared by every slot.
        """
        if n not in self._masks:
            col = mx.arange(self.columns)
            row = self.index + mx.arange(n)[:, None]  # column of each query
            pad = self.left_padding[:, None, None, None]
            mask = (col <= row) & ((col >= pad) | (col == row))
            self._masks[n] = mask
        return self._masks[n]

    def rope(self, x: mx.array, freqs: mx.array) -> mx.array:
        """NeoX RoPE of ``x`` [B, n, T, Dh] (all of Dh) at this batch's positions.

        The cos/sin table depends only on the positions and ``freqs`` (the wavelengths given to
        ``mx.fast.rope``), so it is built once per forward for each distinct ``freqs`` array and
        reused by every layer application; the angles are computed as mx.fast.rope does.
        """
        B, n, T, dims = x.shape
        half = dims // 2
        key = (id(freqs), T)
        if key not in self._tables:
            pos = (self.offset[:, None] + mx.arange(T)).astype(mx.float32)  # [B, T]
            angles = (pos[..., None] * mx.reciprocal(freqs))[:, None, :, None]  # [B, 1, T, 1, h]
            sin = mx.sin(angles)
            # rotate_half(x) * sin == flip(x halves) * [-sin, sin]: the flip is a strided view,
            # so RoPE is one fused elementwise kernel (no matmul, no concatenation)
            self._tables[key] = (mx.cos(angles), mx.concatenate([-sin, sin], axis=3), freqs)
        cos, signed_sin, _ = self._tables[key]
        halves = x.reshape(B, n, T, 2, half)
        return (halves * cos + halves[..., ::-1, :] * signed_sin).reshape(B, n, T, dims)

    def advance(self, n: int) -> None:
        self.index = self.index + n
        self._reset()

    def _reset(self) -> None:
        self._masks, self._tables = {}, {}
        self._offset = self._start = None


class BatchKVCache:
    """One layer application's keys and values in fixed-capacity buffers [B, H, capacity, Dh].

    Written in place at ``positions.index`` with ``mx.slice_update`` (an array start index, so a
    compiled step never sees a Python position); attention reads the buffer's first
    ``positions.columns`` columns under the mask of ``positions``. Buffers are allocated on the
    first write.
    """

    def __init__(self, positions: CachePositions, keys: mx.array | None = None,
                 values: mx.array | None = None):
        self.positions = positions
        self.keys = keys
        self.values = values

    @property
    def offset(self) -> mx.array:
        return self.positions.offset

    def make_mask(self, n: int, **kwargs: Any) -> mx.array:
        return self.positions.make_mask(n)

    def rope(self, x: mx.array, freqs: mx.array) -> mx.array:
        return self.positions.rope(x, freqs)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            B, H, _, Dk = keys.shape
            C = self.positions.capacity
            self.keys = mx.zeros((B, H, C, Dk), keys.dtype)
            self.values = mx.zeros((B, H, C, values.shape[3]), values.dtype)
        start = self.positions.start
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        C = self.positions.columns
        if C == self.positions.capacity:
            return self.keys, self.values
        return self.keys[..., :C, :], self.values[..., :C, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | list:
        return [] if self.keys is None else (self.keys, self.values)

    def is_trimmable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_batch_cache(num_slots: int, left_padding: list[int], capacity: int
                     ) -> tuple[CachePositions, list[BatchKVCache]]:
    """An empty fixed-capacity cache for a left-padded batch: shared positions and the slots."""
    positions = CachePositions(mx.array(0, dtype=mx.int32),
                               mx.array(left_padding, dtype=mx.int32), capacity)
    return positions, [BatchKVCache(positions) for _ in range(num_slots)]


def grow_batch_cache(positions: CachePositions, cache: list[BatchKVCache], extra: int) -> None:
    """Append ``extra`` empty columns to every buffer (a compiled step retraces once per size)."""
    positions.capacity += extra
    positions._reset()
    for slot in cache:
        if slot.keys is None:
            continue
        B, H, _, Dk = slot.keys.shape
        slot.keys = mx.concatenate([slot.keys, mx.zeros((B, H, extra, Dk), slot.keys.dtype)], 2)
        slot.values = mx.concatenate(
            [slot.values, mx.zeros((B, H, extra, slot.values.shape[3]), slot.values.dtype)], 2)

