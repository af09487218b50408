"""The W4A4 GEMM for 1 to 4 tokens (FLUX's adaLN projections: one), shaped as a GEMV: one program
per few weight rows serves every token, so each weight byte is read once, with the products on the
CUDA cores and no 16-row tensor-core tile to pad. ``w4a4_gemm`` runs it for its ``gemv`` configs
(``GemmConfig(gemv=True)``), which the tuner offers up to 4 tokens where ``gemv_fits``.
On an H200 at M = 1 it took 0.75-1.0x the time of the best tile on 8-bit weights (KERNEL_NOTES.md
v17); packed weights it reads in ``dp4a`` words, 0.69-0.97x the time of reading them nibble by
nibble at M = 1 and 0.60-0.93x at M = 2 (v23).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemm_epilogue import bias_gelu_store

if TYPE_CHECKING:
    from .w4a4_gemm import GemmConfig


@triton.jit
def _dot4(u, s, acc, DP4A: tl.constexpr):
    """``acc`` plus the dot product of the four unsigned bytes of ``u`` and the four signed bytes of
    ``s`` (int32 words, elementwise): one ``dp4a`` instruction on an NVIDIA GPU; with ``DP4A`` off
    (the CPU interpreter, which runs no PTX) the same sum from the bytes one by one."""
    if DP4A:
        out = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [u, s, acc], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = acc
        for i in tl.static_range(4):
            out += ((u >> (8 * i)) & 0xFF) * ((s << (24 - 8 * i)) >> 24)
    return out


@triton.jit
def _even_odd_bytes(first, second, DP4A: tl.constexpr):
    """Two consecutive words of int8 columns (c .. c+3, c+4 .. c+7) regrouped as the words of the
    even columns (c, c+2, c+4, c+6) and of the odd ones: one ``prmt`` each on an NVIDIA GPU."""
    if DP4A:
        even = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x6420;", "=r,r,r", [first, second], dtype=tl.int32, is_pure=True, pack=1)
        odd = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7531;", "=r,r,r", [first, second], dtype=tl.int32, is_pure=True, pack=1)
    else:
        even = (first & 0xFF) | ((first >> 8) & 0xFF00) | ((second << 16) & 0xFF0000) | ((second << 8) & -0x1000000)
        odd = ((first >> 8) & 0xFF) | ((first >> 16) & 0xFF00) | ((second << 8) & 0xFF0000) | (second & -0x1000000)
    return even, odd


@triton.jit
def _w4a4_gemv_kernel(
    a_ptr, sa_ptr, w_ptr, sw_ptr, la_ptr, lu_ptr, bias_ptr, out_ptr,
    M, N, K, R, gelu_start, gelu_end, W_COLS,
    ACC_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr, DP4A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Two-level scales, M <= BLOCK_M <= 4 tokens (FLUX's adaLN projections: M = 1): one program
    per BLOCK_N weight rows serves every token, so each weight byte is read once; products on the
    CUDA cores (int32, or fp32 for fp8 operands), on 8-bit weights each token's dot reduced per K tile. A tensor-core
    tile has at least 16 rows, 15 of them padding at M = 1.

    PACKED ("int4_2level" rows, as in ``_w4a4_gemm_kernel``; K / GROUP a multiple of 4, so that rows
    start on 4-byte words): the weight is read in words of eight nibbles, columns c .. c+7 with
    column c + 2i in byte i's low nibble. Flipping each nibble's top bit turns q into q + 8 in
    0..15, so one ``dp4a`` multiplies the four low nibbles by the even columns' activations and one
    the high nibbles by the odd ones; each group's sum takes back 8 * sum(a) and is multiplied by
    its multiplier once. The same exact integers as expanding the values first, in 3-4
    instructions per weight byte in the K loop instead of 8-9 (KERNEL_NOTES.md v23)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = (offs_n % N).to(tl.int64)  # rows past N load a valid row (never stored)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if PACKED:
        GROUPS: tl.constexpr = BLOCK_K // GROUP  # whole groups per K tile
        # A group's words are taken in chunks of up to four (16 bytes): one thread's load, whose
        # sum stays in the thread; the groups' sums stay apart until after the K loop.
        CHUNK: tl.constexpr = min(4, GROUP // 8)
        offs_g = tl.arange(0, GROUPS)
        offs_c = tl.arange(0, CHUNK)
        # The word offsets of the rows, hinted as multiples of 4 so that loads take 16 bytes.
        w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + tl.multiple_of(rows_w * (W_COLS // 4), 4)
        a_words = a_ptr.to(tl.pointer_type(tl.int32))
        ones = tl.full((GROUPS, CHUNK), 0x01010101, tl.int32)
        group_acc = tl.zeros((BLOCK_M, BLOCK_N, GROUPS), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            g_ok = (k0 // GROUP + offs_g) < K // GROUP  # K is a multiple of GROUP
            mult = tl.load(w_ptr + rows_w[:, None] * W_COLS + K // 2 + k0 // GROUP + offs_g[None, :], mask=g_ok[None, :], other=0).to(tl.int32)
            for c0 in tl.static_range(0, GROUP // 8, CHUNK):
                word = tl.load(w_rows[:, None, None] + k0 // 8 + offs_g[None, :, None] * (GROUP // 8) + c0 + offs_c[None, None, :],
                               mask=g_ok[None, :, None], other=0)
                flipped = word ^ -0x77777778  # 0x88888888 as int32
                low = flipped & 0x0F0F0F0F
                high = (flipped >> 4) & 0x0F0F0F0F
                for t in tl.static_range(BLOCK_M):
                    if t < M:
                        a = tl.load(a_words + tl.multiple_of(t * (K // 4), 4) + k0 // 4 + offs_g[:, None] * (GROUP // 4) + 2 * c0 + tl.arange(0, 2 * CHUNK)[None, :],
                                    mask=g_ok[:, None], other=0)
                        first, second = tl.split(tl.reshape(a, (GROUPS, CHUNK, 2)))
                        even, odd = _even_odd_bytes(first, second, DP4A)
                        offset = 8 * tl.sum(_dot4(ones, first, _dot4(ones, second, tl.zeros_like(first), DP4A), DP4A), axis=1)
                        sums = _dot4(high, tl.broadcast_to(odd[None], high.shape), _dot4(low, tl.broadcast_to(even[None], low.shape), tl.zeros_like(low), DP4A), DP4A)
                        part = (tl.sum(sums, axis=2) - offset[None, :]) * mult
                        group_acc = tl.where(offs_m[:, None, None] == t, group_acc + part[None], group_acc)
        acc = tl.sum(group_acc, axis=2)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            w = tl.load(w_ptr + rows_w[:, None] * W_COLS + (k0 + offs_k)[None, :], mask=k_ok[None, :], other=0.0).to(ACC_DTYPE)
            for t in tl.static_range(BLOCK_M):
                if t < M:
                    a = tl.load(a_ptr + t * K + k0 + offs_k, mask=k_ok, other=0.0).to(ACC_DTYPE)
                    acc = tl.where(offs_m[:, None] == t, acc + tl.sum(w * a[None, :], axis=1)[None, :], acc)
    rows_a = offs_m % M
    out = acc.to(tl.float32) * tl.load(sa_ptr + rows_a)[:, None] * tl.load(sw_ptr + rows_w)[None, :]
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):  # the low-rank part: fp32 products, exact for 16-bit factors
        r_ok = (r0 + offs_r) < R
        lu = tl.load(lu_ptr + rows_w[:, None] * R + (r0 + offs_r)[None, :], mask=r_ok[None, :], other=0.0).to(tl.float32)
        for t in tl.static_range(BLOCK_M):
            if t < M:
                la = tl.load(la_ptr + t * R + r0 + offs_r, mask=r_ok, other=0.0).to(tl.float32)
                out = tl.where(offs_m[:, None] == t, out + tl.sum(lu * la[None, :], axis=1)[None, :], out)
    bias_gelu_store(out, bias_ptr, out_ptr, rows_w, offs_m, offs_n, tl.program_id(0) * BLOCK_N, M, N, gelu_start, gelu_end, HAS_BIAS, GELU)


def gemv_fits(act_q: Tensor, weight_q: Tensor, packed_group: int) -> bool:
    """Whether the GEMV kernel takes these operands: it reads a packed weight and its int8
    activations in 4-byte words, so packed rows (K / 2 + K / G bytes) must be whole words, and
    both operands must start on one.

    Example:
        >>> a = torch.zeros(1, 3072, dtype=torch.int8)
        >>> gemv_fits(a, torch.zeros(8, 1584, dtype=torch.uint8), 64), gemv_fits(a[:, :320], torch.zeros(8, 165, dtype=torch.uint8), 64)
        (True, False)
    """
    if not packed_group:
        return True  # read value by value
    return (act_q.shape[1] // packed_group) % 4 == 0 and act_q.data_ptr() % 4 == weight_q.data_ptr() % 4 == 0


def launch_gemv(args: tuple, m: int, n: int, k: int, rank: int, packed_group: int, has_bias: bool, gelu: tuple[int, int], acc_dtype: tl.dtype,
                block_k: int, block_r: int, cfg: GemmConfig) -> None:
    """Run ``_w4a4_gemv_kernel`` on ``w4a4_gemm``'s checked arguments ``args`` (act_q, act_scales,
    weight_q, weight_scales, lora_act, lora_up, bias, out) with two-level scales and M <= 4.

    Example (``w4a4_gemm`` calls it for a gemv config):
        >>> from svdq_compile.kernels.w4a4_gemm import GemmConfig, w4a4_gemm
        >>> a, w = torch.ones(1, 64, dtype=torch.int8), torch.ones(8, 64, dtype=torch.int8)
        >>> w4a4_gemm(a, torch.ones(1), w, torch.ones(8), torch.zeros(1, 0), torch.zeros(8, 0), None, torch.float32, config=GemmConfig(4, 8, 64, 1, 4, 1, gemv=True))[0, :2]
        tensor([64., 64.])
    """
    if not gemv_fits(args[0], args[2], packed_group):
        raise ValueError(f"w4a4_gemm: a gemv config reads a packed weight in 4-byte words: it needs K / G = {k} / {packed_group} "
                         "a multiple of 4 and act_q and weight_q starting on 4-byte boundaries; take a tile config (or none) here")
    _w4a4_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        *args, m, n, k, rank, *gelu, args[2].shape[1],
        ACC_DTYPE=acc_dtype, HAS_BIAS=has_bias, GELU=gelu[0] < gelu[1], GROUP=max(packed_group, 1), PACKED=packed_group > 0,
        DP4A=args[0].is_cuda and torch.version.hip is None, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
