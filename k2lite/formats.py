"""Weight formats as data types: BF16 bits, INT4 `pack-quantized`, and their conversions.

numpy has no bfloat16, so a BF16 tensor is a uint16 array of its raw bits (the top half of a
float32). An INT4 matrix is an `Int4Tensor`: compressed-tensors `pack-quantized`, the layout
K2 Thinking ships its routed experts in (docs/formats.md#int4):

  weight_packed int32 [out, in/8]   eight 4-bit codes per word along the input dim, LSB first;
                                    code u = q + 8 (offset binary, not two's complement)
  weight_scale  bf16  [out, in/g]   one scale per group of g input columns (g = 32)
  W[r, c] = (u(r, c) - 8) * scale[r, c // g]        symmetric: no zero point

An FP8 matrix is an `Fp8Tensor`: DeepSeek-V3 / K2 Base / K2 Instruct block quantization,
e4m3fn codes with one float32 `weight_scale_inv` per 128×128 block (a multiplier despite
its name): W[r, c] = e4m3(code[r, c]) * scale_inv[r // 128, c // 128] (docs/formats.md#fp8).

A `TiledBF16` is a BF16 matrix repacked at load (`k2lite.load(..., repack=True)`) so a GEMV
reads it as one sequential stream: tiles of 16 rows, each stored column chunk by column chunk
(32 columns = 64 bytes per row), zero-padded to whole tiles and chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# ---------------------------------------------------------------- bfloat16
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits -> float32 (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bits, round to nearest even (as torch's .to(bfloat16)); NaN stays NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(np.asarray(x, np.float32)), np.uint16(0x7FC0), rounded)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), kept as float32."""
    return bf16_to_f32(f32_to_bf16(x))


# ---------------------------------------------------------------- BF16 in 16-row tiles
TILE_ROWS, TILE_COLS = 16, 32


@dataclass
class TiledBF16:
    """A [out, in] BF16 matrix as data[out/16, in/32, 16, 32] (bits; both dims padded up).
    rows: the same matrix row-major when it stays mapped from the checkpoint anyway; linear()
    then uses the tiles for single tokens (decode) and the rows for batches (prefill, batched
    decode), where the row-major kernels are faster."""
    data: np.ndarray        # uint16 [ceil(out/16), ceil(in/32), 16, 32]
    shape: tuple            # (out, in)
    rows: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def tiled_bf16_shape(shape) -> tuple:
    """TiledBF16.data's shape for an [out, in] matrix: (out/16, in/32, 16, 32), rounded up."""
    n, i = shape
    return -(-n // TILE_ROWS), -(-i // TILE_COLS), TILE_ROWS, TILE_COLS


def tile_bf16(w: np.ndarray, out: np.ndarray | None = None) -> TiledBF16:
    """uint16 [N, I] -> TiledBF16; `out` (uint16, the padded size) receives the data if given."""
    n, i = w.shape
    shape = tiled_bf16_shape(w.shape)
    nt, ic = shape[:2]
    size = int(np.prod(shape))
    if out is None:     # 64-byte aligned: each row's 32-column chunk is one cache line
        raw = np.empty(size + 32, np.uint16)
        out = raw[(-raw.ctypes.data % 64) // 2:][:size]
    data = out.reshape(shape)     # every tile written below, padding too
    slab = 64              # tiles per step: a few MB of temporary, never a full-size copy
    for t0 in range(0, nt, slab):
        t1 = min(nt, t0 + slab)
        rows = w[t0 * TILE_ROWS:t1 * TILE_ROWS]
        if rows.shape != ((t1 - t0) * TILE_ROWS, ic * TILE_COLS):     # edge: zero-pad
            pad = np.zeros(((t1 - t0) * TILE_ROWS, ic * TILE_COLS), np.uint16)
            pad[:rows.shape[0], :i] = rows
            rows = pad
        data[t0:t1] = rows.reshape(t1 - t0, TILE_ROWS, ic, TILE_COLS).transpose(0, 2, 1, 3)
    return TiledBF16(data, (n, i))


def untile_bf16(t: TiledBF16) -> np.ndarray:
    """TiledBF16 -> uint16 [N, I]."""
    n, i = t.shape
    nt, ic = t.data.shape[:2]
    return t.data.transpose(0, 2, 1, 3).reshape(nt * TILE_ROWS, ic * TILE_COLS)[:n, :i]


# ---------------------------------------------------------------- INT4 pack-quantized
@dataclass
class Int4Tensor:
    """A [out, in] matrix stored as group-quantized symmetric INT4 (compressed-tensors layout)."""
    packed: np.ndarray      # int32  [out, ceil(in/8)]
    scales: np.ndarray      # uint16 (bf16 bits) [out, in/group_size]; float32 also accepted
    shape: tuple            # (out, in)
    group_size: int = 32

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int codes in [-8, 7], [out, in] -> int32 [out, ceil(in/8)] (zero-padded columns)."""
    q = np.asarray(q)
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError("int4 codes must lie in [-8, 7]")
    out, n = q.shape
    u = np.zeros((out, -(-n // 8) * 8), np.uint32)
    u[:, :n] = (q.astype(np.int64) + 8).astype(np.uint32)
    u = u.reshape(out, -1, 8)
    word = np.zeros(u.shape[:2], np.uint32)
    for j in range(8):                       # column 8k+j -> bits [4j, 4j+4) of word k
        word |= u[:, :, j] << np.uint32(4 * j)
    return word.view(np.int32)


def unpack_int4(packed: np.ndarray, n_in: int) -> np.ndarray:
    """int32 [out, ceil(in/8)] -> int8 codes [out, in] in [-8, 7]."""
    w = np.asarray(packed, np.int32).view(np.uint32)
    shifts = np.arange(8, dtype=np.uint32) * 4
    u = (w[:, :, None] >> shifts) & np.uint32(0xF)
    return (u.reshape(w.shape[0], -1)[:, :n_in].astype(np.int8) - 8).astype(np.int8)


def scales_f32(scales: np.ndarray) -> np.ndarray:
    s = np.asarray(scales)
    return bf16_to_f32(s) if s.dtype == np.uint16 else s.astype(np.float32)


def dequantize_int4_arrays(packed: np.ndarray, scales: np.ndarray, n_in: int, group_size: int) -> np.ndarray:
    """(packed, scales) -> float32 [out, in]. compressed-tensors multiplies q·scale in the
    scale's dtype, so with bf16 scales each weight is rounded to bf16 (q has 4 bits, the
    scale 8, the product up to 12): we do the same, so our weights equal the library's."""
    q = unpack_int4(packed, n_in).astype(np.float32)
    s = np.repeat(scales_f32(scales), group_size, axis=1)[:, :n_in]
    w = q * s
    return round_bf16(w) if np.asarray(scales).dtype == np.uint16 else w


def dequantize_int4(t: Int4Tensor) -> np.ndarray:
    """Int4Tensor -> float32 [out, in]."""
    return dequantize_int4_arrays(t.packed, t.scales, t.shape[1], t.group_size)


def quantize_int4(w: np.ndarray, group_size: int = 32, qat_grid: bool = False) -> Int4Tensor:
    """float [out, in] -> Int4Tensor as compressed-tensors' quantizer does it: per group
    scale = absmax / 7.5 stored as bf16, q = round_half_even(clamp(w / scale, -8, 7)).
    qat_grid=True uses scale = absmax / 7 and levels -7..7 (K2 Thinking's QAT grid)."""
    w = np.asarray(w, np.float32)
    out, n = w.shape
    if n % group_size:
        raise ValueError(f"input dim {n} is not a multiple of group size {group_size}")
    g = w.reshape(out, n // group_size, group_size)
    amax = np.abs(g).max(axis=2)
    scale_bits = f32_to_bf16(amax / (7.0 if qat_grid else 7.5))
    scale = bf16_to_f32(scale_bits)
    safe = np.where(scale == 0, 1.0, scale)
    lo = -7 if qat_grid else -8
    q = np.clip(np.round(g / safe[:, :, None]), lo, 7).astype(np.int8).reshape(out, n)
    return Int4Tensor(pack_int4(q), scale_bits, (out, n), group_size)


# ---------------------------------------------------------------- FP8 e4m3fn, 128×128 blocks
def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes: 1 sign, 4 exponent (bias 7), 3 mantissa
    bits; exponent 0 is subnormal (m/8 · 2^-6); no infinities; S.1111.111 is NaN."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    mag = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    mag = np.where((codes & 0x7F) == 0x7F, np.nan, mag)
    return (sign * mag).astype(np.float32)


E4M3 = _e4m3_table()
E4M3_MAX = 448.0


@dataclass
class Fp8Tensor:
    """A [out, in] matrix stored as e4m3fn codes with block scales (DeepSeek-V3 fp8)."""
    weight: np.ndarray      # uint8 [out, in] e4m3fn codes
    scale_inv: np.ndarray   # float32 [ceil(out/bo), ceil(in/bi)] dequantization multipliers
    shape: tuple            # (out, in)
    block: tuple = (128, 128)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale_inv.nbytes


def dequantize_fp8(t: Fp8Tensor, rows: slice = slice(None)) -> np.ndarray:
    """Fp8Tensor (optionally a row range) -> float32: table lookup times the block scale."""
    w = t.weight[rows]
    r0 = rows.start or 0
    bo, bi = t.block
    out = E4M3[w]
    n, m = out.shape
    if r0 % bo == 0 and n % bo == 0 and m % bi == 0:     # whole blocks: broadcast, no copies
        blocks = out.reshape(n // bo, bo, m // bi, bi)
        blocks *= t.scale_inv[r0 // bo:r0 // bo + n // bo, None, :, None]
        return out
    r = (np.arange(n) + r0) // bo
    return out * np.repeat(t.scale_inv[r], bi, axis=1)[:, :m]


def f32_to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn codes, round to nearest (ties to even code), saturating at ±448."""
    x = np.asarray(x, np.float32)
    pos = E4M3[:0x7F]                                    # codes 0..126: 0 .. 448, increasing
    a = np.minimum(np.abs(x), np.float32(E4M3_MAX))
    hi = np.clip(np.searchsorted(pos, a), 1, 126)
    lo = hi - 1
    d_lo, d_hi = a - pos[lo], pos[hi] - a
    code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo).astype(np.uint8)
    code = np.where(a == 0, 0, code).astype(np.uint8)
    return np.where(np.signbit(x), code | 0x80, code).astype(np.uint8)


def quantize_fp8(w: np.ndarray, block: tuple = (128, 128)) -> Fp8Tensor:
    """float [out, in] -> Fp8Tensor as DeepSeek's weight_quant: scale = amax / 448 per block."""
    w = np.asarray(w, np.float32)
    out, n = w.shape
    bo, bi = block
    nbo, nbi = -(-out // bo), -(-n // bi)
    pad = np.zeros((nbo * bo, nbi * bi), np.float32)
    pad[:out, :n] = w
    amax = np.abs(pad.reshape(nbo, bo, nbi, bi)).max(axis=(1, 3))
    scale = np.where(amax == 0, 1.0, amax / E4M3_MAX).astype(np.float32)
    full = np.repeat(np.repeat(scale, bo, 0), bi, 1)[:out, :n]
    return Fp8Tensor(f32_to_e4m3(w / full), scale, (out, n), tuple(block))


def to_dense(w) -> np.ndarray:
    """Any weight format -> float32 [N, I] (the expanded prefill form's kv_b, embeddings, oracles)."""
    if isinstance(w, Int4Tensor):
        return dequantize_int4(w)
    if isinstance(w, Fp8Tensor):
        return dequantize_fp8(w)
    if isinstance(w, TiledBF16):
        return bf16_to_f32(untile_bf16(w))
    return bf16_to_f32(w) if w.dtype == np.uint16 else np.asarray(w, np.float32)
