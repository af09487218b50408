"""The W4A4 GEMM with the low-rank up projection, the bias and the output cast fused in its epilogue.

``w4a4_gemm(act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias, out_dtype)``:

* two-level scales (``act_scales`` [M], ``weight_scales`` [N]): one plain int8 tensor-core dot over
  all of K with int32 accumulation, then ``float(acc) * s_act[m] * s_w[n]`` in the epilogue; or,
  for fp8 e4m3 operands ("int4_pow2": the same small integers, exactly), one fp8 dot with fp32
  accumulation. Triton 3.6 keeps one fp8 wgmma in flight while it issues the next, but waits for
  every int8 one: the fp8 main loop runs 8-16% faster on an H200 (KERNEL_NOTES.md, v10). NVIDIA
  does not specify fp8 accumulation as exact, but an H200 summed every FLUX-shaped test dot
  exactly, and the GPU tests hold it to the int8 bound;
* float group scales (``act_scales`` [M, K/G], ``weight_scales`` [N, K/G]): one int8 dot per group,
  rescaled and summed in fp32 in the K loop (exact per-group integer dots, slower);
* then ``+= lora_act @ lora_up^T`` (fp32 accumulation, the rank looped in chunks, so ranks up to 256
  cost one extra small dot per chunk), ``+= bias``, optionally GELU (tanh approximation) on the
  output columns ``gelu_start:gelu_end``, cast to ``out_dtype``. The GELU there saves the separate
  elementwise pass that would read and write the whole output again (an MLP's up projection); it
  adds about 50 us to a 4096 x 12288 x 3072 GEMM on an H100, against 130 us for that pass
  (KERNEL_NOTES.md, v8). The Gluon kernels take tanh from the GPU's ``tanh.approx.f32``, off by
  at most ``0.5 |v| 2^-10.987`` (``gemm_epilogue.gelu_tanh_approx``).

This module holds the op, its Triton tile kernels, the configs and the tuner that picks one per
shape; two more kernels live in modules of their own, each run for its configs:

* ``w4a4_gemm_wgmma``: on Hopper (sm_90), large M also has candidates whose main loop is written in
  Gluon (``wgmma`` configs), which keep one int8 wgmma in flight while the next is issued. For
  fp8 Triton's kernels were faster (KERNEL_NOTES.md, v11, v14). ``n256`` candidates issue 256-wide
  int8 wgmmas through ``int8_wgmma_256``, and are only picked after they reproduced the first
  candidate's output during tuning (on an H200 bit-equal, and 1-6% faster at the same tile).
* ``w4a4_gemv``: up to 4 tokens, GEMV-shaped candidates (``gemv`` configs) on the CUDA cores.

Large M may run persistent (one program per SM walking the tiles, TMA loads), optionally leaving
a last wave that would fill at most half the SMs to a split-K launch. Small M is memory-bound on
the weight: those configs use small M tiles, more programs along N and, for the two-level format,
split-K. Each split stores its int32 partial sums in its own workspace slice; the last split of a
tile to arrive (a per-tile counter) adds up all slices (exact integers, so the result does not
depend on the order) and runs the epilogue. Plain stores, not atomics: integer atomics on whole
tiles cost more than the split saved (KERNEL_NOTES.md, v9). The best config per (format, M bucket, N, K, rank
chunks, dtype) is measured on the first call (GPU time, CUDA-graph replays) and cached: in the
process, and on disk where ``use_tuning_cache`` names a folder (the backend passes its cache's).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..numerics import apply_gelu_columns, packed_weight_columns, unpack_weight_operand
from . import sm_count
from .gemm_epilogue import grouped_tile, lowrank_bias_gelu_store
from .unpack_weight import expand_int4_tile
from .w4a4_gemm_wgmma import launch_wgmma
from .w4a4_gemv import gemv_fits, launch_gemv

_TORCH_TO_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _w4a4_gemm_kernel(
    a_ptr, sa_ptr, w_ptr, sw_ptr, la_ptr, lu_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, R, gelu_start, gelu_end, first_tile, W_COLS,
    TWO_LEVEL: tl.constexpr, ACC_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, GROUP: tl.constexpr,
    LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PACKED: tl.constexpr,
):
    # PACKED (two-level, int8): w_ptr holds pack_weight_operand's "int4_2level" rows, W_COLS bytes
    # each (K / 2 of nibbles, then one multiplier per GROUP values), expanded tile by tile in the K
    # loop. Meant for small M, where the GEMM waits on reading the weight: it reads 0.52 bytes per
    # weight instead of unpack_weight's 1.5 plus the GEMM's 1.
    # Output tile first_tile + pid (a persistent launch may have done the tiles before it); its
    # split-K partial sums and counter are the pid-th of the workspace.
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(first_tile + pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N load a valid row instead (never stored): the K loop needs no row masks.
    rows_a = (offs_m % M).to(tl.int64)
    rows_w = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_tile_start = tl.program_id(1) * tiles_per_split
    k_tile_end = min(k_tile_start + tiles_per_split, k_tiles)
    a_ptrs = a_ptr + rows_a[:, None] * K + (k_tile_start * BLOCK_K + offs_k)[None, :]
    if PACKED:
        offs_b = tl.arange(0, BLOCK_K // 2)
        offs_g = tl.arange(0, BLOCK_K // GROUP)
        w_ptrs = w_ptr + rows_w[:, None] * W_COLS + (k_tile_start * (BLOCK_K // 2) + offs_b)[None, :]
        mult_ptrs = w_ptr + rows_w[:, None] * W_COLS + K // 2 + (k_tile_start * (BLOCK_K // GROUP) + offs_g)[None, :]
    else:
        w_ptrs = w_ptr + rows_w[:, None] * W_COLS + (k_tile_start * BLOCK_K + offs_k)[None, :]

    if TWO_LEVEL:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for kt in range(k_tile_start, k_tile_end):
            if EVEN_K:
                a = tl.load(a_ptrs)
                if PACKED:
                    w = expand_int4_tile(tl.load(w_ptrs), tl.load(mult_ptrs), GROUP).to(tl.int8)
                else:
                    w = tl.load(w_ptrs)
            else:
                k_ok = (kt * BLOCK_K + offs_k) < K
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                if PACKED:  # a partial tile holds whole groups: K is a multiple of GROUP
                    nibbles = tl.load(w_ptrs, mask=((kt * (BLOCK_K // 2) + offs_b) < K // 2)[None, :], other=0)
                    mult = tl.load(mult_ptrs, mask=((kt * (BLOCK_K // GROUP) + offs_g) < K // GROUP)[None, :], other=0)
                    w = expand_int4_tile(nibbles, mult, GROUP).to(tl.int8)
                else:
                    w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=ACC_DTYPE)
            a_ptrs += BLOCK_K
            if PACKED:
                w_ptrs += BLOCK_K // 2
                mult_ptrs += BLOCK_K // GROUP
            else:
                w_ptrs += BLOCK_K
        if SPLIT_K == 1:
            out = acc.to(tl.float32) * tl.load(sa_ptr + rows_a)[:, None] * tl.load(sw_ptr + rows_w)[None, :]
            lowrank_bias_gelu_store(out, la_ptr, lu_ptr, bias_ptr, out_ptr, rows_a, rows_w, offs_m, offs_n, pid_n * BLOCK_N, M, N, R, gelu_start, gelu_end,
                      HAS_BIAS, GELU, LORA_DTYPE, LORA_PRECISION, BLOCK_R)
        else:
            # Each split stores its partial sums in its own slice of the tile's workspace (rows and
            # columns past M and N hold sums of valid rows, never stored: no masks); the split that
            # arrives last adds up all slices (in split order: exact for int32, deterministic for
            # fp32) and finishes the tile.
            tile_elems: tl.constexpr = BLOCK_M * BLOCK_N
            in_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tile_ws = ws_ptr + pid.to(tl.int64) * (SPLIT_K * tile_elems) + in_tile
            tl.store(tile_ws + tl.program_id(1) * tile_elems, acc)
            tl.debug_barrier()  # every thread's partial sums are stored before the counter moves
            arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                tl.debug_barrier()
                acc = tl.zeros_like(acc)
                for other in tl.static_range(SPLIT_K):  # unrolled: the loads are issued together
                    acc += tl.load(tile_ws + other * tile_elems, cache_modifier=".cg")  # from L2, not L1
                tl.atomic_xchg(count_ptr + pid, 0)  # leave the counters zeroed for the next launch
                out = acc.to(tl.float32) * tl.load(sa_ptr + rows_a)[:, None] * tl.load(sw_ptr + rows_w)[None, :]
                lowrank_bias_gelu_store(out, la_ptr, lu_ptr, bias_ptr, out_ptr, rows_a, rows_w, offs_m, offs_n, pid_n * BLOCK_N, M, N, R, gelu_start, gelu_end,
                          HAS_BIAS, GELU, LORA_DTYPE, LORA_PRECISION, BLOCK_R)
    else:
        # Float group scales: BLOCK_K == GROUP, one exact int32 dot per group, rescaled in fp32.
        num_groups = K // GROUP
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, num_groups):
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
            dot = tl.dot(a, tl.trans(w), out_dtype=tl.int32).to(tl.float32)
            sa = tl.load(sa_ptr + rows_a * num_groups + g)
            sw = tl.load(sw_ptr + rows_w * num_groups + g).to(tl.float32)
            out += dot * sa[:, None] * sw[None, :]
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        lowrank_bias_gelu_store(out, la_ptr, lu_ptr, bias_ptr, out_ptr, rows_a, rows_w, offs_m, offs_n, pid_n * BLOCK_N, M, N, R, gelu_start, gelu_end,
                  HAS_BIAS, GELU, LORA_DTYPE, LORA_PRECISION, BLOCK_R)


@triton.jit
def _w4a4_gemm_persistent_kernel(
    a_desc, w_desc, sa_ptr, sw_ptr, la_ptr, lu_ptr, bias_ptr, out_ptr,
    M, N, K, R, gelu_start, gelu_end, num_tiles,
    ACC_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, LORA_DTYPE: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """Two-level scales, large M: one program per SM walks the first ``num_tiles`` output tiles
    (grouped order), loading the 8-bit operands through TMA descriptors (zero-filled past M, N and
    K, so no masks or address arithmetic in the K loop). For int8 the tile and K loops are
    flattened into one, so the next tile's loads start during the current tile's epilogue; for
    fp8 they are not: with the epilogue's low-rank dot in the flattened loop, Triton 3.6 waits for
    every fp8 wgmma (as it always does for int8 ones), 22% slower at 4608 x 3072 x 15360 on an
    H200 (KERNEL_NOTES.md, v10)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=ACC_DTYPE == tl.int32):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for kt in range(0, k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=ACC_DTYPE)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_a = (offs_m % M).to(tl.int64)
        rows_w = (offs_n % N).to(tl.int64)
        out = acc.to(tl.float32) * tl.load(sa_ptr + rows_a)[:, None] * tl.load(sw_ptr + rows_w)[None, :]
        lowrank_bias_gelu_store(out, la_ptr, lu_ptr, bias_ptr, out_ptr, rows_a, rows_w, offs_m, offs_n, pid_n * BLOCK_N, M, N, R, gelu_start, gelu_end,
                  HAS_BIAS, GELU, LORA_DTYPE, LORA_PRECISION, BLOCK_R)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One tile configuration of ``w4a4_gemm`` (split_k > 1 only for two-level scales).

    Example:
        >>> GemmConfig(128, 256, 128, 1, 8, 3).block_n
        256
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    persistent: bool = False  # two-level, split_k 1: one program per SM over all tiles, TMA loads
    # persistent only: when the tiles leave a last wave that fills at most half the SMs, the
    # persistent launch stops at the full waves and the last wave's tiles run split along K.
    split_tail: bool = False
    # two-level, split_k 1, Hopper: the Gluon kernel, one wgmma in flight (num_stages: the K tiles
    # loaded ahead, plus the one in use); with persistent, one program per SM (no split_tail).
    wgmma: bool = False
    # wgmma only: 256-wide instructions (block_n 256 over one column of warps); for int8 operands
    # through the e4m3 build and PTX rename of int8_wgmma_256 (Triton lowers s8 up to N = 224).
    n256: bool = False
    # two-level, at most block_m (<= 4) tokens: the GEMV-shaped kernel, one program per block_n
    # weight rows for all tokens, no tensor cores (split_k 1).
    gemv: bool = False


def _candidate_configs(m: int, two_level: bool, group_size: int, packed_group: int = 0, wgmma: bool = False, gemv_allowed: bool = True) -> list[GemmConfig]:
    """The tile configs ``_tune`` times; the first is the default where nothing is timed.
    ``packed_group``: the weight is packed (the plain and GEMV kernels only); ``wgmma``: the Gluon
    kernel can run (Hopper, 16-bit low-rank operands); ``gemv_allowed``: the GEMV kernel can read
    the operands (``w4a4_gemv.gemv_fits``)."""
    if packed_group:
        return [cfg for cfg in _candidate_configs(m, True, 0, gemv_allowed=gemv_allowed) if not cfg.persistent]
    if two_level and m <= 4:
        # At M = 1 on an H200 the GEMV kernel took 0.75-1.0x the time of the best tile on 8-bit
        # weights and 0.65-0.94x on packed ones; at M = 2 and 4 it mostly lost (KERNEL_NOTES.md,
        # v17). Read in dp4a words, packed weights run fastest with 2048-wide K tiles at N = 3072
        # (v23). The tuner measures.
        gemv = [GemmConfig(4, bn, bk, 1, 4, 3, gemv=True) for bn, bk in ((16, 256), (16, 512), (8, 512), (8, 1024), (4, 1024), (16, 2048), (8, 2048))]
        return _candidate_configs(16, True, 0) + (gemv if gemv_allowed else [])
    if not two_level:
        g = group_size
        if m <= 64:
            return [GemmConfig(16, 64, g, 1, 4, 4), GemmConfig(64, 64, g, 1, 4, 4), GemmConfig(64, 128, g, 1, 4, 4)]
        if m <= 256:
            return [GemmConfig(64, 128, g, 1, 4, 4), GemmConfig(128, 128, g, 1, 8, 4), GemmConfig(64, 64, g, 1, 4, 4)]
        return [GemmConfig(128, 128, g, 1, 8, 4), GemmConfig(128, 256, g, 1, 8, 4), GemmConfig(128, 128, g, 1, 4, 4)]
    if m <= 16:
        return [GemmConfig(16, bn, 256, s, 4, 4) for bn in (32, 64) for s in (1, 2, 4, 8)]
    if m <= 64:
        return [GemmConfig(64, bn, 128, s, 4, 4) for bn in (64, 128) for s in (1, 2, 4)]
    if m <= 256:
        return [GemmConfig(bm, 128, 128, s, 4 if bm == 64 else 8, 4) for bm in (64, 128) for s in (1, 2, 4)] + [GemmConfig(128, 256, 128, 1, 8, 3)]
    # Persistent tiles won 3-9% at M >= 4096 with N or K >= 12288 on an H100 (KERNEL_NOTES.md, v6)
    # and lost at N = K = 3072: both kinds are candidates, the measurement decides.
    return [
        GemmConfig(128, 256, 128, 1, 8, 3),
        GemmConfig(128, 256, 128, 1, 8, 4),
        GemmConfig(256, 128, 128, 1, 8, 3),
        GemmConfig(128, 128, 128, 1, 8, 4),
        GemmConfig(128, 128, 128, 1, 4, 4),
        GemmConfig(128, 128, 256, 1, 8, 3),
        GemmConfig(128, 256, 128, 1, 8, 4, persistent=True),
        GemmConfig(256, 128, 128, 1, 8, 3, persistent=True),
        GemmConfig(128, 256, 128, 1, 8, 4, persistent=True, split_tail=True),
        GemmConfig(256, 128, 128, 1, 8, 3, persistent=True, split_tail=True),
    ] + ([
        # Four 48 KiB stages and the 32 KiB the epilogue's store takes fill the SM's 227 KiB
        # (lora_up's chunk goes into a stage's buffer: LU_IN_STAGE).
        GemmConfig(128, 256, 128, 1, 8, 4, wgmma=True),
        GemmConfig(256, 128, 128, 1, 8, 4, wgmma=True),
        GemmConfig(128, 256, 128, 1, 8, 4, persistent=True, wgmma=True),
        GemmConfig(256, 128, 128, 1, 8, 4, persistent=True, wgmma=True),
        GemmConfig(128, 256, 64, 1, 8, 6, persistent=True, wgmma=True),
        GemmConfig(128, 256, 128, 1, 8, 4, wgmma=True, n256=True),
        GemmConfig(128, 256, 128, 1, 8, 4, persistent=True, wgmma=True, n256=True),
    ] if wgmma else [])


def _m_bucket(m: int) -> int:
    """The M range one tuned config serves: 1, 2 and 3-4 tokens each their own (the GEMV kernel's
    range), then powers of two from 16 to 4096."""
    return triton.next_power_of_2(m) if m <= 4 else min(triton.next_power_of_2(max(m, 16)), 4096)


_workspaces: dict[torch.device, tuple[Tensor, Tensor]] = {}
# Workspaces replaced by larger ones stay allocated: CUDA graphs captured with them still use them.
_outgrown: list[Tensor] = []
_tuned: dict[tuple, GemmConfig] = {}
# Where the tuner's picks persist between processes (``use_tuning_cache``); None: this process only.
_tuning_folder: Path | None = None


def _split_k_workspace(device: torch.device, elems: int, tiles: int) -> tuple[Tensor, Tensor]:
    """int32 partial sums (each launch writes those it reads) and zeroed per-tile counters (each
    launch leaves them zeroed again)."""
    ws, counts = _workspaces.get(device, (None, None))
    if ws is None or ws.numel() < elems:
        if ws is not None:
            _outgrown.append(ws)
            elems = max(elems, 2 * ws.numel())  # at least double: few sizes are ever allocated
        ws = torch.empty(elems, dtype=torch.int32, device=device)
    if counts is None or counts.numel() < tiles:
        if counts is not None:
            _outgrown.append(counts)
            tiles = max(tiles, 2 * counts.numel())
        counts = torch.zeros(tiles, dtype=torch.int32, device=device)
    _workspaces[device] = (ws, counts)
    return ws, counts


def _packed_2level_group(k: int, columns: int) -> int:
    """The group size of an "int4_2level" weight packed to ``columns`` bytes per row (K = ``k``,
    ``numerics.pack_weight_operand``), or 0 when no group size in 16..256 gives that width.

    Example:
        >>> _packed_2level_group(3072, 1584), _packed_2level_group(3072, 1583)
        (64, 0)
    """
    return next((g for g in (16, 32, 64, 128, 256) if k % g == 0 and columns == packed_weight_columns(k, g, True)), 0)


def _check_args(act_q: Tensor, act_scales: Tensor, weight_q: Tensor, weight_scales: Tensor, lora_act: Tensor, lora_up: Tensor, bias: Tensor | None) -> tuple[int, int]:
    """Validate shapes; return the group size of float group scales (0: two-level) and of a packed
    weight_q (0: not packed)."""
    if act_q.dim() != 2 or weight_q.dim() != 2:
        raise ValueError(f"w4a4_gemm: act_q [M, K] and weight_q [N, K] must be 2-D, got {tuple(act_q.shape)} and {tuple(weight_q.shape)}")
    (m, k), (n, k_w) = act_q.shape, weight_q.shape
    packed_group = 0
    if weight_q.dtype == torch.uint8 and act_q.dtype == torch.int8:
        # With int8 activations a packed weight is "int4_2level": its width tells the group size.
        packed_group = _packed_2level_group(k, k_w)
        if not packed_group or act_scales.dim() != 1:
            raise ValueError(f"w4a4_gemm: a uint8 weight_q must be pack_weight_operand's \"int4_2level\" rows, [N, K/2 + K/G] for a "
                             f"group size G in 16..256, with two-level scales; got {tuple(weight_q.shape)} for K = {k} and scales "
                             f"{tuple(act_scales.shape)}. Expand it with unpack_weight first otherwise.")
        k_w = k
    elif act_q.dtype != weight_q.dtype or act_q.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"w4a4_gemm: act_q and weight_q must be both int8 or both float8_e4m3fn (or weight_q packed, "
                         f"see the docstring), got {act_q.dtype} and {weight_q.dtype}")
    if k != k_w:
        raise ValueError(f"w4a4_gemm: act_q has K = {k} but weight_q has K = {k_w}")
    if act_scales.shape == (m,) and weight_scales.shape == (n,):
        group = 0
    elif act_scales.dim() == 2 and act_scales.shape[0] == m and weight_scales.shape == (n, act_scales.shape[1]) and act_scales.shape[1] and k % act_scales.shape[1] == 0:
        group = k // act_scales.shape[1]
        if group not in (16, 32, 64, 128, 256):
            raise ValueError(f"w4a4_gemm: group size {group} is not a power of two in 16..256; use the reference op")
    else:
        raise ValueError(f"w4a4_gemm: scales must be [M]+[N] (two-level) or [M, K/G]+[N, K/G] (groups), got {tuple(act_scales.shape)} and {tuple(weight_scales.shape)}")
    if group and act_q.dtype != torch.int8:
        raise ValueError("w4a4_gemm: float8_e4m3fn operands take two-level scales ([M] and [N]), not group scales")
    rank = lora_act.shape[1] if lora_act.dim() == 2 else -1
    if lora_act.shape != (m, rank) or lora_up.shape != (n, rank) or lora_act.dtype not in _TORCH_TO_TL or lora_up.dtype not in _TORCH_TO_TL:
        raise ValueError(f"w4a4_gemm: lora_act must be float [{m}, R] and lora_up float [{n}, R], got {tuple(lora_act.shape)} and {tuple(lora_up.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"w4a4_gemm: bias must be [{n}], got {tuple(bias.shape)}")
    return group, packed_group


def _launch(args: tuple, m: int, n: int, k: int, rank: int, group: int, packed_group: int, has_bias: bool, gelu: tuple[int, int], lora_dtype: torch.dtype,
            cfg: GemmConfig) -> None:
    two_level = group == 0
    if packed_group and (cfg.wgmma or cfg.persistent):
        raise ValueError(f"w4a4_gemm: packed weights take the plain kernel's configs (not wgmma or persistent), got {cfg}")
    acc_dtype = tl.int32 if args[0].dtype == torch.int8 else tl.float32
    block_r = 16 if rank <= 16 else (32 if rank <= 32 else 64)
    lora_tl, lora_precision = _TORCH_TO_TL[lora_dtype], "ieee" if lora_dtype == torch.float32 else "tf32"
    if cfg.wgmma:
        if not _wgmma_runs(args[0].device, args[5].dtype) or args[4].dtype != args[5].dtype:
            raise ValueError("w4a4_gemm: a wgmma config needs a Hopper GPU and lora_act, lora_up of one 16-bit dtype")
        launch_wgmma(args, m, n, k, rank, has_bias, gelu, acc_dtype, block_r, cfg)
        return
    block_k = max(cfg.block_k, packed_group) if two_level else group  # a packed tile holds whole groups
    if cfg.gemv:
        if not two_level or m > cfg.block_m:
            raise ValueError(f"w4a4_gemm: a gemv config takes two-level scales and at most block_m = {cfg.block_m} tokens, got M = {m}")
        launch_gemv(args, m, n, k, rank, packed_group, has_bias, gelu, acc_dtype, block_k, block_r, cfg)
        return
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    first_tile, split_k = 0, cfg.split_k if two_level else 1
    if cfg.persistent and two_level:
        from triton.tools.tensor_descriptor import TensorDescriptor

        act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias, out = args
        programs = min(sm_count(act_q.device), tiles)
        first_tile, split_k = _tail_split(tiles, programs, triton.cdiv(k, cfg.block_k)) if cfg.split_tail else (tiles, 1)
        _w4a4_gemm_persistent_kernel[(programs,)](
            TensorDescriptor.from_tensor(act_q, [cfg.block_m, cfg.block_k]), TensorDescriptor.from_tensor(weight_q, [cfg.block_n, cfg.block_k]),
            act_scales, weight_scales, lora_act, lora_up, bias, out, m, n, k, rank, *gelu, first_tile,
            ACC_DTYPE=acc_dtype, HAS_BIAS=has_bias, GELU=gelu[0] < gelu[1], LORA_DTYPE=lora_tl, LORA_PRECISION=lora_precision,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            GROUP_M=cfg.group_m, NUM_PROGRAMS=programs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if first_tile == tiles:
            return
    ws, counts = _split_k_workspace(args[0].device, (tiles - first_tile) * split_k * cfg.block_m * cfg.block_n, tiles - first_tile) if split_k > 1 else (args[0], args[0])
    if split_k > 1 and acc_dtype == tl.float32:
        ws = ws.view(torch.float32)  # fp8 partial sums
    _w4a4_gemm_kernel[(tiles - first_tile, split_k)](
        *args, ws, counts, m, n, k, rank, *gelu, first_tile, args[2].shape[1],
        TWO_LEVEL=two_level, ACC_DTYPE=acc_dtype, HAS_BIAS=has_bias, GELU=gelu[0] < gelu[1], GROUP=max(group, packed_group, 1),
        LORA_DTYPE=lora_tl, LORA_PRECISION=lora_precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        GROUP_M=cfg.group_m, SPLIT_K=split_k, EVEN_K=k % (block_k * split_k) == 0, PACKED=packed_group > 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# Why the Gluon kernel failed to build in this process (it is then no longer a candidate).
_wgmma_build_error: str | None = None
# Why the 256-wide wgmma candidates failed or strayed in this process (they are then dropped).
_n256_error: str | None = None


@functools.cache
def _hopper(device: torch.device) -> bool:
    """sm_90, the GPUs with wgmma. Cached: the capability query would run on every launch."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _wgmma_runs(device: torch.device, lora_dtype: torch.dtype) -> bool:
    """Whether the Gluon kernel can run: a Hopper GPU, 16-bit low-rank operands, and no earlier
    failure to build it."""
    return _hopper(device) and lora_dtype in (torch.bfloat16, torch.float16) and _wgmma_build_error is None


def _tail_split(tiles: int, programs: int, k_tiles: int) -> tuple[int, int]:
    """``(full, split)``: a persistent launch does the tiles of the full waves, ``tiles[:full]``;
    the rest, a last wave of at most ``programs / 2`` tiles, run split ``split`` ways along K, so
    that they occupy most SMs instead of leaving them idle (FLUX's M = 4608, N = 3072 GEMMs:
    432 tiles on 132 SMs leave 36). ``(tiles, 1)`` where splitting would not help.

    Example:
        >>> _tail_split(432, 132, 120)
        (396, 3)
    """
    full = tiles // programs * programs
    tail = tiles - full
    split = min(programs // tail, k_tiles, 8) if tail else 1
    return (full, split) if split > 1 else (tiles, 1)


def _gpu_ms(launch: Callable[[], None]) -> float:
    """The GPU time of ``launch()`` in ms: the median over replays of a CUDA graph of repeated
    launches. Timed launch by launch, a small M measures the host (one launch's Python outlasts a
    10-35 us kernel), and the tuner's picks were noise there (KERNEL_NOTES.md, v17).

    The graph runs on a stream of its own (do_bench_cudagraph's), unordered with the caller's, so
    the device is synchronized first: work queued on the caller's stream may still be writing memory
    that the arguments took over from it (on an H200 that race left NaN in tuned outputs).

    Example (on a GPU): ``_gpu_ms(lambda: torch.ones(1 << 20, device="cuda"))``
    """
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(launch, rep=5, return_mode="median")


def _tune(args: tuple, key: tuple, m: int, n: int, k: int, rank: int, group: int, packed_group: int, has_bias: bool, gelu: tuple[int, int],
          lora_dtype: torch.dtype) -> GemmConfig:
    """Time every candidate on the real arguments (median of a short run), time the close ones
    again (``_fastest_sustained``); cache the fastest, in the process and in the tuning file
    (``use_tuning_cache``), whose pick for ``key``, where there is one, is taken instead.

    A Gluon candidate that fails to build (Gluon's API moves between Triton releases) is dropped
    for the rest of the process with one warning: the Triton kernels compute the same. So is an
    n256 candidate that fails to build or whose output strays from the first candidate's (a plain
    Triton kernel) on these arguments: for int8 it runs an instruction Triton does not emit
    itself (``int8_wgmma_256``)."""
    candidates = _candidate_configs(m, group == 0, group, packed_group, wgmma=_wgmma_runs(args[0].device, lora_dtype),
                                    gemv_allowed=gemv_fits(args[0], args[2], packed_group))
    launch = lambda cfg, weight=args[2]: _launch((*args[:2], weight, *args[3:]), m, n, k, rank, group, packed_group, has_bias, gelu, lora_dtype, cfg)
    stored = _stored_pick(args[0].device, key)
    if stored in candidates:
        # Picked by an earlier process on this GPU model with these kernels: it only has to build
        # here, and an n256 pick to agree with the first candidate again, as in a full tuning.
        if stored in _time_candidates([candidates[0], stored] if stored.n256 else [stored], launch, args[-1]):
            _tuned[key] = stored
            return stored
    first_ms = _time_candidates(candidates, launch, args[-1])
    # The forward reads each weight once, from memory; launches repeated on one weight read it from
    # L2, which ranked two configs 7% apart the wrong way at 4096x12288x3072 (KERNEL_NOTES.md, v20).
    # So the second pass cycles through copies of the weight that together outgrow L2, made before
    # its first timing (most shapes have one close config and no second pass), on this stream.
    weight_cycle = functools.cache(lambda: itertools.cycle(_weight_copies(args[2], _l2_bytes(args[2].device))))

    def time_cold(cfg: GemmConfig) -> float:
        weights = weight_cycle()
        return _gpu_ms(lambda: launch(cfg, next(weights)))

    best = _fastest_sustained(first_ms, time_cold) if first_ms else None
    _tuned[key] = best
    if best is not None:
        _store_picks(args[0].device, {key: best})
    return best


def _time_candidates(candidates: list[GemmConfig], launch: Callable[[GemmConfig], None], out: Tensor) -> dict[GemmConfig, float]:
    """The GPU ms of each candidate that builds and runs (``launch(cfg)`` writes ``out``), in order;
    the Gluon and n256 failures described in ``_tune`` leave theirs out."""
    global _wgmma_build_error, _n256_error
    # The first candidate's output, kept only where an n256 candidate will be checked against it.
    check_n256 = _n256_error is None and any(cfg.n256 for cfg in candidates)
    first_ms, reference = {}, None
    for cfg in candidates:
        if cfg.wgmma and _wgmma_build_error is not None or cfg.n256 and _n256_error is not None:
            continue
        try:
            ms = _gpu_ms(lambda: launch(cfg))
        except triton.runtime.errors.OutOfResources:
            continue  # tile does not fit this GPU's shared memory or registers
        except Exception as exc:
            if not cfg.wgmma:
                raise
            if cfg.n256:
                _n256_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"w4a4_gemm: the 256-wide wgmma kernel did not build with Triton {triton.__version__}; "
                              f"the 128-wide ones run instead: {_n256_error}", stacklevel=3)
                continue
            _wgmma_build_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"w4a4_gemm: the Gluon (wgmma) kernel did not build with Triton {triton.__version__}, so the "
                          f"Triton kernels run instead (same results, up to 11% slower on Hopper): {_wgmma_build_error}", stacklevel=3)
            continue
        if check_n256 and reference is None:
            reference = out.clone()
        elif cfg.n256:
            # Kernels differ only in the order of the low-rank and epilogue roundings: far less.
            difference = _relative_difference(out, reference)
            if not difference <= 1e-2:
                _n256_error = f"{cfg} differed from the first candidate by {difference:.3g} (relative)"
                warnings.warn(f"w4a4_gemm: the 256-wide wgmma kernel gave other results than the Triton kernels and is not used: {_n256_error}", stacklevel=3)
                continue
        first_ms[cfg] = ms
    return first_ms


def use_tuning_cache(folder: str | os.PathLike | None) -> None:
    """Keep the tuner's picks in ``folder`` too (None: in this process only). A pick made by an
    earlier process on the same GPU model, with the same torch, Triton and kernel sources, is then
    reused after one check that it builds, instead of timing every candidate again (15-17 per
    shape, each compiled or loaded and timed as a CUDA graph; FLUX at one resolution has 12 shapes).

    Picks this process made before are added to the file at once: it reuses them from memory
    without tuning again, so they would otherwise never reach the file. (bench_e2e's layer errors
    tune FLUX's shapes before its compile: the next process's first call, tuning them again, took
    56.8 s at 4096 tokens on an H200, and 21.0 s with this; RESULTS.md, run 34.)

    Example:
        >>> use_tuning_cache(None)
    """
    global _tuning_folder
    _tuning_folder = Path(folder) if folder is not None else None
    made = {key: config for key, config in _tuned.items() if config is not None}
    if _tuning_folder is not None and made and torch.cuda.is_available():
        # Only CUDA launches tune, and the in-process picks are not kept per device either.
        _store_picks(torch.device("cuda", torch.cuda.current_device()), made)


@functools.cache
def _build_tag(device: torch.device) -> str:
    """The tuning file's name part for ``device``: the GPU model and a hash of what a pick depends on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    digest = hashlib.sha256(f"{name}|{torch.__version__}|{triton.__version__}".encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}-{digest.hexdigest()[:16]}"


def _tuning_file(device: torch.device) -> Path | None:
    return _tuning_folder / f"gemm_tuning-{_build_tag(device)}.json" if _tuning_folder is not None else None


def _read_picks(path: Path) -> dict[str, dict]:
    try:
        picks = json.loads(path.read_text())
    except (OSError, ValueError):  # no file yet, or not ours: nothing stored
        return {}
    return picks if isinstance(picks, dict) else {}


def _stored_pick(device: torch.device, key: tuple) -> GemmConfig | None:
    path = _tuning_file(device)
    fields = _read_picks(path).get(repr(key)) if path is not None else None
    try:
        return GemmConfig(**fields) if isinstance(fields, dict) else None
    except TypeError:
        return None


def _store_picks(device: torch.device, picks: dict[tuple, GemmConfig]) -> None:
    """Add ``picks`` to the tuning file, merged with what other processes wrote (atomic replace; no
    write when the file has them all already)."""
    path = _tuning_file(device)
    if path is None:
        return
    stored = _read_picks(path)
    merged = stored | {repr(key): dataclasses.asdict(config) for key, config in picks.items()}
    if merged == stored:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError as exc:
        warnings.warn(f"w4a4_gemm: could not write the tuner's picks to {path} ({exc}); the next process tunes again", stacklevel=3)


def _l2_bytes(device: torch.device) -> int:
    """The L2 cache's size of a GPU; 0 for a CPU.

    Example:
        >>> _l2_bytes(torch.device("cpu"))
        0
    """
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0


def _weight_copies(weight: Tensor, l2_bytes: int) -> list[Tensor]:
    """``weight`` and enough copies of it to fill twice an L2 cache of ``l2_bytes``, so that
    launches cycling through them read the weight from memory, as a forward does.

    Example:
        >>> [len(_weight_copies(torch.zeros(10, 10, dtype=torch.int8), l2)) for l2 in (0, 50, 120)]
        [1, 1, 3]
    """
    return [weight] + [weight.clone() for _ in range(-(-2 * l2_bytes // weight.nbytes) - 1)]


def _fastest_sustained(first_ms: dict[GemmConfig, float], time_again: Callable[[GemmConfig], float]) -> GemmConfig:
    """The fastest config under sustained load: the (at most four) fastest configs within 15% of
    the fastest first timing are timed again back to back, in order and then in reverse, and ranked
    by those times. (Each timing takes about 0.1 s; four keep the cold start's tuning short.)

    Why: a GPU runs faster after an idle moment (boost clocks) than under the sustained load of a
    forward, and the first timings come between compiles. On an H200 a config timed three times in
    a row took 491, 503 and 500 us (another 201, 226, 226), and the tuner picked one of FLUX's
    largest GEMMs' configs 6% slower under load in two of three tunings (KERNEL_NOTES.md, v20).
    The second pass comes after all are compiled; timed there and back, a drift in clocks weighs
    on every config alike.

    Example:
        >>> a, b = GemmConfig(128, 128, 128, 1, 8, 4), GemmConfig(128, 256, 128, 1, 8, 4)
        >>> _fastest_sustained({a: 0.95, b: 1.0}, time_again={a: 1.05, b: 1.0}.get) == b  # a was boosted
        True
    """
    fastest = min(first_ms.values())
    close = sorted((cfg for cfg, ms in first_ms.items() if ms <= 1.15 * fastest), key=first_ms.__getitem__)[:4]
    if len(close) == 1:
        return close[0]
    sustained = dict.fromkeys(close, 0.0)
    for cfg in close + close[::-1]:
        sustained[cfg] += time_again(cfg)
    return min(close, key=sustained.__getitem__)


def _relative_difference(out: Tensor, reference: Tensor) -> float:
    """``|out - reference| / |reference|`` (2-norms) over the elements where ``reference`` is
    finite; 0 when both are 0 there (a first call on zeros).

    Example:
        >>> round(_relative_difference(torch.tensor([0.0, 4.0, float("nan")]), torch.tensor([0.0, 5.0, float("nan")])), 3)
        0.2
        >>> _relative_difference(torch.zeros(3), torch.zeros(3))
        0.0
    """
    finite = reference.isfinite()
    difference = torch.where(finite, out - reference, 0).float().norm()
    scale = torch.where(finite, reference, 0).float().norm().clamp_min(torch.finfo(torch.float32).tiny)
    return (difference / scale).item()


def tuned_configs() -> dict[tuple, GemmConfig]:
    """The configs chosen so far, keyed by (group size or 0 for two-level, packed weight's group
    size or 0, operand dtype, M bucket, N, K, rank chunks, lora dtype, out dtype).

    Example:
        >>> isinstance(tuned_configs(), dict)
        True
    """
    return dict(_tuned)


def w4a4_gemm(
    act_q: Tensor,
    act_scales: Tensor,
    weight_q: Tensor,
    weight_scales: Tensor,
    lora_act: Tensor,
    lora_up: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    config: GemmConfig | None = None,
    gelu_start: int = 0,
    gelu_end: int = 0,
) -> Tensor:
    """``float(act_q . weight_q^T) * scales + lora_act @ lora_up^T + bias`` as ``out_dtype`` [M, N],
    with GELU (tanh approximation) on the output columns ``gelu_start:gelu_end``.

    Args:
        act_q: [M, K] int8 activations (``q * mult`` or ``q``), or float8_e4m3fn holding ``q * mult``
            (two-level scales only; weight_q then too).
        act_scales: fp32 [M] (two-level) or [M, K/G] (group scales).
        weight_q: [N, K] of act_q's dtype; or, with int8 act_q and two-level scales, the packed
            "int4_2level" weight of ``numerics.pack_weight_operand`` (uint8 [N, K/2 + K/G]),
            expanded tile by tile as the K loop loads it. For small M, where the GEMM waits on
            reading the weight (0.52 bytes per value, against 1 for the 8-bit operand and 2.5 with
            ``unpack_weight`` first): the op passes it for M <= ``ops.PACKED_GEMM_MAX_M``.
        weight_scales: [N] fp32 (two-level) or [N, K/G] any float dtype.
        lora_act: [M, R] 16-bit or fp32 (R = 0 allowed, any R; chunks of up to 64).
        lora_up: [N, R]; a dtype other than lora_act's is multiplied in fp32.
        bias: [N] or None.
        out_dtype: bf16, fp16 or fp32.
        config: a fixed tile config (tests); None picks a measured one on CUDA, a default elsewhere.
        gelu_start, gelu_end: the output columns that GELU applies to (the activation after an
            MLP's up projection, or after its piece of a fused projection); an empty range: none.

    Example:
        >>> a = torch.randint(-8, 8, (3, 128), dtype=torch.int8)
        >>> w = torch.randint(-8, 8, (32, 128), dtype=torch.int8)
        >>> w4a4_gemm(a, torch.ones(3), w, torch.ones(32), torch.zeros(3, 0), torch.zeros(32, 0), None, torch.float32).shape
        torch.Size([3, 32])
    """
    group, packed_group = _check_args(act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias)
    (m, k), n, rank = act_q.shape, weight_q.shape[0], lora_act.shape[1]
    if gelu_start < gelu_end and not 0 <= gelu_start < gelu_end <= n:
        raise ValueError(f"w4a4_gemm: the GELU columns gelu_start:gelu_end must lie in 0:{n}, got {gelu_start}:{gelu_end}")
    out = torch.empty((m, n), dtype=out_dtype, device=act_q.device)
    if m == 0 or n == 0:
        return out
    # 16-bit products are exact in fp32, so an fp32 dot computes the same sums; it is used for mixed
    # dtypes and under the CPU interpreter, whose bf16 dot is wrong (Triton 3.9 reads raw bits).
    lora_dtype = lora_act.dtype if lora_up.dtype == lora_act.dtype and lora_act.is_cuda else torch.float32
    args = (act_q.contiguous(), act_scales.contiguous(), weight_q.contiguous(), weight_scales.contiguous(),
            lora_act.contiguous(), lora_up.contiguous(), bias if bias is not None else act_scales, out)
    if config is None:
        key = (group, packed_group, act_q.dtype, _m_bucket(m), n, k, triton.cdiv(rank, 64), lora_dtype, out_dtype)
        config = _tuned.get(key)
        if config is None:
            if act_q.is_cuda and not torch.cuda.is_current_stream_capturing():
                config = _tune(args, key, m, n, k, rank, group, packed_group, bias is not None, (gelu_start, gelu_end), lora_dtype)
            else:
                config = _candidate_configs(m, group == 0, group, packed_group)[0]
    _launch(args, m, n, k, rank, group, packed_group, bias is not None, (gelu_start, gelu_end), lora_dtype, config)
    return out


def w4a4_gemm_reference(
    act_q: Tensor,
    act_scales: Tensor,
    weight_q: Tensor,
    weight_scales: Tensor,
    lora_act: Tensor,
    lora_up: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    gelu_start: int = 0,
    gelu_end: int = 0,
) -> Tensor:
    """What ``w4a4_gemm`` computes, in plain PyTorch (the GEMM half of ``numerics.w4a4_linear_reference``).

    Example:
        >>> a = torch.randint(-8, 8, (3, 128), dtype=torch.int8)
        >>> w = torch.randint(-8, 8, (32, 128), dtype=torch.int8)
        >>> w4a4_gemm_reference(a, torch.ones(3), w, torch.ones(32), torch.zeros(3, 0), torch.zeros(32, 0), None, torch.float32).shape
        torch.Size([3, 32])
    """
    if weight_q.dtype == torch.uint8:  # packed "int4_2level" (see w4a4_gemm)
        k = act_q.shape[1]
        weight_q = unpack_weight_operand(weight_q, k, _packed_2level_group(k, weight_q.shape[1]), True)
    out = lora_act.float() @ lora_up.float().T
    if act_scales.dim() == 1:
        acc = (act_q.double() @ weight_q.double().T).float()  # exact int32 sums
        out += acc * act_scales.float().unsqueeze(1) * weight_scales.float().unsqueeze(0)
    else:
        group = act_q.shape[1] // act_scales.shape[1]
        w_g = weight_q.float().unflatten(-1, (-1, group))
        for start in range(0, act_q.shape[0], 256):  # bounds the [rows, N, groups] intermediate
            rows = slice(start, start + 256)
            acc = torch.einsum("mgk,ngk->mng", act_q[rows].float().unflatten(-1, (-1, group)), w_g)  # exact in fp32
            out[rows] += (acc * act_scales[rows].float().unsqueeze(1) * weight_scales.float().unsqueeze(0)).sum(-1)
    if bias is not None:
        out += bias.float()
    return apply_gelu_columns(out, gelu_start, gelu_end).to(out_dtype)
