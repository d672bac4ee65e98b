"""GGUF tensor codecs: every ggml type decoded to float32, the common types encoded back bit-exact.

Decoding is gguf-py's (one correct float32 result: exact products, one rounding): its block decoders over
cache-sized batches for the types adaptools encodes (Q8_0 by one torch product, the same values),
`gguf.quants.dequantize` for the others. Encoding: Q8_0 by a batched torch port of ggml's `quantize_row_q8_0_ref`;
F32/F16/BF16 and the other legacy block types (Q4_0, Q4_1, Q5_0, Q5_1) through `gguf.quants.quantize` (equal to
ggml's `_ref` encoders bit for bit except the sign of a zero scale or minimum, set here as ggml sets it); the
K-quants (Q2_K .. Q6_K) by a batched port of ggml's
`quantize_row_q*_K_ref` (no importance matrix). The port keeps ggml's float32 arithmetic exactly: every sum is a
sequential float32 accumulation (`np.add.accumulate` down the element axis, one call for all sub-blocks) and every
rounding is ggml's `nearest_int` (add 1.5 * 2**23, keep the low mantissa bits), so the bytes equal the C reference's.
The loops left in Python run over the few element positions and search steps of a sub-block, never over blocks.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

QK_K = 256
LEGACY = frozenset({T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0})
K_QUANTS = frozenset({T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K})
ENCODABLE = LEGACY | K_QUANTS
CHUNK_BLOCKS = 512
"""Super-blocks encoded per batch: every working array (256 x 512 float32 = 512 KiB) stays in the CPU's cache."""

F32 = np.float32
MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer (ties to even) in the low mantissa bits
GROUP_MAX_EPS = F32(1e-15)
HALF_DOWN = torch.tensor(np.nextafter(F32(0.5), F32(0)))  # the float32 just below 0.5
QK8_0, Q8_0_BYTES = 32, 34
Q8_0_CHUNK = 4096
"""Q8_0 blocks encoded per batch (512 KiB of float32)."""
DECODE_CHUNK_ELEMENTS = 1 << 18
"""Elements decoded per batch of blocks (1 MiB of float32)."""


def block_shape(qtype: T) -> tuple[int, int]:
    """(elements, bytes) of one block of `qtype`."""
    return gguf.GGML_QUANT_SIZES[qtype]


def row_bytes(qtype: T, columns: int) -> int:
    """Bytes one row of `columns` elements takes in `qtype` (columns a multiple of the block size)."""
    elements, size = block_shape(qtype)
    return columns // elements * size


def can_encode(qtype: T) -> bool:
    return qtype in ENCODABLE


def decode(raw: np.ndarray, qtype: T, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """Stored bytes (or gguf's typed view of them) → float32 array of `shape` (numpy order, rows outermost),
    written into `out` (float32, contiguous, `shape`) when given."""
    data = np.ascontiguousarray(raw)
    elements = math.prod(shape)
    target = np.empty(elements, dtype=F32) if out is None else out.reshape(elements)
    if qtype == T.Q8_0:
        decode_q8_0(data.view(np.uint8), target.reshape(-1, QK8_0))
    elif qtype in ENCODABLE and qtype not in (T.F32, T.F16):
        decode_blocks(data.view(np.uint8), qtype, target.reshape(-1, block_shape(qtype)[0]))
    elif qtype in (T.F32, T.F16):
        target[...] = data.view(np.float32 if qtype == T.F32 else np.float16).reshape(elements)
    else:
        with np.errstate(all="ignore"):  # stored NaN/inf scales decode to NaN/inf; the engine's checks report them
            target[...] = gguf.quants.dequantize(data.view(np.uint8).reshape(-1), qtype).reshape(elements)
    return target.reshape(shape)


def encode(values: np.ndarray, qtype: T) -> np.ndarray:
    """float32 array (..., columns) → stored bytes (uint8, ..., row_bytes), bit-exact with ggml's reference."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.Q8_0:
        return encode_q8_0(values).reshape(*values.shape[:-1], -1)
    if qtype in LEGACY:
        return legacy(values, qtype).reshape(*values.shape[:-1], -1)
    if qtype not in K_QUANTS:
        raise NotImplementedError(f"no encoder for ggml type {qtype.name}")
    blocks = values.reshape(-1, QK_K)
    out = np.empty((len(blocks), block_shape(qtype)[1]), dtype=np.uint8)
    with np.errstate(all="ignore"):  # ggml divides by zero scales and masks the result, as the C code does
        for start in range(0, len(blocks), CHUNK_BLOCKS):
            out[start:start + CHUNK_BLOCKS] = ENCODERS[qtype](blocks[start:start + CHUNK_BLOCKS])
    return out.reshape(*values.shape[:-1], -1)


def decode_q8_0(raw: np.ndarray, out: np.ndarray) -> None:
    """Q8_0 blocks → float32 `out` (blocks, 32): x = fp16 d · int8 q (one product, exact in float32: 11 × 8
    significant bits); torch's vectorized int8 → float32 conversion and product, about twice numpy's speed."""
    blocks = writable(raw.reshape(-1, Q8_0_BYTES))
    scales = torch.from_numpy(blocks[:, :2].copy().view(np.float16)).float()
    target = torch.from_numpy(out)
    target.copy_(torch.from_numpy(blocks[:, 2:].view(np.int8)))
    target.mul_(scales)


def writable(array: np.ndarray) -> np.ndarray:
    """`array`, copied when read-only (torch views only writable arrays)."""
    return array if array.flags.writeable else array.copy()


def decode_blocks(raw: np.ndarray, qtype: T, out: np.ndarray) -> None:
    """gguf-py's block decoder of `qtype` over cache-sized batches of blocks, each written in place into `out`
    (blocks, elements): the same arithmetic as `gguf.quants.dequantize` (same bytes out) without its per-row split
    and final concatenation."""
    elements, size = block_shape(qtype)
    blocks = raw.reshape(-1, size)
    step = max(1, DECODE_CHUNK_ELEMENTS // elements)
    codec = getattr(gguf.quants, qtype.name)
    with np.errstate(all="ignore"):  # stored NaN/inf scales decode to NaN/inf; the engine's checks report them
        for start in range(0, len(blocks), step):
            out[start:start + step] = codec.dequantize_blocks(blocks[start:start + step])


def encode_q8_0(values: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x · (1/d)) (0 when d = 0), d stored as fp16.

    roundf (half away from zero) is truncation of x + copysign(0.5⁻, x), exact in float32 (|x · (1/d)| ≤ 128);
    the batches stay in the CPU's cache, one pass of each vector op (torch's, faster than numpy's) per batch.
    """
    blocks = torch.from_numpy(writable(values).reshape(-1, QK8_0))
    out = torch.empty((len(blocks), Q8_0_BYTES), dtype=torch.uint8)
    work = torch.empty((min(len(blocks), Q8_0_CHUNK), QK8_0))
    half = torch.empty_like(work)
    for start in range(0, len(blocks), Q8_0_CHUNK):
        chunk = blocks[start:start + Q8_0_CHUNK]
        scaled, halves = work[:len(chunk)], half[:len(chunk)]
        scale = torch.abs(chunk, out=scaled).amax(dim=1).div_(127)
        inverse = torch.where(scale == 0, 0.0, 1.0 / scale)  # zero scales are masked; fp16 overflow stores inf as ggml
        out[start:start + len(chunk), :2] = scale.half().view(torch.uint8).view(-1, 2)
        torch.mul(chunk, inverse[:, None], out=scaled)
        scaled += torch.copysign(HALF_DOWN, scaled, out=halves)
        out[start:start + len(chunk), 2:] = scaled.to(torch.int8).view(torch.uint8)
    return out.numpy()


def legacy(values: np.ndarray, qtype: T) -> np.ndarray:
    """gguf-py's encoder, with ggml's signed zeros where the two differ: blocks whose scale or minimum is a zero.

    ggml's Q4_0/Q5_0 scale is `max / -8` (or -16) with max starting at +0, so an all-zero block stores -0;
    Q4_1/Q5_1 keep the sign of the block's first zero when the minimum or maximum is zero. The quants agree.
    """
    stored = gguf.quants.quantize(values, qtype).view(np.uint8)
    if qtype not in (T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1):
        return stored
    elements, size = block_shape(qtype)
    blocks, out = values.reshape(-1, elements), stored.reshape(-1, size)
    if qtype in (T.Q4_0, T.Q5_0):
        out[~blocks.any(axis=1), :2] = halves(np.full(1, -0.0, dtype=F32))
        return stored
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    fix = np.flatnonzero((lo == 0) | (hi == 0))
    if len(fix):
        rows = blocks[fix]
        first_zero = rows[np.arange(len(fix)), np.argmax(rows == 0, axis=1)]
        lo_c = np.where(lo[fix] == 0, first_zero, lo[fix])
        hi_c = np.where(hi[fix] == 0, first_zero, hi[fix])
        out[fix, :2] = halves((hi_c - lo_c) / F32(15 if qtype == T.Q4_1 else 31))
        out[fix, 2:4] = halves(lo_c)
    return stored


# --- ggml's scalar helpers, vectorized ------------------------------------------------------------------------

def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: float32 + 1.5*2**23, low 23 bits minus 2**22 (round half to even for |v| < 2**22)."""
    return ((np.asarray(v, dtype=F32) + MAGIC).view(np.int32) & 0x7FFFFF) - 0x400000


def seqsum(terms: np.ndarray) -> np.ndarray:
    """Σ terms[i] over axis 0 accumulated in order in float32 (ggml's `for (i...) s += t[i]`).

    numpy reduces a C-contiguous array over its outer axis row after row (vector adds of whole rows): the
    sequential order per column; pairwise summation applies only along the contiguous axis, never used here.
    """
    return np.add.reduce(np.ascontiguousarray(terms), axis=0, dtype=F32)


def fp16(values: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) → the float16 bits as float16."""
    return np.asarray(values, dtype=F32).astype(np.float16)


def first_abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max |x|, the signed x at the first position holding it) over axis 0, as ggml's `if (ax > amax)` scan."""
    ax = np.abs(x)
    at = np.argmax(ax, axis=0)
    columns = np.arange(x.shape[1])
    return ax[at, columns], x[at, columns]


def transpose_groups(blocks: np.ndarray, group: int) -> np.ndarray:
    """(n, 256) super-blocks → (group, n * 256 / group): element position first, so sums run down axis 0."""
    return np.ascontiguousarray(blocks.reshape(-1, group).T)


NEAREST_INT_RANGE = F32(4194303)  # |v| up to which nearest_int is plain rounding (ggml asserts it in debug builds)


def levels_in(iscale: np.ndarray, shifted: np.ndarray, lo: np.ndarray, hi: np.ndarray, nmax: int,
              out: np.ndarray | None = None) -> np.ndarray:
    """clamp(nearest_int(iscale · shifted), 0, nmax) in float32, where every column of `shifted` lies in [lo, hi].

    Scaling is monotone, so the per-column ends bound every product: within ±2**22 nearest_int is np.rint (one
    pass); outside, ggml's own bit trick gives what the C code gives.
    """
    ends = np.maximum(np.abs(iscale * lo), np.abs(iscale * hi))
    product = np.multiply(iscale, shifted, out=out)
    if bool(np.all(ends <= NEAREST_INT_RANGE)):
        np.rint(product, out=product)
    else:
        product = nearest_int(product).astype(F32)
    return np.clip(product, F32(0), F32(nmax), out=product)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants for every column of x (group, n): weighted scale/min search.

    Returns (scale, the_min, L) with x ≈ scale·L − the_min, L in [0, nmax].
    """
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    flat = hi == lo  # ggml returns L = 0, scale 0 for these; a unit span keeps their (discarded) search finite
    span = np.where(flat, F32(1), hi - lo)
    sum_w = seqsum(w)
    sum_x = seqsum(w * x)

    shifted, trial, wl, diff = (np.empty_like(x) for _ in range(4))  # the search's buffers, reused every step

    def error(scale: np.ndarray, minimum: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """Σ w·|scale·L + min − x| (use_mad) or Σ w·(scale·L + min − x)², in ggml's order, in `diff`."""
        np.multiply(scale, levels, out=diff)
        np.add(diff, minimum, out=diff)
        np.subtract(diff, x, out=diff)
        if use_mad:
            np.abs(diff, out=diff)
        else:
            np.multiply(diff, diff, out=diff)
        return seqsum(np.multiply(diff, w, out=diff))

    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    levels = levels_in(iscale, x - lo, lo - lo, hi - lo, nmax)
    best = error(scale, lo, levels)
    minimum, chosen_iscale, chosen_min = lo, iscale, lo
    for step in range(nstep + 1):  # ggml moves `min` to each better fit, and the next steps search from there
        trial_iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / np.where(flat, F32(1), hi - minimum)
        trial = levels_in(trial_iscale, np.subtract(x, minimum, out=shifted), lo - minimum, hi - minimum, nmax,
                          out=trial)
        np.multiply(w, trial, out=wl)
        sum_l, sum_xl = seqsum(wl), seqsum(np.multiply(wl, x, out=diff))
        wl *= trial
        sum_l2 = seqsum(wl)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        current = error(this_scale, this_min, trial)
        better = (det > 0) & (current < best)
        if bool(better.any()):
            best = np.where(better, current, best)
            scale = np.where(better, this_scale, scale)
            chosen_iscale = np.where(better, trial_iscale, chosen_iscale)
            chosen_min = np.where(better, minimum, chosen_min)
            minimum = np.where(better, this_min, minimum)
    levels = levels_in(chosen_iscale, x - chosen_min, lo - chosen_min, hi - chosen_min, nmax)  # the best step's L
    return np.where(flat, F32(0), scale), np.where(flat, -lo, -minimum), np.where(flat, F32(0), levels)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 (weights x²) for every column of x: returns (scale, L + nmax)."""
    amax, peak = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)  # zero columns return L = 0, scale 0; a unit peak keeps their search finite
    w = x * x
    wx = w * x
    levels, product = np.empty_like(x), np.empty_like(x)

    def fit(iscale: np.ndarray) -> np.ndarray:
        np.multiply(iscale, x, out=levels)  # |iscale · x| <= nmax + 1: nearest_int is rounding
        return np.clip(np.rint(levels, out=levels), F32(-nmax), F32(nmax - 1), out=levels)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fit(iscale)
        lx = seqsum(np.multiply(wx, levels, out=product))
        np.multiply(w, levels, out=product)
        return lx, seqsum(np.multiply(product, levels, out=product))

    chosen = F32(-nmax) / peak
    sumlx, suml2 = trial(chosen)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / peak
        lx, l2 = trial(iscale)
        better = (l2 > 0) & (lx * lx > best * l2)
        chosen = np.where(better, iscale, chosen)
        scale = np.where(better, lx / l2, scale)
        best = np.where(better, scale * lx, best)
    fit(chosen)  # the levels of the best trial
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), levels + F32(nmax))


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_q3_quants with do_rmse for every column of x: returns (scale, L + nmax).

    The refinement visits the elements in order and each accepted change moves the sums the next element sees:
    five passes of one vectorized step per element position.
    """
    amax, peak = first_abs_max(x)
    w = x * x
    levels = np.clip(nearest_int((F32(-nmax) / peak) * x), -nmax, nmax - 1).astype(F32)
    sumlx = seqsum(w * x * levels)
    suml2 = seqsum(w * levels * levels)
    wx = w * x
    for _ in range(5):  # ggml stops a sub-block after a pass without change; another pass would change nothing
        changed = False
        for i in range(x.shape[0]):
            li = levels[i]
            rest_lx = sumlx - wx[i] * li
            rest_l2 = suml2 - w[i] * li * li
            new = np.clip(nearest_int(x[i] * rest_l2 / rest_lx), -nmax, nmax - 1).astype(F32)
            slx = rest_lx + wx[i] * new
            sl2 = rest_l2 + w[i] * new * new
            take = (rest_lx > 0) & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if bool(take.any()):
                changed = True
                levels[i] = np.where(take, new, li)
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        if not changed:
            break
    zero = amax < GROUP_MAX_EPS
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), levels + F32(nmax))


def requantize(x: np.ndarray, d: np.ndarray, dm: np.ndarray | None, levels: np.ndarray, lo: int, hi: int,
               offset: int) -> np.ndarray:
    """The final pass: L = clamp(nearest_int((x + dm) / d)) + offset where d ≠ 0, the search's L where d = 0."""
    scaled = (x + dm) / d if dm is not None else x / d
    fresh = np.clip(nearest_int(scaled), lo, hi) + offset
    return np.where(d != 0, fresh, levels.astype(np.int32)).astype(np.uint8)


def pack_bits(levels: np.ndarray, width: int) -> np.ndarray:
    """OR the planes levels[..., k, :] << (width·k) together (ggml's interleaved low-bit layouts)."""
    shifts = (np.arange(levels.shape[-2], dtype=np.uint8) * width)[:, None]
    return np.bitwise_or.reduce(levels << shifts, axis=-2).astype(np.uint8)


def halves(values: np.ndarray) -> np.ndarray:
    return fp16(values).view(np.uint8).reshape(-1, 2)


def positive_max(values: np.ndarray) -> np.ndarray:
    """ggml's `m = 0; if (v > m) m = v` scan per row."""
    return np.maximum(values.max(axis=1), F32(0))


# --- the block encoders (n super-blocks of 256 float32 → n blocks of bytes) ------------------------------------

def q2_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    x = transpose_groups(blocks, 16)
    scales, mins, levels = make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
    max_scale, max_min = positive_max(scales), positive_max(mins)
    ls = np.where(max_scale[:, None] > 0, nearest_int((F32(15) / max_scale)[:, None] * scales), 0) & 0xFF
    lm = np.where(max_min[:, None] > 0, nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    packed = (ls | (lm << 4)) & 0xFF
    d16 = fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
    dmin16 = fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
    d = (d16.astype(F32)[:, None] * (packed & 0xF).astype(F32)).reshape(1, -1)
    dm = (dmin16.astype(F32)[:, None] * (packed >> 4).astype(F32)).reshape(1, -1)
    q = requantize(x, d, dm, levels, 0, 3, 0).T.reshape(n, 2, 4, 32)
    return np.concatenate([packed.astype(np.uint8), pack_bits(q, 2).reshape(n, 64), halves(d16), halves(dmin16)],
                          axis=1)


def q3_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    x = transpose_groups(blocks, 16)
    scales, levels = make_q3_quants(x, 4)
    scales = scales.reshape(n, 16)
    _, max_scale = first_abs_max(scales.T)
    iscale = F32(-32) / max_scale
    raw = ((nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
    ls = np.where(max_scale[:, None] != 0, np.clip(raw, -32, 31) + 32, 0)
    packed = np.zeros((n, 12), dtype=np.int32)
    packed[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    packed[:, 8:] = pack_bits((ls >> 4).reshape(n, 4, 4), 2)
    d16 = fp16(np.where(max_scale != 0, F32(1) / iscale, F32(0)))
    sc = np.where(max_scale[:, None] != 0, ls - 32, -32).astype(F32)
    d = (d16.astype(F32)[:, None] * sc).reshape(1, -1)
    q = requantize(x, d, None, levels, -4, 3, 4).T.reshape(n, 8, 32)
    hmask = pack_bits((q > 3).astype(np.uint8), 1)
    low = np.where(q > 3, q - 4, q).astype(np.uint8).reshape(n, 2, 4, 32)
    return np.concatenate([hmask, pack_bits(low, 2).reshape(n, 64), packed.astype(np.uint8), halves(d16)], axis=1)


def k_scales(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The shared front of Q4_K and Q5_K: 32-element sub-blocks, weights av_x + |x|, 6-bit scales and mins."""
    n = len(blocks)
    x = transpose_groups(blocks, 32)
    av_x = np.sqrt(seqsum(x * x) / F32(32))
    scales, mins, levels = make_qkx2_quants(x, av_x + np.abs(x), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = positive_max(scales), positive_max(mins)
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    packed = np.empty((n, 12), dtype=np.int32)
    packed[:, :4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d16, dmin16 = fp16(max_scale / F32(63)), fp16(max_min / F32(63))
    d = (d16.astype(F32)[:, None] * ls.astype(F32)).reshape(1, -1)
    dm = (dmin16.astype(F32)[:, None] * lm.astype(F32)).reshape(1, -1)
    q = requantize(x, d, dm, levels, 0, nmax, 0).T
    head = np.concatenate([halves(d16), halves(dmin16), packed.astype(np.uint8)], axis=1)
    return head, q


def q4_k(blocks: np.ndarray) -> np.ndarray:
    head, q = k_scales(blocks, 15, -1.0, 20)
    q = q.reshape(len(blocks), 4, 2, 32)
    return np.concatenate([head, pack_bits(q, 4).reshape(len(blocks), 128)], axis=1)


def q5_k(blocks: np.ndarray) -> np.ndarray:
    head, q = k_scales(blocks, 31, -0.5, 15)
    q = q.reshape(len(blocks), 8, 32)
    qh = pack_bits(q >> 4, 1)
    ql = pack_bits((q & 0xF).reshape(len(blocks), 4, 2, 32), 4).reshape(len(blocks), 128)
    return np.concatenate([head, qh, ql], axis=1)


def q6_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    x = transpose_groups(blocks, 16)
    scales, levels = make_qx_quants(x, 32)
    scales = scales.reshape(n, 16)
    max_abs, max_scale = first_abs_max(scales.T)
    zero = max_abs < GROUP_MAX_EPS
    iscale = F32(-128) / max_scale
    d16 = fp16(np.where(zero, F32(0), F32(1) / iscale))
    ls = ((np.minimum(nearest_int(iscale[:, None] * scales), 127) + 128) & 0xFF) - 128
    ls = np.where(zero[:, None], 0, ls)
    d = (d16.astype(F32)[:, None] * ls.astype(F32)).reshape(1, -1)
    q = requantize(x, d, None, levels, -32, 31, 32).T.reshape(n, 2, 4, 32)
    q = np.where(zero[:, None, None, None], 0, q).astype(np.uint8)
    ql = pack_bits((q & 0xF).reshape(n, 2, 2, 2, 32).transpose(0, 1, 3, 2, 4), 4).reshape(n, 128)  # q0|q2, q1|q3
    qh = pack_bits(q >> 4, 2).reshape(n, 64)
    return np.concatenate([ql, qh, ls.astype(np.int8).view(np.uint8), halves(d16)], axis=1)


ENCODERS = {T.Q2_K: q2_k, T.Q3_K: q3_k, T.Q4_K: q4_k, T.Q5_K: q5_k, T.Q6_K: q6_k}
