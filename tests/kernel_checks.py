"""Inputs and error bounds shared by the CPU (interpreter) and GPU kernel tests."""

from __future__ import annotations

import zlib

import torch

from svdq_compile import numerics
from svdq_compile.kernels.w4a4_gemm import w4a4_gemm_reference

FP32_EPS = 2.0**-24  # unit roundoff
# Operand layouts under test: (two_level, fp8): "int4_2level", "int4_pow2", "int4".
FORMAT_CASES = {"argvalues": [(True, False), (True, True), (False, False)], "ids": ["2level", "pow2", "groups"]}
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def seed(*parts: object) -> int:
    """A stable seed per test case (crc32 of its parameters)."""
    return zlib.crc32(repr(parts).encode())


def outlier_input(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Gaussian tokens where a few channels are 30-100x larger, as in diffusion transformers, on ``gen``'s device."""
    device = gen.device
    x = torch.randn(m, k, generator=gen, device=device)
    boost = torch.ones(k, device=device)
    outliers = torch.randperm(k, generator=gen, device=device)[: max(2, k // 32)]
    boost[outliers] = 30 + 70 * torch.rand(outliers.numel(), generator=gen, device=device)
    return (x * boost).to(dtype)


def gemm_inputs(m: int, n: int, k: int, rank: int, dtype: torch.dtype, two_level: bool, gen: torch.Generator,
                fp8: bool = False, with_bias: bool = True) -> tuple:
    """``w4a4_gemm``'s arguments on ``gen``'s device: outlier activations and Gaussian weights
    quantized (group 64) in the format ``two_level``/``fp8`` names, random low-rank factors and bias."""
    device = gen.device
    x = outlier_input(m, k, torch.float32, gen)
    act_q, act_scales = numerics.quantize_activations(x, 64, two_level, fp8)
    weight = torch.randn(n, k, generator=gen, device=device) / k**0.5
    q, weight_scales, mult = numerics.quantize_weight(weight, 64, two_level, dtype, pow2=fp8)
    weight_q = numerics.expand_2level(q, mult, 64, fp8) if two_level else q
    lora_act = torch.randn(m, rank, generator=gen, device=device).to(dtype)
    lora_up = (torch.randn(n, rank, generator=gen, device=device) / 4).to(dtype)
    bias = torch.randn(n, generator=gen, device=device).to(dtype) if with_bias else None
    return act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias


def ulp_bound(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """At least one unit in the last place of ``dtype`` at ``|ref|`` (one rounding may flip it)."""
    if dtype == torch.float32:
        return torch.zeros_like(ref)
    smallest = 2.0**-24 if dtype == torch.float16 else 2.0**-133
    return (ref.abs() * 2.0 ** -MANTISSA_BITS[dtype]).clamp_min(smallest)


def gemm_bound(args: tuple, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference output and how far an fp32-accumulating kernel may be from it.

    Every term (integer dot times scales, low-rank products, bias) is exact or rounded once; the
    kernel adds the same terms in another order, so the difference is at most
    (terms + 4) * eps * sum|terms|, with sum|terms| the reference run on absolute values. A 16-bit
    output then rounds once more (one ulp).

    fp8 operands ("int4_pow2") get the same bound: the interpreter sums their products in fp32,
    exactly at the tests' sizes, and an H200's fp8 tensor cores summed every FLUX-shaped dot of
    these inputs exactly too (0 difference from the fp64 oracle in fp32 output, KERNEL_NOTES.md
    v10), though NVIDIA does not specify fp8 accumulation as exact: a GPU that rounds fails here.
    """
    act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias = args
    ref = w4a4_gemm_reference(*args, torch.float32)
    abs_sum = w4a4_gemm_reference(*[t.float().abs() if t is not None else None for t in args], torch.float32)
    terms = max(lora_act.shape[1], 1 if act_scales.dim() == 1 else act_scales.shape[1]) + 4
    return ref, terms * FP32_EPS * abs_sum + ulp_bound(ref, out_dtype)


TANH_APPROX_ERROR = 2.0**-10.987  # PTX ISA: tanh.approx.f32's largest relative error


def gelu_gemm_bound(args: tuple, out_dtype: torch.dtype, gelu_start: int, gelu_end: int,
                    tanh_approx: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pre, ref, bound)``: the reference output before GELU (fp32), after GELU on the columns
    ``gelu_start:gelu_end``, and how far a kernel that applies GELU in its epilogue may be from it.

    GELU's slope is at most 1.13, so a pre-activation difference d (``gemm_bound`` in fp32) moves
    the output by at most 1.13 d; its fp32 evaluation (exp-based tanh in the kernel, torch's tanh in
    the reference) adds a few roundings of |v|, bounded by 16 eps |v|; with ``tanh_approx`` (the
    Gluon kernels' ``tanh.approx.f32``) 0.5 |v| TANH_APPROX_ERROR more on the GELU columns. Then one
    rounding to ``out_dtype``.
    """
    pre, pre_bound = gemm_bound(args, torch.float32)
    ref = w4a4_gemm_reference(*args, torch.float32, gelu_start=gelu_start, gelu_end=gelu_end)
    bound = 1.13 * pre_bound + 16 * FP32_EPS * pre.abs() + ulp_bound(ref, out_dtype)
    if tanh_approx:
        bound[:, gelu_start:gelu_end] += 0.5 * TANH_APPROX_ERROR * pre[:, gelu_start:gelu_end].abs()
    return pre, ref, bound


def near_tie_rows(rows: int, k: int, two_level: bool, gen: torch.Generator) -> torch.Tensor:
    """fp32 tokens whose quotients land on or within 3 ulp of h + 0.5, for h = -8..6.

    Group 0 holds the row max; every other group holds its own max and near-tie entries. A product
    with the rounded reciprocal instead of a division mis-rounds several of these.
    """
    x = torch.zeros(rows, k)
    ulps = torch.arange(-3, 4, dtype=torch.float32)
    for r in range(rows):
        row_max = float(torch.empty(()).uniform_(50, 100, generator=gen))
        x[r, 0] = row_max
        s1 = torch.tensor(row_max) / 112
        for g in range(1, k // 64):
            group_max = torch.tensor(float(torch.empty(()).uniform_(1, row_max, generator=gen)))
            step = s1 * torch.ceil(group_max / (s1 * 7)) if two_level else group_max / 7
            h = torch.randint(-8, 7, (8,), generator=gen).float() + 0.5
            ties = h[:, None] * step
            near = (ties + ulps[None, :] * torch.finfo(torch.float32).eps * ties.abs()).flatten()[:63]
            x[r, g * 64] = group_max
            x[r, g * 64 + 1 : g * 64 + 1 + near.numel()] = near.clamp(-float(group_max), float(group_max))
    return x
