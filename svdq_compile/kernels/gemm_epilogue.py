"""What the W4A4 GEMM's kernels share: the order their tiles run in, and the epilogue (the low-rank
up projection, the bias, GELU on a range of columns, the store). Triton functions, called from the
tile kernels (``w4a4_gemm``), the GEMV (``w4a4_gemv``) and the Gluon kernel (``w4a4_gemm_wgmma``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of output tile number ``tile`` in grouped order: GROUP_M rows of tiles at a
    time, so that consecutive tiles share weight tiles in L2.

    Example (in a kernel): ``pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), 8)``
    """
    pids_in_group = GROUP_M * num_pid_n
    first_m = (tile // pids_in_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % pids_in_group) % group_rows, (tile % pids_in_group) // group_rows


@triton.jit
def gelu_tanh(v):
    """GELU, tanh approximation, in fp32: ``0.5 v (1 + tanh(u)) = v / (1 + exp(-2u))`` with
    ``u = sqrt(2/pi) (v + 0.044715 v^3)``. Few instructions (the epilogue of a persistent tile does
    not overlap its main loop, so they cost GEMM time) and no cancellation: exact limits at large |v|.

    Example (in a kernel): ``out = tl.where(gelu_columns[None, :], gelu_tanh(out), out)``
    """
    two_u = v * (1.5957691216057308 + 0.07135481627260025 * v * v)
    return v / (1.0 + tl.exp(-two_u))


@triton.jit
def gelu_tanh_approx(v):
    """``gelu_tanh`` as ``0.5 v (1 + tanh(u))`` with the GPU's ``tanh.approx.f32``: one MUFU
    operation per element where ``gelu_tanh`` takes two (exp and the reciprocal), and an epilogue
    that does not overlap its main loop pays for each (3-5% of FLUX's GELU GEMMs on an H200,
    KERNEL_NOTES.md v22). tanh.approx is off by at most 2^-10.987 of |tanh| (PTX ISA), so the
    output by at most ``0.5 |v| 2^-10.987``: a large relative error only where GELU's output is
    small (near v = -3), and the 4-bit layer that reads it kept its error (v20). PTX: CUDA only,
    for the Gluon kernels (the Triton ones also run in the CPU interpreter).

    Example (in a Gluon kernel): ``out = gl.where(gelu_columns[None, :], gelu_tanh_approx(out), out)``
    """
    u = v * (0.7978845608028654 + 0.035677408136300125 * v * v)
    tanh_u = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True, pack=1)
    half_v = 0.5 * v
    return half_v + half_v * tanh_u


@triton.jit
def lowrank_bias_gelu_store(out, la_ptr, lu_ptr, bias_ptr, out_ptr, rows_a, rows_w, offs_m, offs_n, tile_n, M, N, R, gelu_start, gelu_end,
                            HAS_BIAS: tl.constexpr, GELU: tl.constexpr, LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr,
                            BLOCK_R: tl.constexpr):
    """out += lora_act @ lora_up^T (rank in chunks of BLOCK_R), then ``bias_gelu_store``.
    ``tile_n`` is the tile's first column.

    Example (in a tile kernel, ``out`` the scaled fp32 accumulator):
    ``lowrank_bias_gelu_store(out, la_ptr, lu_ptr, bias_ptr, out_ptr, rows_a, rows_w, offs_m, offs_n, pid_n * BLOCK_N, M, N, R, gelu_start, gelu_end, HAS_BIAS, GELU, tl.bfloat16, "tf32", 32)``
    """
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r_ok = (r0 + offs_r) < R
        la = tl.load(la_ptr + rows_a[:, None] * R + (r0 + offs_r)[None, :], mask=r_ok[None, :], other=0.0)
        lu = tl.load(lu_ptr + rows_w[:, None] * R + (r0 + offs_r)[None, :], mask=r_ok[None, :], other=0.0)
        out = tl.dot(la.to(LORA_DTYPE), tl.trans(lu.to(LORA_DTYPE)), out, input_precision=LORA_PRECISION)
    bias_gelu_store(out, bias_ptr, out_ptr, rows_w, offs_m, offs_n, tile_n, M, N, gelu_start, gelu_end, HAS_BIAS, GELU)


@triton.jit
def bias_gelu_store(out, bias_ptr, out_ptr, rows_w, offs_m, offs_n, tile_n, M, N, gelu_start, gelu_end, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
    """out += bias; GELU on the columns gelu_start..gelu_end - 1 (when GELU; tiles outside the
    range skip it); store the rows ``offs_m`` < M and columns ``offs_n`` < N as out's dtype.

    Example (in a kernel): ``bias_gelu_store(out, bias_ptr, out_ptr, rows_w, offs_m, offs_n, pid_n * BLOCK_N, M, N, gelu_start, gelu_end, HAS_BIAS, GELU)``
    """
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows_w).to(tl.float32)[None, :]
    if GELU:
        if (tile_n < gelu_end) & (tile_n + out.shape[1] > gelu_start):
            out = tl.where(((offs_n >= gelu_start) & (offs_n < gelu_end))[None, :], gelu_tanh(out), out)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
