"""Activation side of the W4A4 linear: smoothing, per-token int4 quantization and the low-rank
down projection, in two launches that each read x once.

``quantize_act_lowrank_down(x2d, smooth_inv, lora_down, group_size, two_level, x_tail=x_tail2d)``
quantizes the rows of ``x2d`` (or of ``cat([x2d, x_tail2d], -1)``, read in place from both pieces:
FLUX's single blocks feed ``proj_out`` the attention output and the MLP activations side by side;
rows may be strided) and returns

* ``act_q`` int8 [M, K]: the GEMM operand, ``q * mult`` (two-level) or ``q`` (float group scales);
  with ``fp8`` ("int4_pow2") the multipliers are powers of two and ``act_q`` is float8_e4m3fn;
* ``act_scales``: fp32 [M] row scales ``s1`` (two-level) or fp32 [M, K / group_size] group scales;
* ``lora_act`` [M, R] in x's dtype: ``x @ lora_down^T`` accumulated in fp32, then cast.

Bit-for-bit the integers of ``numerics.quantize_activations`` as computed on the CPU (same fp32
operations, quotients correctly rounded, round half to even; note that PyTorch on CUDA divides by a
Python scalar as a product with its rounded reciprocal, so the oracle run on a GPU can differ).

Why two launches: the two-level format needs a token's row max before any of its groups can be
quantized. Launch 1 (``_row_max_lowrank_kernel``, tensor cores, 64-row tiles, K sliced across
programs) reads x once for the row max of the smoothed x and the low-rank partial sums; launch 2
(``_quantize_kernel``, a few rows per program, no tensor cores) reads x once more and quantizes it
in a single sweep, after adding up launch 1's per-slice partials in slice order (deterministic,
no atomics). One launch that swept each row twice measured 24% of copy bandwidth on an H100
(KERNEL_NOTES.md, v1-v4); x read twice and int8 written once is 5MK bytes against the ideal 3MK.
One launch whose K slices wait for the rest of their row block's maxima (x read from memory once)
was 1.1-1.9x slower than these two on an H200 (v18): a program's phases run one after another,
with round trips to L2 between them, so it waits on latency, not on bandwidth.
The float-group format needs no row max: launch 1 then runs only for the low-rank part.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import sm_count
from ..numerics import MULT_MAX, QMAX, QMIN, quantize_activations


@triton.jit
def _max_propagate_nan(a, b):
    # torch's amax propagates NaN; a NaN token must give a NaN scale, not a finite one.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _divide(x, d, d_inv):
    """``x / d`` correctly rounded (as IEEE division) from ``d_inv = 1 / d`` correctly rounded.

    One Markstein correction step: the fma residual is exact, and the corrected quotient is the
    rounded quotient (for normal ``d``; scales below ~1e-37 would need a division). Three
    instructions per element instead of a full division.
    """
    q = x * d_inv
    return tl.fma(tl.fma(-q, d, x), d_inv, q)


@triton.jit
def _round_int4(v):
    """``v`` rounded half to even, as int32, for the quotients of a group by its step.

    numerics clamps to [QMIN, QMAX] first; the clamp never binds here, so it is left out. A step
    is at least the group's max over 7 (two-level: ``s1 * mult`` with ``mult >= max / (7 s1)``,
    16 * s1 >= max / 7 where mult stops at 16; float groups: max / 7; power-of-two multipliers
    are larger), so with at most four roundings, ``|v| <= 7 (1 + 2^-21) < 7.5`` rounds into
    [-7, 7]. A token or group holding a NaN or Inf has all of its q multiplied by 0 after this.

    Adding 1.5 * 2**23 rounds ``v`` half to even into the low mantissa bits, which then hold the
    integer: a float add and an integer subtract instead of a float-to-int conversion (a
    quarter-rate instruction on the GPU).
    """
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _x_tile(x_ptr, tail_ptr, stride_x, stride_tail, K_HEAD, offs_m, offs_k, k0, mask):
    """Launch 2's x tile of rows ``offs_m`` and columns ``offs_k`` (all on one side of ``K_HEAD``,
    the launcher makes sure): from x, or past its K_HEAD columns from the tail piece. Rows may be
    strided."""
    in_head = k0 < K_HEAD
    base = tl.where(in_head, x_ptr, tail_ptr)
    stride = tl.where(in_head, stride_x, stride_tail)
    col0 = tl.where(in_head, 0, K_HEAD)
    return tl.load(base + offs_m.to(tl.int64)[:, None] * stride + (offs_k - col0)[None, :], mask=mask, other=0.0)


@triton.jit
def _row_max_lowrank_kernel(
    x_ptr, smooth_ptr, down_ptr, max_ptr, partial_ptr,
    M, K, R, K_PER_SPLIT, stride_x, stride_down,
    ROW_MAX: tl.constexpr, HAS_LORA: tl.constexpr, R_CHUNKS: tl.constexpr, K_SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Per (row block, K slice, rank chunk) of one piece of x ([M, K], rows ``stride_x`` apart): the
    max of |x * smooth| over the slice (rank chunk 0 only, when ROW_MAX) and
    ``x @ lora_down[chunk]^T`` over the slice in fp32 (``lora_down`` rows ``stride_down`` apart).

    Rank chunks are the fastest-varying program index, so the programs of one x tile run side by
    side and all but the first read it from L2. Partials: max [K_SPLIT, M], sums [K_SPLIT, M, R].
    """
    pid = tl.program_id(0)
    r_chunk = pid % R_CHUNKS
    split = (pid // R_CHUNKS) % K_SPLIT
    row_block = pid // (R_CHUNKS * K_SPLIT)
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = r_chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    rows = offs_m.to(tl.int64)[:, None] * stride_x
    k_begin = split * K_PER_SPLIT
    k_end = min(k_begin + K_PER_SPLIT, K)
    # Column-chunk maxima of 8 adjacent columns, reduced across chunks once after the loop: each
    # thread's 8 contiguous columns reduce in its registers, with no shuffles in the loop.
    chunk_max = tl.zeros((BLOCK_M, BLOCK_K // 8), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if ROW_MAX:
            if r_chunk == 0:
                xs = x.to(tl.float32) * tl.load(smooth_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
                chunk_max = _max_propagate_nan(chunk_max, tl.reduce(tl.reshape(tl.abs(xs), (BLOCK_M, BLOCK_K // 8, 8)), 2, _max_propagate_nan))
        if HAS_LORA:
            down = tl.load(down_ptr + offs_r[:, None] * stride_down + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(x.to(DOT_DTYPE), tl.trans(down.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    if ROW_MAX:
        if r_chunk == 0:
            tl.store(max_ptr + split * M + offs_m, tl.reduce(chunk_max, 1, _max_propagate_nan), mask=mask_m)
    if HAS_LORA:
        partial = partial_ptr + split * M * R + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
        tl.store(partial, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _quantize_kernel(
    x_ptr, tail_ptr, smooth_ptr, max_ptr, partial_ptr, q_ptr, scale_ptr, lora_ptr,
    M, K, R, K_PER_SPLIT, stride_x, stride_tail, K_HEAD,
    GROUP: tl.constexpr, TWO_LEVEL: tl.constexpr, POW2: tl.constexpr, HAS_LORA: tl.constexpr, STAT_SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr,
):
    """Quantize token rows [row_block * BLOCK_M, ...) over K slice ``split`` in one sweep.

    Two-level: the row scale comes from launch 1's per-slice maxima. The programs of K slice 0 also
    add up launch 1's low-rank partial sums of their rows (in slice order) and store ``lora_act``.
    """
    NUM_GROUPS: tl.constexpr = BLOCK_K // GROUP
    pid = tl.program_id(0)
    row_block = pid // K_SPLIT
    split = pid % K_SPLIT
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)[:, None] * K
    num_groups_k = K // GROUP
    if HAS_LORA:
        if split == 0:
            offs_r = tl.arange(0, BLOCK_R)
            for r0 in range(0, R, BLOCK_R):
                mask = mask_m[:, None] & ((r0 + offs_r) < R)[None, :]
                lora_rows = offs_m.to(tl.int64)[:, None] * R + (r0 + offs_r)[None, :]
                total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for j in range(0, STAT_SPLITS):
                    total += tl.load(partial_ptr + j * M * R + lora_rows, mask=mask, other=0.0)
                tl.store(lora_ptr + lora_rows, total.to(lora_ptr.dtype.element_ty), mask=mask)
    if TWO_LEVEL:
        row_max = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j in range(0, STAT_SPLITS):
            row_max = _max_propagate_nan(row_max, tl.load(max_ptr + j * M + offs_m, mask=mask_m, other=0.0))
        s1 = tl.math.div_rn(row_max, 112.0)  # QMAX * MULT_MAX
        if split == 0:
            tl.store(scale_ptr + offs_m, s1, mask=mask_m)
        s1_safe = tl.where(s1 == 0.0, 1.0, s1)
        # A NaN or Inf in the token makes s1 non-finite, and all its q are 0 (numerics).
        row_finite = (tl.abs(s1) < float("inf"))[:, None]
        mult_divisor = (s1_safe * 7.0)[:, None]
    k_begin = split * K_PER_SPLIT
    k_end = min(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        mask = mask_m[:, None] & mask_k[None, :]
        x = _x_tile(x_ptr, tail_ptr, stride_x, stride_tail, K_HEAD, offs_m, offs_k, k0, mask)
        xs = x.to(tl.float32) * tl.load(smooth_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
        xg = tl.reshape(xs, (BLOCK_M, NUM_GROUPS, GROUP))
        group_max = tl.reduce(tl.abs(xg), 2, _max_propagate_nan)
        # Per group: the step q counts in, and the factor of the rounded q (the two-level
        # multiplier, or 1), 0 where the row or group holds a NaN or Inf.
        if TWO_LEVEL:
            mult = tl.minimum(tl.maximum(tl.ceil(tl.math.div_rn(group_max, mult_divisor)), 1.0), 16.0)
            if POW2:  # the power of two at or above the integer multiplier
                mult = tl.where(mult > 8.0, 16.0, tl.where(mult > 4.0, 8.0, tl.where(mult > 2.0, 4.0, mult)))
            step = s1_safe[:, None] * mult
            factor = tl.where(row_finite, mult, 0.0)
        else:
            step = tl.math.div_rn(group_max, 7.0)
            offs_g = k0 // GROUP + tl.arange(0, NUM_GROUPS)
            tl.store(scale_ptr + offs_m.to(tl.int64)[:, None] * num_groups_k + offs_g[None, :], step,
                     mask=mask_m[:, None] & (offs_g[None, :] < k_end // GROUP))
            factor = tl.where(tl.abs(step) < float("inf"), 1.0, 0.0)
            step = tl.where(step == 0.0, 1.0, step)
        q = _round_int4(_divide(xg, step[:, :, None], tl.math.div_rn(1.0, step)[:, :, None]))
        if POW2:  # fp8 e4m3: q * 2^e is exact there
            q = q.to(tl.float32) * factor[:, :, None]
        else:  # int8
            q = q * factor.to(tl.int32)[:, :, None]
        tl.store(q_ptr + rows + offs_k[None, :], tl.reshape(q, (BLOCK_M, BLOCK_K)).to(q_ptr.dtype.element_ty), mask=mask)


_MAX_FUSED_RANK = 256
_TORCH_TO_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _check_args(x2d: Tensor, x_tail: Tensor | None, smooth_inv: Tensor, lora_down: Tensor, group_size: int) -> int:
    """Validate the arguments; return K (the columns of x2d and x_tail together)."""
    if x2d.dim() != 2 or x2d.dtype not in _TORCH_TO_TL:
        raise ValueError(f"quantize_act_lowrank_down: x2d must be a 2-D bf16/fp16/fp32 tensor, got {x2d.dtype} {tuple(x2d.shape)}")
    k = x2d.shape[1]
    if x_tail is not None:
        if x_tail.dim() != 2 or x_tail.dtype != x2d.dtype or x_tail.shape[0] != x2d.shape[0]:
            raise ValueError(f"quantize_act_lowrank_down: x_tail must be [{x2d.shape[0]}, K2] of x2d's dtype {x2d.dtype}, got {x_tail.dtype} {tuple(x_tail.shape)}")
        k += x_tail.shape[1]
    if group_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"quantize_act_lowrank_down: group_size must be a power of two in 16..256, got {group_size}; use the reference op")
    if k % group_size:
        raise ValueError(f"quantize_act_lowrank_down: K = {k} must be a multiple of group_size = {group_size}")
    if smooth_inv.shape != (k,):
        raise ValueError(f"quantize_act_lowrank_down: smooth_inv must be [{k}], got {tuple(smooth_inv.shape)}")
    if lora_down.dim() != 2 or lora_down.shape[1] != k or lora_down.dtype not in _TORCH_TO_TL:
        raise ValueError(f"quantize_act_lowrank_down: lora_down must be a float [R, {k}], got {lora_down.dtype} {tuple(lora_down.shape)}")
    return k


def _unit_column_stride(t: Tensor) -> Tensor:
    """``t`` itself when its rows are read with one row stride (columns adjacent), else a copy."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Launch shape of the quantizing launch (launch 2): token rows per program, its K chunk, warps,
    pipeline depth, and K slices per row block (0: enough slices for about two programs per SM).

    Example:
        >>> QuantizeConfig(4, 512, 4, 3).k_split
        0
    """

    block_m: int
    block_k: int
    num_warps: int
    num_stages: int
    k_split: int = 0


def default_quantize_config(m: int, k: int, rank: int, group_size: int) -> QuantizeConfig:
    """The launch shape used unless one is given (chosen from the H100 sweeps in KERNEL_NOTES.md).

    Example:
        >>> default_quantize_config(4096, 3072, 32, 64).block_m
        8
    """
    return QuantizeConfig(8, max(group_size, 512), 4, 3)


def _k_slices(k: int, block_k: int, programs_per_slice: int, wanted_programs: int) -> tuple[int, int]:
    """``(slices, width)``: K cut into slices of ``width`` (a multiple of block_k) so that
    ``programs_per_slice * slices`` reaches ``wanted_programs`` where K allows."""
    k_blocks = triton.cdiv(k, block_k)
    slices = max(1, min(triton.cdiv(wanted_programs, programs_per_slice), k_blocks))
    width = triton.cdiv(k_blocks, slices) * block_k
    return triton.cdiv(k, width), width


_STAT_BLOCK_K = 128  # K tile of launch 1


@dataclasses.dataclass(frozen=True)
class _LaunchPlan:
    """Grids and K slicing of both launches for one shape (computed once per shape: the host time
    of a call is what an uncaptured forward waits on)."""

    block_r: int  # rank chunk (both launches)
    r_chunks: int
    stat_block_m: int  # launch 1
    stat_splits: int
    stat_width: int
    stat_programs: int
    quantize_splits: int  # launch 2
    quantize_width: int
    quantize_programs: int


@functools.lru_cache(maxsize=4096)
def _launch_plan(m: int, k: int, rank: int, two_level: bool, cfg: QuantizeConfig, sms: int) -> _LaunchPlan:
    # Rank chunks of <= 64: a 128-wide chunk (64-wide K tiles) gave wrong sums on an H100 with
    # Triton 3.6 (relative error 0.05-0.14 at ranks 128 and 256; the interpreter was right).
    block_r = min(max(16, triton.next_power_of_2(rank)), 64)
    r_chunks = triton.cdiv(rank, block_r) if rank else 1
    stat_block_m = 64 if m > 32 else 16
    stat_rows = triton.cdiv(m, stat_block_m)
    stat_splits, stat_width = 1, k
    if two_level or rank:
        stat_splits, stat_width = _k_slices(k, _STAT_BLOCK_K, stat_rows * r_chunks, 2 * sms)
    # K slices in launch 2 only when there are too few row blocks to fill the SMs.
    rows = triton.cdiv(m, cfg.block_m)
    if cfg.k_split:
        splits, width = _k_slices(k, cfg.block_k, 1, cfg.k_split)
    elif rows < 2 * sms:
        splits, width = _k_slices(k, cfg.block_k, rows, 2 * sms)
    else:
        splits, width = 1, triton.cdiv(k, cfg.block_k) * cfg.block_k
    return _LaunchPlan(block_r, r_chunks, stat_block_m, stat_splits, stat_width, stat_rows * stat_splits * r_chunks, splits, width, rows * splits)


def quantize_act_lowrank_down(
    x2d: Tensor,
    smooth_inv: Tensor,
    lora_down: Tensor,
    group_size: int,
    two_level: bool,
    config: QuantizeConfig | None = None,
    x_tail: Tensor | None = None,
    fp8: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x * smooth_inv`` per token and compute ``x @ lora_down^T`` (two launches), where
    x is ``x2d`` or, given ``x_tail``, ``cat([x2d, x_tail], -1)`` without forming it.

    Args:
        x2d: [M, K1] bf16, fp16 or fp32; rows may be strided (read in place).
        smooth_inv: [K] fp32 (K = K1, or K1 + K2 with ``x_tail``).
        lora_down: [R, K], any R (0 allowed; ranks past 256 go through a separate fp32 matmul);
            any float dtype (a dtype other than x's is multiplied in fp32).
        group_size: power of two in 16..256 dividing K.
        two_level: the "int4_2level" format (else "int4" float group scales).
        config: launch shape of the quantizing launch (sweeps, tests); None uses ``default_quantize_config``.
        x_tail: [M, K2] of x2d's dtype, the columns after x2d's (rows may be strided). Read in place
            when K1 is a multiple of both launches' K tiles (so no tile straddles the two pieces);
            otherwise the pieces are concatenated first. Launch 1 then runs once per piece.
        fp8: with ``two_level``, the "int4_pow2" format: power-of-two multipliers, ``act_q`` in
            float8_e4m3fn.

    Returns:
        ``(act_q int8 or fp8 [M, K], act_scales fp32 [M] or [M, K / group_size], lora_act [M, R] x.dtype)``.

    Example:
        >>> x = torch.randn(5, 128)
        >>> q, s, la = quantize_act_lowrank_down(x, torch.ones(128), torch.randn(16, 128), 64, True)
        >>> q.dtype, tuple(s.shape), tuple(la.shape)
        (torch.int8, (5,), (5, 16))
    """
    k = _check_args(x2d, x_tail, smooth_inv, lora_down, group_size)
    if fp8 and not two_level:
        raise ValueError("quantize_act_lowrank_down: fp8 (power-of-two multipliers) needs two_level=True")
    m = x2d.shape[0]
    cfg = config or default_quantize_config(m, k, lora_down.shape[0], group_size)
    if cfg.block_k % group_size:
        raise ValueError(f"quantize_act_lowrank_down: block_k = {cfg.block_k} must be a multiple of group_size = {group_size}")
    if x_tail is not None and (x2d.shape[1] % _STAT_BLOCK_K or x2d.shape[1] % cfg.block_k):
        x2d, x_tail = torch.cat((x2d, x_tail), dim=1), None
    if lora_down.shape[0] > _MAX_FUSED_RANK:
        # Ranks past 256 (many appended LoRAs): one more fp32 matmul rather than a third rank chunk.
        act_q, act_scales, lora_act = quantize_act_lowrank_down(x2d, smooth_inv, lora_down[:_MAX_FUSED_RANK], group_size, two_level, config, x_tail, fp8)
        x_full = x2d if x_tail is None else torch.cat((x2d, x_tail), dim=1)
        extra = (x_full.float() @ lora_down[_MAX_FUSED_RANK:].float().T).to(x2d.dtype)
        return act_q, act_scales, torch.cat((lora_act, extra), dim=1)
    head = _unit_column_stride(x2d)
    tail = head if x_tail is None else _unit_column_stride(x_tail)
    rank = lora_down.shape[0]
    device = x2d.device
    act_q = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=device)
    act_scales = torch.empty((m,) if two_level else (m, k // group_size), dtype=torch.float32, device=device)
    lora_act = torch.empty((m, rank), dtype=x2d.dtype, device=device)
    if m == 0:
        return act_q, act_scales, lora_act
    sms = sm_count(device)
    plan = _launch_plan(m, k, rank, two_level, cfg, sms)
    smooth = smooth_inv.float().contiguous()
    lora_down = lora_down.contiguous()

    # Launch 1, once per piece of x: row maxima and low-rank partial sums, K sliced for about two
    # programs per SM; the pieces' slices follow each other in the partial buffers. (One launch
    # that picked each tile's piece, or swept both pieces in turn, gave wrong low-rank sums at
    # some rank chunkings on an H100 with Triton 3.6; this loop is the one the GPU tests pass.)
    pieces = [(head, 0)] if x_tail is None else [(head, 0), (tail, head.shape[1])]
    piece_plans = [_launch_plan(m, piece.shape[1], rank, two_level, cfg, sms) for piece, _ in pieces]
    stat_splits = sum(p.stat_splits for p in piece_plans)
    row_max, partials = act_scales, lora_act  # placeholders when launch 1 is skipped
    if two_level or rank:
        row_max = torch.empty((stat_splits, m), dtype=torch.float32, device=device) if two_level else act_scales
        partials = torch.empty((stat_splits, m, rank), dtype=torch.float32, device=device)
        # 16-bit products are exact in fp32, so an fp32 dot computes the same sums; it is used for
        # mixed dtypes and under the CPU interpreter, whose bf16 dot is wrong (Triton 3.9 reads raw bits).
        dot_dtype = x2d.dtype if lora_down.dtype == x2d.dtype and x2d.is_cuda else torch.float32
        first = 0
        for (piece, col0), p in zip(pieces, piece_plans):
            _row_max_lowrank_kernel[(p.stat_programs,)](
                piece, smooth[col0:], lora_down[:, col0:], row_max[first:] if two_level else row_max, partials[first:],
                m, piece.shape[1], rank, p.stat_width, piece.stride(0), lora_down.stride(0),
                ROW_MAX=two_level, HAS_LORA=rank > 0, R_CHUNKS=p.r_chunks, K_SPLIT=p.stat_splits,
                DOT_DTYPE=_TORCH_TO_TL[dot_dtype], DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
                BLOCK_M=p.stat_block_m, BLOCK_K=_STAT_BLOCK_K, BLOCK_R=p.block_r, num_warps=4, num_stages=3,
            )
            first += p.stat_splits

    # Launch 2: quantize in one sweep, adding up launch 1's partials.
    _quantize_kernel[(plan.quantize_programs,)](
        head, tail, smooth, row_max, partials, act_q, act_scales, lora_act, m, k, rank, plan.quantize_width,
        head.stride(0), tail.stride(0), head.shape[1],
        GROUP=group_size, TWO_LEVEL=two_level, POW2=fp8, HAS_LORA=rank > 0, STAT_SPLITS=stat_splits,
        BLOCK_R=plan.block_r, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, K_SPLIT=plan.quantize_splits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return act_q, act_scales, lora_act


def quantize_act_lowrank_down_reference(
    x2d: Tensor, smooth_inv: Tensor, lora_down: Tensor, group_size: int, two_level: bool, x_tail: Tensor | None = None, fp8: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """What ``quantize_act_lowrank_down`` computes, in plain PyTorch (``numerics.quantize_activations``).

    Example:
        >>> x = torch.randn(5, 128)
        >>> q, s, la = quantize_act_lowrank_down_reference(x, torch.ones(128), torch.randn(16, 128), 64, False)
        >>> tuple(s.shape), la.dtype
        ((5, 2), torch.float32)
    """
    if x_tail is not None:
        x2d = torch.cat((x2d, x_tail), dim=1)
    act_q, act_scales = quantize_activations(x2d.float() * smooth_inv.float(), group_size, two_level, fp8)
    lora_act = (x2d.float() @ lora_down.float().T).to(x2d.dtype)
    return act_q, act_scales.float(), lora_act


assert (QMIN, QMAX, MULT_MAX) == (-8, 7, 16), "the kernel hard-codes the int4 range and the two-level divisor 112"
