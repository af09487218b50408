"""The W4A4 GEMM's main loop in Gluon, Triton's lower-level dialect, for Hopper (sm_90).

Triton's own pipeliner keeps wgmmas in flight only for fp32 accumulators: its int8 loop waits for
each wgmma before issuing the next. Here TMA loads run several K tiles ahead (``STAGES`` buffers,
lora_up's chunk reusing a free one), one int8 wgmma stays in flight while the next is issued, and
the epilogue stores 16-bit outputs in 16-byte pieces through shared memory. For int8 it won 3-14%
over the Triton kernels at FLUX's large shapes on an H200 with three stages; four added 6-10%
(KERNEL_NOTES.md, v11, v14). ``n256`` configs issue 256-wide wgmmas through ``int8_wgmma_256``.
``w4a4_gemm`` offers these configs where ``_wgmma_runs`` and checks each build.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from . import int8_wgmma_256, sm_count
from .gemm_epilogue import gelu_tanh_approx, grouped_tile
from .int8_wgmma_256 import mark_int8_as_e4m3

if TYPE_CHECKING:
    from .w4a4_gemm import GemmConfig

# Gluon's TMA load was renamed after Triton 3.6 (the GPU machine's version; CI has a newer one).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# So was shared memory's reinterpret (``_reinterpret`` in 3.6).
_REINTERPRET_PUBLIC = tl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

# Compiled int8-as-e4m3 kernels whose PTX rename was checked (ids of Triton's compiled kernels).
_renamed_kernels: set[int] = set()


@gluon.jit
def _w4a4_gemm_wgmma_kernel(
    a_desc, w_desc, sa_ptr, sw_ptr, la_ptr, lu_ptr, bias_ptr, out_ptr,
    M, N, K, R, gelu_start, gelu_end, num_programs,
    ACC_DTYPE: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, BLOCK_R: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, INT8_AS_E4M3: gl.constexpr,
    ACC_LAYOUT: gl.constexpr, LORA_LAYOUT: gl.constexpr, LU_LOAD_LAYOUT: gl.constexpr, LU_SHARED_LAYOUT: gl.constexpr,
    STORE_LAYOUT: gl.constexpr,
):
    """Two-level scales on Hopper: the plain kernel's computation with its main loop written in
    Gluon, so that one wgmma stays in flight while the next is issued. Triton's own pipeliner does
    that only for fp32 accumulators and waits for every int8 wgmma (KERNEL_NOTES.md, v10/v11).

    Program p does output tiles p, p + num_programs, ... (num_programs = the tile count: one tile
    each). Its (tile, K tile) steps form one sequence, and TMA loads run STAGES - 1 steps ahead in
    it (zero-filled past M, N and K), so the next tile's first loads are in flight during a tile's
    epilogue. The epilogue's low-rank dot is one more (synchronous) wgmma, in bf16/fp16, with
    lora_up's chunk in the weight buffer of the tile's last K step.

    INT8_AS_E4M3: int8 operands typed as e4m3 and an f32 accumulator, so that the wgmma can be
    256 wide; the PTX hook of ``int8_wgmma_256`` renames it to s8, and the int32 sums are bit-cast
    back before the epilogue."""
    if INT8_AS_E4M3:
        mark_int8_as_e4m3()
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    steps = gl.cdiv(num_pid_m * num_pid_n - gl.program_id(0), num_programs) * k_tiles

    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    # lora_up's chunk for the epilogue's low-rank wgmma goes into the weight buffer of the stage
    # the tile's last K step used, which no load refills before the next tile's first step: a
    # buffer of its own would leave no room for the fourth stage (KERNEL_NOTES.md, v14).
    LU_IN_STAGE: gl.constexpr = BLOCK_K * w_desc.dtype.primitive_bitwidth >= BLOCK_R * lu_ptr.dtype.element_ty.primitive_bitwidth
    if not LU_IN_STAGE:
        lu_own = gl.allocate_shared_memory(lu_ptr.dtype.element_ty, [BLOCK_N, BLOCK_R], LU_SHARED_LAYOUT)
    for i in gl.static_range(STAGES - 1):
        _wgmma_load_step(a_desc, w_desc, a_bufs, w_bufs, ready, i, steps, k_tiles, num_pid_m, num_pid_n, num_programs, GROUP_M, STAGES)

    step = 0
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, num_programs):
        acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE, layout=ACC_LAYOUT)
        for kt in range(k_tiles):
            stage = step % STAGES
            mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(stage), w_bufs.index(stage).permute((1, 0)), acc, is_async=True)
            # Wait for the previous wgmma only: its stage then takes the step STAGES - 1 ahead
            # while this one runs.
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_bufs.index(stage), w_bufs.index(stage)))[0]
            _wgmma_load_step(a_desc, w_desc, a_bufs, w_bufs, ready, step + STAGES - 1, steps, k_tiles, num_pid_m, num_pid_n, num_programs, GROUP_M, STAGES)
            step += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        if INT8_AS_E4M3:
            acc = acc.to(gl.int32, bitcast=True)
        if LU_IN_STAGE:
            last_w = w_bufs.index((step - 1) % STAGES)
            if _REINTERPRET_PUBLIC:
                lu_smem = last_w.reinterpret(lu_ptr.dtype.element_ty, [BLOCK_N, BLOCK_R], LU_SHARED_LAYOUT)
            else:
                lu_smem = last_w._reinterpret(lu_ptr.dtype.element_ty, [BLOCK_N, BLOCK_R], LU_SHARED_LAYOUT)
        else:
            lu_smem = lu_own
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        _wgmma_epilogue(acc, lu_smem, sa_ptr, sw_ptr, la_ptr, lu_ptr, bias_ptr, out_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N,
                        M, N, R, gelu_start, gelu_end, HAS_BIAS, GELU, BLOCK_R, ACC_LAYOUT, LORA_LAYOUT, LU_LOAD_LAYOUT, STORE_LAYOUT)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))


@gluon.jit
def _wgmma_load_step(a_desc, w_desc, a_bufs, w_bufs, ready, step, steps, k_tiles, num_pid_m, num_pid_n, num_programs,
                     GROUP_M: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA loads of step ``step`` (this program's tile ``step // k_tiles``, K tile
    ``step % k_tiles``) into its stage; nothing past the last step."""
    pid_m, pid_n = grouped_tile(gl.program_id(0) + (step // k_tiles) * num_programs, num_pid_m, num_pid_n, GROUP_M)
    stage = step % STAGES
    k = (step % k_tiles) * a_desc.block_type.shape[1]
    mbarrier.expect(ready.index(stage), a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=step < steps)
    _tma_load(a_desc, [pid_m * a_desc.block_type.shape[0], k], ready.index(stage), a_bufs.index(stage), pred=step < steps)
    _tma_load(w_desc, [pid_n * w_desc.block_type.shape[0], k], ready.index(stage), w_bufs.index(stage), pred=step < steps)


@gluon.jit
def _wgmma_epilogue(acc, lu_smem, sa_ptr, sw_ptr, la_ptr, lu_ptr, bias_ptr, out_ptr, off_m, off_n, M, N, R, gelu_start, gelu_end,
                    HAS_BIAS: gl.constexpr, GELU: gl.constexpr, BLOCK_R: gl.constexpr,
                    ACC_LAYOUT: gl.constexpr, LORA_LAYOUT: gl.constexpr, LU_LOAD_LAYOUT: gl.constexpr, STORE_LAYOUT: gl.constexpr):
    """The Gluon kernel's ``lowrank_bias_gelu_store``: scales, + lora_act @ lora_up^T, + bias, GELU, store."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    BLOCK_N: gl.constexpr = acc.shape[1]
    # Rows past M / N read a valid row instead (never stored), as in the plain kernel.
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC_LAYOUT))
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC_LAYOUT))
    rows_a = (offs_m % M).to(gl.int64)
    rows_w = (offs_n % N).to(gl.int64)
    out = acc.to(gl.float32) * gl.load(sa_ptr + rows_a)[:, None] * gl.load(sw_ptr + rows_w)[None, :]
    if R > 0:
        # lora_act from registers, lora_up through shared memory, in the 16-bit wgmma's
        # accumulator layout (the same registers as the 8-bit one's).
        out = gl.convert_layout(out, LORA_LAYOUT, assert_trivial=True)
        la_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=LORA_LAYOUT, k_width=2)
        la_rows = ((off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, la_layout))) % M).to(gl.int64)
        la_cols = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, la_layout))
        lu_rows = ((off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LU_LOAD_LAYOUT))) % N).to(gl.int64)
        lu_cols = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, LU_LOAD_LAYOUT))
        for r0 in range(0, R, BLOCK_R):
            la = gl.load(la_ptr + la_rows[:, None] * R + (r0 + la_cols)[None, :], mask=((r0 + la_cols) < R)[None, :], other=0.0)
            lu = gl.load(lu_ptr + lu_rows[:, None] * R + (r0 + lu_cols)[None, :], mask=((r0 + lu_cols) < R)[None, :], other=0.0)
            tl.debug_barrier()  # every warpgroup is done reading the previous chunk
            lu_smem.store(lu)
            fence_async_shared()  # make the stores visible to the wgmma (async proxy) ...
            tl.debug_barrier()  # ... from every thread
            out = warpgroup_mma(la, lu_smem.permute((1, 0)), out)
        out = gl.convert_layout(out, ACC_LAYOUT, assert_trivial=True)
    if HAS_BIAS:
        out += gl.load(bias_ptr + rows_w).to(gl.float32)[None, :]
    if GELU:
        if (off_n < gelu_end) & (off_n + BLOCK_N > gelu_start):
            out = gl.where(((offs_n >= gelu_start) & (offs_n < gelu_end))[None, :], gelu_tanh_approx(out), out)
    # 16-bit outputs: stored in 16-byte pieces along the rows, after a layout change through
    # shared memory. From the accumulator layout each thread stores 4-byte pieces scattered over
    # 8 rows: 9-13% slower at FLUX's K = 3072 GEMMs with the same stages (KERNEL_NOTES.md, v14).
    # (A 4-byte output's STORE_LAYOUT is the accumulator's: no change.)
    out = gl.convert_layout(out.to(out_ptr.dtype.element_ty), STORE_LAYOUT)
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, STORE_LAYOUT))
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, STORE_LAYOUT))
    out_ptrs = out_ptr + offs_m.to(gl.int64)[:, None] * N + offs_n[None, :]
    gl.store(out_ptrs, out, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@functools.cache
def wgmma_layouts(cfg: GemmConfig, block_r: int, lora_dtype: torch.dtype, operand_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[tuple, dict]:
    """The Gluon kernel's layouts for ``cfg``: the shared-memory layouts of its two TMA descriptors
    (act_q's, weight_q's) and its layout constexpr arguments. Cached: building them takes about
    70 us of Python, on every launch otherwise.

    Warps tile M first (a wgmma spans 4 warps and 64 rows), then N. The instruction's N is at most
    128 (Triton lowers an int8 wgmma up to N = 224, and 128 divides every tile width used here),
    or 256 for ``cfg.n256``, where ``operand_dtype`` is the type the kernel is built with (e4m3 for
    int8 data, see ``int8_wgmma_256``). The 8-bit and the 16-bit wgmma share the accumulator's
    register layout, so the epilogue's low-rank dot moves no data. A 16-bit ``out_dtype`` is
    stored in 16-byte pieces along the rows.

    Example:
        >>> from svdq_compile.kernels.w4a4_gemm import GemmConfig
        >>> _, constexprs = wgmma_layouts(GemmConfig(128, 256, 128, 1, 8, 4, wgmma=True), 32, torch.bfloat16, torch.int8, torch.bfloat16)
        >>> constexprs["ACC_LAYOUT"].instr_shape
        [16, 128, 32]
    """
    warps_m = min(cfg.num_warps, max(cfg.block_m // 16, 4))
    warps = [warps_m, cfg.num_warps // warps_m]
    instr_n = cfg.block_n // warps[1] if cfg.n256 else min(cfg.block_n // warps[1], 128)
    if cfg.n256 and instr_n != 256:
        raise ValueError(f"w4a4_gemm: an n256 config needs 256 columns per column of warps, got {cfg}")
    lanes_r = block_r // 8  # 16-byte loads of lora_up along the rank
    operand_gl = gl.int8 if operand_dtype == torch.int8 else gl.float8e4nv
    acc_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, instr_n, 32])
    if out_dtype.itemsize == 4:
        # Stored from the accumulator layout (8-byte pieces already): the layout change would
        # take 64 KiB of shared memory, which four stages leave no room for.
        store_layout = acc_layout
    else:
        per_thread = 16 // out_dtype.itemsize  # 16-byte stores along N
        lanes_n = min(32, cfg.block_n // per_thread)
        store_layout = gl.BlockedLayout([1, per_thread], [32 // lanes_n, lanes_n], [cfg.num_warps, 1], [1, 0])
    descriptors = tuple(gl.NVMMASharedLayout.get_default_for([rows, cfg.block_k], operand_gl) for rows in (cfg.block_m, cfg.block_n))
    return descriptors, dict(
        ACC_LAYOUT=acc_layout,
        LORA_LAYOUT=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, instr_n, 16]),
        LU_LOAD_LAYOUT=gl.BlockedLayout([1, 8], [32 // lanes_r, lanes_r], [cfg.num_warps, 1], [1, 0]),
        LU_SHARED_LAYOUT=gl.NVMMASharedLayout.get_default_for([cfg.block_n, block_r], gl.bfloat16 if lora_dtype == torch.bfloat16 else gl.float16),
        STORE_LAYOUT=store_layout,
    )


def launch_wgmma(args: tuple, m: int, n: int, k: int, rank: int, has_bias: bool, gelu: tuple[int, int], acc_dtype: tl.dtype, block_r: int, cfg: GemmConfig) -> None:
    """Run ``_w4a4_gemm_wgmma_kernel`` on ``w4a4_gemm``'s checked arguments ``args`` (act_q,
    act_scales, weight_q, weight_scales, lora_act, lora_up, bias, out) with two-level scales, on a
    Hopper GPU with 16-bit low-rank operands (``w4a4_gemm`` checks), for its ``wgmma`` config ``cfg``.

    Example (on an H100 or H200; ``w4a4_gemm`` calls it for a wgmma config)::

        w4a4_gemm(act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, None, torch.bfloat16,
                  config=GemmConfig(128, 256, 128, 1, 8, 4, wgmma=True))
    """
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias, out = args
    int8_as_e4m3 = cfg.n256 and act_q.dtype == torch.int8
    if int8_as_e4m3:  # the same bytes, typed so that the wgmma lowers 256 wide (int8_wgmma_256)
        int8_wgmma_256.install_ptx_hook()
        act_q, weight_q, acc_dtype = act_q.view(torch.float8_e4m3fn), weight_q.view(torch.float8_e4m3fn), tl.float32
    (a_shared, w_shared), constexprs = wgmma_layouts(cfg, block_r, lora_up.dtype, act_q.dtype, out.dtype)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    programs = min(sm_count(act_q.device), tiles) if cfg.persistent else tiles
    kernel = _w4a4_gemm_wgmma_kernel[(programs,)](
        TensorDescriptor.from_tensor(act_q, [cfg.block_m, cfg.block_k], a_shared),
        TensorDescriptor.from_tensor(weight_q, [cfg.block_n, cfg.block_k], w_shared),
        act_scales, weight_scales, lora_act, lora_up, bias, out, m, n, k, rank, *gelu, programs,
        ACC_DTYPE=acc_dtype, HAS_BIAS=has_bias, GELU=gelu[0] < gelu[1], BLOCK_R=block_r,
        GROUP_M=cfg.group_m, STAGES=cfg.num_stages, INT8_AS_E4M3=int8_as_e4m3, **constexprs, num_warps=cfg.num_warps,
    )
    if int8_as_e4m3 and id(kernel) not in _renamed_kernels:
        int8_wgmma_256.check_renamed(kernel)
        _renamed_kernels.add(id(kernel))
