"""The paged latent KV cache.

MLA caches one row per token per layer: the normalised latent c (kv_lora_rank) followed by
the rotated rope key k_pe (qk_rope_head_dim): 576 values for K2, float32, bf16 (uint16 bits,
rounded on write: the backend's ops.cache_dtype, the default) or int8 (kv8_quantize: codes
with a scale for c and one for k_pe per token, 592 bytes a K2 row against 1152 for bf16;
load(kv_cache="int8")). Rows live in fixed-size
pages of `page_size` tokens taken from one pool shared by every sequence; each sequence owns
a list of page ids (its page table), the same ids in every layer. A sequence that closes
returns its pages at once, so many conversations of different lengths share the memory
without fragmentation (vLLM's PagedAttention idea, applied to the latent).

    pool: [layers, pages, page_size, width]   float32, or uint16 (bf16 bits)
          [layers, pages, page_size, kv8_row_bytes(width)]   int8 rows
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backends.checks import cdiv

from .formats import bf16_to_f32, f32_to_bf16


# ---------------------------------------------------------------- int8 rows
# An int8 row holds the W = C+R codes round(x / s), |code| <= 127, with s = absmax / 127 taken
# separately over the latent c (C values) and the rope key (R values: another scale of numbers),
# then, from byte kv8_meta(W), float32 s_c, s_r and int32 sums of the c and of the k_pe codes
# (the VNNI kernel takes the query as unsigned codes + 128 and subtracts 128 · these sums).
# Per-token scales keep each score one integer dot product (src/common.h, mla_decode.cpp).
def kv8_meta(width: int) -> int:
    return (width + 3) // 4 * 4


def kv8_row_bytes(width: int) -> int:
    return kv8_meta(width) + 16


def kv8_quantize(rows: np.ndarray, c: int) -> np.ndarray:
    """float rows [..., W] (latent c = the first c values) -> int8 rows [..., kv8_row_bytes(W)]."""
    rows = np.asarray(rows, np.float32)
    w = rows.shape[-1]
    x = rows.reshape(-1, w)
    out = np.zeros((x.shape[0], kv8_row_bytes(w)), np.int8)
    meta = out[:, kv8_meta(w):].view(np.float32)      # [n, 4]: s_c, s_r, then the sums' bits
    for k, (a, b) in enumerate(((0, c), (c, w))):
        amax = np.max(np.abs(x[:, a:b]), axis=1, initial=0.0)
        inv = np.where(amax > 0, np.float32(127) / np.maximum(amax, np.float32(1e-30)), 0).astype(np.float32)
        codes = np.clip(np.rint(x[:, a:b] * inv[:, None]), -127, 127).astype(np.int8)
        out[:, a:b] = codes
        meta[:, k] = amax / np.float32(127)
        meta.view(np.int32)[:, 2 + k] = codes.sum(axis=1, dtype=np.int32)
    return out.reshape(rows.shape[:-1] + (out.shape[1],))


def kv8_dequantize(rows: np.ndarray, c: int, width: int) -> np.ndarray:
    """int8 rows [..., kv8_row_bytes(width)] -> float32 [..., width]: code · its part's scale."""
    x = np.ascontiguousarray(rows).reshape(-1, rows.shape[-1])
    s = np.ascontiguousarray(x[:, kv8_meta(width):kv8_meta(width) + 8]).view(np.float32)   # [n, 2]
    out = x[:, :width].astype(np.float32)
    out[:, :c] *= s[:, :1]
    out[:, c:] *= s[:, 1:]
    return out.reshape(rows.shape[:-1] + (width,))


KV_DTYPES = {"f32": np.float32, "bf16": np.uint16, "int8": np.int8}


def common_prefix(a, b) -> int:
    """How many ids two sequences share from the start (prompt caching; numpy, as prompts can
    be 100K tokens)."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:m], np.int64) != np.asarray(b[:m], np.int64))
    return int(differ[0]) if len(differ) else m


class CacheFullError(RuntimeError):
    """No free page is left for a sequence to grow (or it would pass the context limit)."""


@dataclass(eq=False)     # identity: a sequence is itself, not its pages
class CacheSlot:
    """One sequence's place in the paged cache (the page table of a `llm.Sequence`, which adds its
    token ids and the model calls)."""
    pages: list = field(default_factory=list)   # page ids, in token order
    length: int = 0                             # tokens cached so far
    closed: bool = False


class PagedKVCache:
    def __init__(self, n_layers: int, width: int, page_size: int = 64, max_pages: int = 1024,
                 initial_pages: int = 16, dtype=np.float32, latent: int | None = None):
        """dtype float32, uint16 (bf16 bits) or int8 (kv8 rows; latent = C, the width of c)."""
        if page_size < 1 or max_pages < 1:
            raise ValueError("page_size and max_pages must be positive")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.uint16, np.int8):
            raise ValueError(f"dtype: expected float32, uint16 (bf16) or int8, got {dtype}")
        if dtype == np.int8 and not (latent is not None and 0 < latent <= width):
            raise ValueError(f"latent: an int8 cache needs the latent width (0 < latent <= {width}), got {latent}")
        self.n_layers, self.width, self.page_size, self.max_pages = n_layers, width, page_size, max_pages
        self.latent = latent
        row = kv8_row_bytes(width) if dtype == np.int8 else width
        self.pool = np.zeros((n_layers, min(initial_pages, max_pages), page_size, row), dtype)
        self.free_pages = list(range(self.pool.shape[1] - 1, -1, -1))   # pop() gives low ids first

    # ------------------------------------------------------------ allocation
    @property
    def capacity_tokens(self) -> int:
        return self.max_pages * self.page_size

    @property
    def pages_free(self) -> int:
        return len(self.free_pages) + self.max_pages - self.pool.shape[1]

    def new_seq(self) -> CacheSlot:
        return CacheSlot()

    def pages_for(self, n: int) -> int:
        """Pages that hold n tokens."""
        return cdiv(n, self.page_size)

    def _take_pages(self, seq: CacheSlot, k: int):
        """Grow seq to k pages from the free list (the caller checked pages_free)."""
        while len(seq.pages) < k:
            if not self.free_pages:
                self._grow()
            seq.pages.append(self.free_pages.pop())

    def _grow(self):
        """Double the pool (up to max_pages); page ids stay valid."""
        old = self.pool.shape[1]
        new = min(max(2 * old, 1), self.max_pages)
        if new == old:
            raise CacheFullError(f"KV cache is full: all {self.max_pages} pages of {self.page_size} tokens are in use")
        pool = np.zeros((self.n_layers, new) + self.pool.shape[2:], self.pool.dtype)
        pool[:, :old] = self.pool
        self.pool = pool
        self.free_pages = list(range(new - 1, old - 1, -1)) + self.free_pages

    def reserve(self, seqs, positions):
        """Give every sequence enough pages for the positions about to be written."""
        if len(seqs) == len(positions):            # decode: one new position per sequence
            last = list(zip(seqs, (int(p) for p in positions)))
        else:                                      # prefill: several positions of seqs[0]
            last = [(seqs[0], int(np.max(positions)))]
        if any(s.closed for s, _ in last):
            raise ValueError("sequence is closed")
        need = sum(max(0, p // self.page_size + 1 - len(s.pages)) for s, p in last)
        if need > self.pages_free:
            raise CacheFullError(f"KV cache is full: {need} more pages needed, {self.pages_free} free "
                                 f"(capacity {self.capacity_tokens} tokens)")
        for s, p in last:
            self._take_pages(s, p // self.page_size + 1)

    def truncate(self, seq: CacheSlot, n: int):
        """Forget positions n.. of a sequence; pages it no longer needs go back to the pool."""
        keep = self.pages_for(n)
        self.free_pages.extend(reversed(seq.pages[keep:]))
        del seq.pages[keep:]
        seq.length = min(seq.length, n)

    def copy_prefix(self, src: CacheSlot, n: int) -> CacheSlot:
        """A new sequence holding a copy of src's first n rows, in pages of its own."""
        k = self.pages_for(n)
        if k > self.pages_free:
            raise CacheFullError(f"KV cache is full: {k} pages needed to copy a prefix, {self.pages_free} free")
        dst = CacheSlot()
        self._take_pages(dst, k)
        self.pool[:, dst.pages] = self.pool[:, src.pages[:k]]
        dst.length = n
        return dst

    def free(self, seq: CacheSlot):
        self.free_pages.extend(reversed(seq.pages))
        seq.pages, seq.length, seq.closed = [], 0, True

    # ------------------------------------------------------------ reading and writing
    def _slots(self, seqs, positions):
        """(page ids, offsets) of each position; one sequence with T positions, or B with one each."""
        if len(seqs) == len(positions):
            pages = np.array([s.pages[p // self.page_size] for s, p in zip(seqs, positions)], np.int64)
        else:
            pages = np.asarray(seqs[0].pages, np.int64)[positions // self.page_size]
        return pages, positions % self.page_size

    def write(self, layer: int, seqs, positions, rows: np.ndarray):
        pages, offs = self._slots(seqs, positions)
        dt = self.pool.dtype
        self.pool[layer, pages, offs] = (f32_to_bf16(rows) if dt == np.uint16 else
                                         kv8_quantize(rows, self.latent) if dt == np.int8 else rows)

    def gather(self, layer: int, seq: CacheSlot, n: int, start: int = 0) -> np.ndarray:
        """Cached rows start..n-1 of one sequence, [n - start, width] float32."""
        p0 = start // self.page_size
        pages = np.asarray(seq.pages[p0:self.pages_for(n)], np.int64)
        rows = self.pool[layer, pages].reshape(-1, self.pool.shape[-1])[start - p0 * self.page_size:n - p0 * self.page_size]
        if rows.dtype == np.int8:
            return kv8_dequantize(rows, self.latent, self.width)
        return bf16_to_f32(rows) if rows.dtype == np.uint16 else rows

    def page_table(self, seqs):
        """(table i32 [B, max pages], lengths i32 [B]) for this step; lengths include the new token."""
        n = max(len(s.pages) for s in seqs)
        table = np.zeros((len(seqs), n), np.int32)
        for b, s in enumerate(seqs):
            table[b, :len(s.pages)] = s.pages
        lengths = np.array([s.length + 1 for s in seqs], np.int32)
        return table, lengths

    def advance(self, seqs, positions):
        if len(seqs) == len(positions):
            for s, p in zip(seqs, positions):
                s.length = int(p) + 1
        else:
            seqs[0].length = int(positions[-1]) + 1
