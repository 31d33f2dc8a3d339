"""The recursion-aware KV cache: one slot per layer application of a forward.

Why a cache is exact for a recursive model: every stage of the recursion (each L_level / flat
block application, in every H cycle and ACT step) maps the sequence position by position except
for causal attention, so a stage's output at position p depends only on its inputs at positions
<= p, and by induction so does every latent. Running new positions through the stages in order,
appending their keys and values (after RoPE) to the slot of each layer application, therefore
gives exactly the full re-forward's result, and moving the write column back by n (a
decoder's ``rewind``) leaves exactly the cache of the shorter sequence. The model consumes the
slots in execution order: ``halt_max_steps * H_cycles * (L_cycles + 1) * L_layers`` of them, ACT
step by ACT step, so the slots of ACT step k are ``cache[k * S:(k + 1) * S]`` with ``S`` the
layer applications of one step.

Slots keep the contract of mlx-lm's caches that the attention code reads (``layers.attention``):
``offset`` (RoPE positions), ``make_mask(T, ...)`` and ``update_and_fetch(k, v)``, plus
``rope(x, freqs)``, RoPE at the cache's positions from a table shared by every slot.

:class:`KVSlot` is the one slot type of our decoders. Its buffers have a fixed capacity and the
positions (write column, left padding of each row) are arrays shared by all slots in one
:class:`CachePositions`, so nothing in a decode step is a Python int and one ``mx.compile``-d
function runs every token without retracing. Batches of prompts of different lengths are
left-padded, with per-row RoPE positions and pad keys masked. Two more uses share it:

- ``active`` (adaptive halting): positions that halted write the keys and values they kept from
  their last computed ACT step (``keep``) instead of new ones;
- no buffers (``capacity`` None): the whole sequence from position 0 in one pass, causal, as the
  uncached forward (teacher-forced adaptive evaluation).

``model.make_cache()`` (mlx-lm's entry point) returns stock ``mlx_lm.models.cache.KVCache`` slots
instead, so everything mlx-lm does with a cache (batched generation, prompt-cache files,
trimming, ``--kv-bits``) works on them unchanged; mlx_trm.interop runs the compiled step on them.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..models.layers import apply_rope


class CachePositions:
    """Where a batch stands in its fixed-capacity buffers, shared by every slot of one cache.

    ``index`` (int32 scalar array) is the buffer column the next token is written to; row ``b``'s
    prompt is left-padded by ``left_padding[b]`` columns, so its RoPE position at column ``c`` is
    ``c - left_padding[b]`` and columns before ``left_padding[b]`` are masked from every query.
    Every slot is written at the same column during a forward; the caller moves ``index`` once
    the forward has run (:meth:`advance`). ``capacity`` None: no buffers, the new positions are
    the whole sequence from position 0.
    """

    def __init__(self, index: mx.array | None = None, left_padding: mx.array | None = None,
                 capacity: int | None = None, window: int | None = None,
                 active: mx.array | None = None):
        self.index = index
        self.left_padding = left_padding
        self.capacity = capacity
        # Attention reads only the first ``window`` columns (all when None). A decode step's
        # attention costs in proportion to the columns read, so decoders keep the window a
        # little past the written columns instead of reading the whole buffer.
        self.window = window
        # [B, 1, T, 1]: the new positions that compute keys (the others write their slot's keep)
        self.active = active
        self._reset()

    def _reset(self) -> None:
        # Derived arrays are built once per forward and shared by every slot: each operation
        # in a decode step costs microseconds of overhead, and there are 56 slots.
        self._masks: dict[int, Any] = {}
        # keyed by id(freqs); the entry keeps freqs alive so the id cannot be reused
        self._tables: dict[tuple[int, int], tuple[mx.array, mx.array, mx.array]] = {}
        self._offset: mx.array | None = None
        self._start: mx.array | None = None

    @property
    def offset(self) -> mx.array | int:
        """Per-row RoPE position [B] of the first new token (``mx.fast.rope`` takes a vector)."""
        if self.capacity is None:
            return 0
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

    def make_mask(self, n: int) -> mx.array | str | None:
        """Boolean [B, 1, n, columns]: causal over the written columns, pad columns hidden.

        A pad query would see no key at all (a NaN softmax whose NaN later meets real rows as
        0 * NaN), so pad queries see themselves; their outputs are never read by a real token.
        Computed once per forward and shared by every slot.
        """
        if self.capacity is None:
            return "causal" if n > 1 else None
        if n not in self._masks:
            col = mx.arange(self.columns)
            row = self.index + mx.arange(n)[:, None]  # column of each query
            pad = self.left_padding[:, None, None, None]
            self._masks[n] = (col <= row) & ((col >= pad) | (col == row))
        return self._masks[n]

    def rope(self, x: mx.array, freqs: mx.array, dims: int | None = None) -> mx.array:
        """NeoX RoPE of the first ``dims`` (default: all) of ``x`` [B, n, T, Dh] at this batch's
        positions.

        The cos/sin table depends only on the positions and ``freqs`` (the wavelengths given to
        ``mx.fast.rope``), so it is built once per forward for each distinct ``freqs`` array and
        reused by every layer application; the angles are computed as mx.fast.rope does.
        """
        if self.capacity is None:
            return apply_rope(x, freqs, 0, dims)
        if dims is not None and dims < x.shape[-1]:  # partial RoPE (SwitchHead): the rest as is
            return mx.concatenate([self.rope(x[..., :dims], freqs), x[..., dims:]], axis=-1)
        B, n, T, dims = x.shape
        half = dims // 2
        key = (id(freqs), T)
        if key not in self._tables:
            pos = (self.offset[:, None] + mx.arange(T)).astype(mx.float32)  # [B, T]
            angles = (pos[..., None] * mx.reciprocal(freqs))[:, None, :, None]  # [B, 1, T, 1, h]
            sin = mx.sin(angles)
            # rotate_half(x) * sin == flip(x halves) * [-sin, sin]: the flip is a strided view,
            # so RoPE is one fused elementwise kernel (no matmul, no concatenation). The table
            # takes x's dtype, so a float16 model stays in float16.
            self._tables[key] = (mx.cos(angles).astype(x.dtype),
                                 mx.concatenate([-sin, sin], axis=3).astype(x.dtype), freqs)
        cos, signed_sin, _ = self._tables[key]
        halves = x.reshape(B, n, T, 2, half)
        return (halves * cos + halves[..., ::-1, :] * signed_sin).reshape(B, n, T, dims)

    def advance(self, n: int) -> None:
        """The forward's ``n`` new positions are written: the next ones go after them. A
        negative ``n`` drops the last ``-n`` (speculative decoding's trim): columns past the write
        column are masked from every query and written over later."""
        self.index = self.index + n
        self._reset()

    def grow(self, slots: list[KVSlot], extra: int) -> None:
        """Append ``extra`` empty columns to every buffer (a compiled step retraces once per
        size)."""
        self.capacity += extra
        self._reset()
        pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
        for slot in slots:
            if slot.keys is not None:
                slot.keys, slot.values = mx.pad(slot.keys, pad), mx.pad(slot.values, pad)


class KVSlot:
    """One layer application's keys and values in fixed-capacity buffers [B, H, capacity, Dh].

    Written in place at ``positions.index`` with ``mx.slice_update`` (an array start index, so a
    compiled step never sees a Python position); attention reads the buffer's first
    ``positions.columns`` columns under the mask of ``positions``. Buffers are allocated on the
    first write. ``keep`` (adaptive halting): the keys and values that positions not
    ``positions.active`` write instead of new ones. ``written`` is what the last call wrote.
    """

    def __init__(self, positions: CachePositions, keys: mx.array | None = None,
                 values: mx.array | None = None, keep: tuple[mx.array, mx.array] | None = None):
        self.positions = positions
        self.keys, self.values = keys, values
        self.keep = keep
        self.written: tuple[mx.array, mx.array] | None = None

    @property
    def offset(self) -> mx.array | int:
        return self.positions.offset

    def make_mask(self, n: int, **kwargs: Any) -> mx.array | str | None:
        return self.positions.make_mask(n)

    def rope(self, x: mx.array, freqs: mx.array, dims: int | None = None) -> mx.array:
        return self.positions.rope(x, freqs, dims)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        pos = self.positions
        if self.keep is not None:
            keys = mx.where(pos.active, keys, self.keep[0])
            values = mx.where(pos.active, values, self.keep[1])
        self.written = (keys, values)
        if pos.capacity is None:
            return keys, values
        if self.keys is None:
            B, H, _, Dk = keys.shape
            self.keys = mx.zeros((B, H, pos.capacity, Dk), keys.dtype)
            self.values = mx.zeros((B, H, pos.capacity, values.shape[3]), values.dtype)
        self.keys = mx.slice_update(self.keys, keys, pos.start, axes=(2,))
        self.values = mx.slice_update(self.values, values, pos.start, axes=(2,))
        C = pos.columns
        if C == pos.capacity:
            return self.keys, self.values
        return self.keys[..., :C, :], self.values[..., :C, :]

    @property
    def state(self) -> tuple[mx.array, mx.array] | list:
        return [] if self.keys is None else (self.keys, self.values)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(num_slots: int, left_padding: list[int], capacity: int
               ) -> tuple[CachePositions, list[KVSlot]]:
    """An empty fixed-capacity cache for a left-padded batch: shared positions and the slots."""
    positions = CachePositions(mx.array(0, dtype=mx.int32),
                               mx.array(left_padding, dtype=mx.int32), capacity)
    return positions, [KVSlot(positions) for _ in range(num_slots)]


def slots_over(positions: CachePositions, keys: list, values: list,
               keep: list | None = None) -> list[KVSlot]:
    """Slots over existing buffers (inside a compiled step, where buffers are its inputs)."""
    keep = keep or [None] * len(keys)
    return [KVSlot(positions, k, v, kv) for k, v, kv in zip(keys, values, keep)]
