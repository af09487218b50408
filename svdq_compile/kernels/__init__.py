"""Triton kernels of the W4A4 linear, one op per module, each with its PyTorch reference beside it.

* ``quantize_act_lowrank_down``: smoothing, per-token int4 quantization and ``x @ lora_down^T``.
* ``w4a4_gemm``: int8 (or fp8) tensor-core GEMM with the low-rank up projection, bias and cast in its
  epilogue (``gemm_epilogue``, shared by its kernels); on Hopper also a Gluon main loop that keeps
  one int8 wgmma in flight (``w4a4_gemm_wgmma``), and for 1-4 tokens a GEMV (``w4a4_gemv``).
* ``unpack_weight``: a 4-bit packed weight to the GEMM's 8-bit operand, just before the GEMM (above
  64 tokens; below, ``w4a4_gemm`` expands a packed "int4_2level" weight's tiles itself).
* ``int8_wgmma_256``: not an op: the PTX rename that gives the Gluon GEMM a 256-wide int8 wgmma.

The modules are imported where they are used (``svdq_compile.ops`` on CUDA), not here: Triton picks
its CPU interpreter when a kernel is decorated, so importing them must wait for the environment.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (launch grids are sized by it); 4 off CUDA (interpreter).

    Example:
        >>> sm_count(torch.device("cpu"))
        4
    """
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
