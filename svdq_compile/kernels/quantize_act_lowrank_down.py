"""Activation side of the W4A4 linear in one launch: smoothing, per-token int4 quantization and
the low-rank down projection.

``quantize_act_lowrank_down(x2d, smooth_inv, lora_down, group_size, two_level)`` returns

* ``act_q`` int8 [M, K]: the GEMM operand, ``q * mult`` (two-level) or ``q`` (float group scales);
* ``act_scales``: fp32 [M] row scales ``s1`` (two-level) or fp32 [M, K / group_size] group scales;
* ``lora_act`` [M, R] in x's dtype: ``x @ lora_down^T`` accumulated in fp32, then cast.

Bit-for-bit the integers of ``numerics.quantize_activations`` as computed on the CPU (same fp32
operations, quotients correctly rounded, round half to even; note that PyTorch on CUDA divides by a
Python scalar as a product with its rounded reciprocal, so the oracle run on a GPU can differ).

One launch, two kinds of programs. Low-rank programs (many token rows and one K slice each, so
lora_down is re-read from L2 rarely) come first; their fp32 partial sums are added in slice order
by the last program of a row block (deterministic). Quantizer programs (a few rows each, no tensor
cores) follow: the two-level format needs the row max before any group can be quantized, so a
quantizer sweeps its rows twice (the second sweep mostly hits L2); with few token rows (small M)
the quantizers slice K too, each computing the row max over the whole row (L2 hits).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

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
    """Clamp to [QMIN, QMAX], then round half to even (= rounding, then clamping, for any finite v)."""
    v = tl.minimum(tl.maximum(v, -8.0), 7.0)
    return (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds |v| < 2**22 half to even in fp32


@triton.jit
def _quantize_rows(
    x_ptr, smooth_ptr, q_ptr, scale_ptr, row_block, split, M, K, k_per_split,
    GROUP: tl.constexpr, TWO_LEVEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr,
):
    """Quantize token rows [row_block * BLOCK_M, ...) over K slice ``split`` (k_per_split wide)."""
    NUM_GROUPS: tl.constexpr = BLOCK_K // GROUP
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)[:, None] * K
    num_groups_k = K // GROUP
    k_begin = split * k_per_split
    k_end = min(k_begin + k_per_split, K)
    if TWO_LEVEL:
        # Sweep 1: the row max of the smoothed x, over the whole row (other slices' parts are L2 hits).
        row_max = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            xs = x.to(tl.float32) * tl.load(smooth_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
            row_max = _max_propagate_nan(row_max, tl.reduce(tl.abs(xs), 1, _max_propagate_nan))
        s1 = tl.math.div_rn(row_max, 112.0)  # QMAX * MULT_MAX
        if split == 0:
            tl.store(scale_ptr + offs_m, s1, mask=mask_m)
        s1_safe = tl.where(s1 == 0.0, 1.0, s1)
        # A NaN or Inf in the token makes s1 non-finite, and all its q are 0 (numerics).
        row_finite = (tl.abs(s1) < float("inf"))[:, None, None]
        mult_divisor = (s1_safe * 7.0)[:, None]
    # Sweep 2 (the only one for float group scales): quantize this slice. In the two-level format
    # the program read these rows moments ago: mostly L2 hits.
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + rows + offs_k[None, :], mask=mask, other=0.0)
        xs = x.to(tl.float32) * tl.load(smooth_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
        xg = tl.reshape(xs, (BLOCK_M, NUM_GROUPS, GROUP))
        group_max = tl.reduce(tl.abs(xg), 2, _max_propagate_nan)
        if TWO_LEVEL:
            mult = tl.minimum(tl.maximum(tl.ceil(tl.math.div_rn(group_max, mult_divisor)), 1.0), 16.0)
            step = s1_safe[:, None] * mult
            q = _round_int4(_divide(xg, step[:, :, None], tl.math.div_rn(1.0, step)[:, :, None]))
            q = tl.where(row_finite, q * mult[:, :, None], 0.0)
        else:
            scale = tl.math.div_rn(group_max, 7.0)
            safe = tl.where(scale == 0.0, 1.0, scale)
            q = _round_int4(_divide(xg, safe[:, :, None], tl.math.div_rn(1.0, safe)[:, :, None]))
            # A NaN or Inf in the group makes its scale non-finite, and all its q are 0 (numerics).
            q = tl.where((tl.abs(scale) < float("inf"))[:, :, None], q, 0.0)
            offs_g = k0 // GROUP + tl.arange(0, NUM_GROUPS)
            tl.store(scale_ptr + offs_m.to(tl.int64)[:, None] * num_groups_k + offs_g[None, :], scale,
                     mask=mask_m[:, None] & (offs_g[None, :] < k_end // GROUP))
        tl.store(q_ptr + rows + offs_k[None, :], tl.reshape(q, (BLOCK_M, BLOCK_K)).to(tl.int8), mask=mask)


@triton.jit
def _lowrank_down_rows(
    x_ptr, down_ptr, lora_ptr, partial_ptr, count_ptr, row_block, split, M, K, R, k_per_split,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, K_SPLIT: tl.constexpr,
):
    """``x @ lora_down^T`` for rows [row_block * BLOCK_M, ...) over K slice ``split``, fp32 sums.

    With K_SPLIT > 1 the slices' partial sums go to [K_SPLIT, M, BLOCK_R]; the last program of
    these rows (an arrival counter) adds them in slice order (deterministic) and stores the result.
    """
    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)[:, None] * K
    k_begin = split * k_per_split
    k_end = min(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        down = tl.load(down_ptr + offs_r[:, None] * K + offs_k[None, :], mask=(offs_r[:, None] < R) & mask_k[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(down.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    lora_mask = mask_m[:, None] & (offs_r[None, :] < R)
    lora_ptrs = lora_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    if K_SPLIT == 1:
        tl.store(lora_ptrs, acc.to(lora_ptr.dtype.element_ty), mask=lora_mask)
    else:
        partial_rows = offs_m.to(tl.int64)[:, None] * BLOCK_R + offs_r[None, :]
        tl.store(partial_ptr + split * M * BLOCK_R + partial_rows, acc, mask=mask_m[:, None])
        tl.debug_barrier()  # every thread's partial sums are written before the counter moves
        arrived = tl.atomic_add(count_ptr + row_block, 1, sem="acq_rel")
        if arrived == K_SPLIT - 1:
            tl.debug_barrier()
            total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for j in range(0, K_SPLIT):
                total += tl.load(partial_ptr + j * M * BLOCK_R + partial_rows, mask=mask_m[:, None], other=0.0, cache_modifier=".cg")
            tl.store(lora_ptrs, total.to(lora_ptr.dtype.element_ty), mask=lora_mask)
            tl.atomic_xchg(count_ptr + row_block, 0)  # leave the counters zeroed for the next launch


@triton.jit
def _quantize_act_lowrank_down_kernel(
    x_ptr, smooth_ptr, down_ptr, q_ptr, scale_ptr, lora_ptr, partial_ptr, count_ptr,
    M, K, R, K_PER_SPLIT, LORA_K_PER_SPLIT, NUM_LORA_PROGRAMS,
    GROUP: tl.constexpr, TWO_LEVEL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr,
    LORA_BLOCK_M: tl.constexpr, LORA_BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, LORA_K_SPLIT: tl.constexpr,
):
    """Two kinds of programs in one launch: low-rank programs first (LORA_BLOCK_M rows and one K
    slice each, so lora_down is re-read from L2 rarely and none of them runs long), then the
    quantizers (few rows each, no tensor cores), which find much of x still in L2.
    """
    pid = tl.program_id(0)
    if pid < NUM_LORA_PROGRAMS:
        _lowrank_down_rows(x_ptr, down_ptr, lora_ptr, partial_ptr, count_ptr, pid // LORA_K_SPLIT, pid % LORA_K_SPLIT,
                           M, K, R, LORA_K_PER_SPLIT, DOT_DTYPE, DOT_PRECISION, LORA_BLOCK_M, LORA_BLOCK_K, BLOCK_R, LORA_K_SPLIT)
    else:
        quantizer = pid - NUM_LORA_PROGRAMS
        _quantize_rows(x_ptr, smooth_ptr, q_ptr, scale_ptr, quantizer // K_SPLIT, quantizer % K_SPLIT, M, K, K_PER_SPLIT,
                       GROUP, TWO_LEVEL, BLOCK_M, BLOCK_K, K_SPLIT)


_MAX_FUSED_RANK = 256
_TORCH_TO_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _check_args(x2d: Tensor, smooth_inv: Tensor, lora_down: Tensor, group_size: int) -> None:
    if x2d.dim() != 2 or x2d.dtype not in _TORCH_TO_TL:
        raise ValueError(f"quantize_act_lowrank_down: x2d must be a 2-D bf16/fp16/fp32 tensor, got {x2d.dtype} {tuple(x2d.shape)}")
    k = x2d.shape[1]
    if group_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"quantize_act_lowrank_down: group_size must be a power of two in 16..256, got {group_size}; use the reference op")
    if k % group_size:
        raise ValueError(f"quantize_act_lowrank_down: K = {k} must be a multiple of group_size = {group_size}")
    if smooth_inv.shape != (k,):
        raise ValueError(f"quantize_act_lowrank_down: smooth_inv must be [{k}], got {tuple(smooth_inv.shape)}")
    if lora_down.dim() != 2 or lora_down.shape[1] != k or lora_down.dtype not in _TORCH_TO_TL:
        raise ValueError(f"quantize_act_lowrank_down: lora_down must be a float [R, {k}], got {lora_down.dtype} {tuple(lora_down.shape)}")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Launch shape: token rows per quantizer program, its K chunk, warps, pipeline depth, and K
    slices per row block (0: enough slices for about two programs per SM).

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


_counters: dict[torch.device, Tensor] = {}
_sm_counts: dict[torch.device, int] = {}


def _zeroed_counters(device: torch.device, count: int) -> Tensor:
    """Per-row-block arrival counters; every launch leaves them zeroed again."""
    counters = _counters.get(device)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _counters[device] = counters
    return counters


def _sm_count(device: torch.device) -> int:
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _sm_counts[device]


def _slices(row_blocks: int, k_blocks: int, wanted_programs: int) -> int:
    """K slices per row block so that ``row_blocks * slices`` reaches ``wanted_programs``."""
    return max(1, min(triton.cdiv(wanted_programs, row_blocks), k_blocks))


def quantize_act_lowrank_down(
    x2d: Tensor, smooth_inv: Tensor, lora_down: Tensor, group_size: int, two_level: bool, config: QuantizeConfig | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x2d * smooth_inv`` per token and compute ``x2d @ lora_down^T`` in one kernel.

    Args:
        x2d: [M, K] bf16, fp16 or fp32 (copied to contiguous memory if it is not).
        smooth_inv: [K] fp32.
        lora_down: [R, K], any R (0 allowed; ranks past 256 go through a separate fp32 matmul);
            any float dtype (a dtype other than x's is multiplied in fp32).
        group_size: power of two in 16..256 dividing K.
        two_level: the "int4_2level" format (else "int4" float group scales).
        config: launch shape (sweeps, tests); None uses ``default_quantize_config``.

    Returns:
        ``(act_q int8 [M, K], act_scales fp32 [M] or [M, K / group_size], lora_act [M, R] x.dtype)``.

    Example:
        >>> x = torch.randn(5, 128)
        >>> q, s, la = quantize_act_lowrank_down(x, torch.ones(128), torch.randn(16, 128), 64, True)
        >>> q.dtype, tuple(s.shape), tuple(la.shape)
        (torch.int8, (5,), (5, 16))
    """
    _check_args(x2d, smooth_inv, lora_down, group_size)
    x2d = x2d.contiguous()
    m, k = x2d.shape
    if lora_down.shape[0] > _MAX_FUSED_RANK:
        # Ranks past 256 (many appended LoRAs) would not fit the kernel's registers: one more fp32 matmul.
        act_q, act_scales, lora_act = quantize_act_lowrank_down(x2d, smooth_inv, lora_down[:_MAX_FUSED_RANK], group_size, two_level, config)
        extra = (x2d.float() @ lora_down[_MAX_FUSED_RANK:].float().T).to(x2d.dtype)
        return act_q, act_scales, torch.cat((lora_act, extra), dim=1)
    rank = lora_down.shape[0]
    act_q = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    act_scales = torch.empty((m,) if two_level else (m, k // group_size), dtype=torch.float32, device=x2d.device)
    lora_act = torch.empty((m, rank), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return act_q, act_scales, lora_act
    # 16-bit products are exact in fp32, so an fp32 dot computes the same sums; it is used for mixed
    # dtypes and under the CPU interpreter, whose bf16 dot is wrong (Triton 3.9 reads raw bits).
    dot_dtype = x2d.dtype if lora_down.dtype == x2d.dtype and x2d.is_cuda else torch.float32
    cfg = config or default_quantize_config(m, k, rank, group_size)
    if cfg.block_k % group_size:
        raise ValueError(f"quantize_act_lowrank_down: block_k = {cfg.block_k} must be a multiple of group_size = {group_size}")
    sms = _sm_count(x2d.device)
    # Quantizers: few rows each; K slices only when there are too few row blocks to fill the SMs.
    row_blocks = triton.cdiv(m, cfg.block_m)
    k_blocks = triton.cdiv(k, cfg.block_k)
    k_split = min(cfg.k_split, k_blocks) if cfg.k_split else (_slices(row_blocks, k_blocks, 2 * sms) if row_blocks < 2 * sms else 1)
    k_per_split = triton.cdiv(k_blocks, k_split) * cfg.block_k
    k_split = triton.cdiv(k, k_per_split)
    # Low-rank programs: many rows each (lora_down is re-read from L2 once per program), K sliced
    # into about one program per SM; the [BLOCK_R, LORA_BLOCK_K] tile of lora_down stays near 16 KB.
    block_r = max(16, triton.next_power_of_2(rank))
    lora_block_m = 128 if m >= 2048 else 64 if m > 32 else 16
    lora_block_k = max(32, min(128, 8192 // block_r))
    lora_row_blocks = triton.cdiv(m, lora_block_m)
    lora_k_blocks = triton.cdiv(k, lora_block_k)
    lora_split = _slices(lora_row_blocks, lora_k_blocks, sms) if rank else 1
    lora_k_per_split = triton.cdiv(lora_k_blocks, lora_split) * lora_block_k
    lora_split = triton.cdiv(k, lora_k_per_split)
    num_lora_programs = lora_row_blocks * lora_split if rank else 0
    grid = num_lora_programs + row_blocks * k_split
    partials = torch.empty((lora_split, m, block_r) if lora_split > 1 else (1,), dtype=torch.float32, device=x2d.device)
    counters = _zeroed_counters(x2d.device, lora_row_blocks) if lora_split > 1 else partials
    _quantize_act_lowrank_down_kernel[(grid,)](
        x2d, smooth_inv.float().contiguous(), lora_down.contiguous(), act_q, act_scales, lora_act, partials, counters,
        m, k, rank, k_per_split, lora_k_per_split, num_lora_programs,
        GROUP=group_size, TWO_LEVEL=two_level,
        DOT_DTYPE=_TORCH_TO_TL[dot_dtype], DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, K_SPLIT=k_split,
        LORA_BLOCK_M=lora_block_m, LORA_BLOCK_K=lora_block_k, BLOCK_R=block_r, LORA_K_SPLIT=lora_split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return act_q, act_scales, lora_act


def quantize_act_lowrank_down_reference(
    x2d: Tensor, smooth_inv: Tensor, lora_down: Tensor, group_size: int, two_level: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """What ``quantize_act_lowrank_down`` computes, in plain PyTorch (``numerics.quantize_activations``).

    Example:
        >>> x = torch.randn(5, 128)
        >>> q, s, la = quantize_act_lowrank_down_reference(x, torch.ones(128), torch.randn(16, 128), 64, False)
        >>> tuple(s.shape), la.dtype
        ((5, 2), torch.float32)
    """
    act_q, act_scales = quantize_activations(x2d.float() * smooth_inv.float(), group_size, two_level)
    lora_act = (x2d.float() @ lora_down.float().T).to(x2d.dtype)
    return act_q, act_scales.float(), lora_act


assert (QMIN, QMAX, MULT_MAX) == (-8, 7, 16), "the kernel hard-codes the int4 range and the two-level divisor 112"
