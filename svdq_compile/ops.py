"""The W4A4 SVDQuant linear as a torch custom op (``torch.ops.svdq.w4a4_linear``).

The op is opaque to Inductor (a fusion barrier) and traceable by Dynamo through its fake
implementation. Low-rank factors are ordinary tensor arguments, so LoRA factors can be appended or
swapped at run time without recompiling. Every device runs ``numerics.w4a4_linear_reference``
unless a faster implementation is registered for it below.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from .numerics import packed_pow2, packed_weight_columns, w4a4_linear_reference

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Up to this many tokens a packed "int4_2level" weight goes to the GEMM as it is, expanded in its K
# loop: reading 0.52 bytes per weight instead of unpack_weight's 1.5 and the GEMM's 1 (FLUX's
# adaLN projections have M = 1). On an H200 that took 0.30-0.93x the time of unpack_weight + GEMM
# at M = 1-64 and FLUX's weight shapes, but up to 1.9x at M >= 256, where the expansion's
# instructions hold up the tensor cores (KERNEL_NOTES.md v16; timed launch by launch, so at M = 1 partly
# host time, v17).
PACKED_GEMM_MAX_M = 64


def check_w4a4_args(
    x: Tensor,
    weight_q: Tensor,
    weight_scales: Tensor,
    smooth_inv: Tensor,
    lora_down: Tensor,
    lora_up: Tensor,
    bias: Tensor | None,
    group_size: int,
    x_tail: Tensor | None = None,
    gelu_start: int = 0,
    gelu_end: int = 0,
) -> None:
    """Raise a ValueError that says what to change when the op's arguments do not fit together.

    Example:
        >>> check_w4a4_args(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8),
        ...                 torch.ones(64), torch.zeros(0, 64), torch.zeros(8, 0), None, 64)
    """
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"w4a4_linear: x must be bfloat16, float16 or float32, got {x.dtype}; cast the input first")
    if x.dim() < 1:
        raise ValueError("w4a4_linear: x must have at least one dimension (the K features)")
    if weight_q.dtype not in (torch.int8, torch.float8_e4m3fn, torch.uint8) or weight_q.dim() != 2:
        raise ValueError(f"w4a4_linear: weight_q must be a 2-D int8 (or, for int4_pow2, float8_e4m3fn) operand [N, K] "
                         f"or its uint8 packed form, got {weight_q.dtype} {tuple(weight_q.shape)}")
    n = weight_q.shape[0]
    x_features = x.shape[-1]
    if x_tail is not None:
        if x_tail.dtype != x.dtype or x_tail.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"w4a4_linear: x_tail must have x's dtype and leading shape {tuple(x.shape[:-1])}, got {x_tail.dtype} {tuple(x_tail.shape)}")
        x_features += x_tail.shape[-1]
    k = x_features if weight_q.dtype == torch.uint8 else weight_q.shape[1]
    if x_features != k:
        raise ValueError(f"w4a4_linear: x (with x_tail) has {x_features} features but the weight expects {k}; pass x of shape [..., {k}]")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"w4a4_linear: K = {k} must be a multiple of group_size = {group_size}; keep this layer in 16-bit")
    two_level = weight_scales.dim() == 1
    packed_columns = packed_weight_columns(k, group_size, two_level)
    if weight_q.dtype == torch.uint8 and weight_q.shape[1] != packed_columns and not (two_level and packed_pow2(weight_q.shape[1], k, group_size)):
        pow2_columns = f" (or {packed_weight_columns(k, group_size, True, pow2=True)} packed from int4_pow2)" if two_level else ""
        raise ValueError(f"w4a4_linear: a packed weight_q for K = {k} must be uint8 [{n}, {packed_columns}]{pow2_columns} "
                         f"(numerics.pack_weight_operand), got {tuple(weight_q.shape)}")
    if weight_scales.shape not in ((n,), (n, k // group_size)):
        raise ValueError(f"w4a4_linear: weight_scales must be [{n}] (two-level) or [{n}, {k // group_size}] (group scales), got {tuple(weight_scales.shape)}")
    if weight_q.dtype == torch.float8_e4m3fn and weight_scales.shape != (n,):
        raise ValueError(f"w4a4_linear: a float8_e4m3fn weight_q (int4_pow2) takes [{n}] row scales, got {tuple(weight_scales.shape)}")
    if smooth_inv.shape != (k,):
        raise ValueError(f"w4a4_linear: smooth_inv must be [{k}], got {tuple(smooth_inv.shape)}")
    rank = lora_down.shape[0]
    if lora_down.dim() != 2 or lora_down.shape[1] != k or lora_up.dim() != 2 or lora_up.shape != (n, rank):
        raise ValueError(f"w4a4_linear: lora_down must be [R, {k}] and lora_up [{n}, R], got {tuple(lora_down.shape)} and {tuple(lora_up.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"w4a4_linear: bias must be [{n}], got {tuple(bias.shape)}")
    if gelu_start < gelu_end and not 0 <= gelu_start < gelu_end <= n:
        raise ValueError(f"w4a4_linear: the GELU columns gelu_start:gelu_end must lie in 0:{n}, got {gelu_start}:{gelu_end}")
    devices = {t.device for t in (x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, x_tail) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"w4a4_linear: all tensors must be on one device, got {sorted(map(str, devices))}; move the model with .to(device)")


@torch.library.custom_op("svdq::w4a4_linear", mutates_args=())
def _w4a4_linear_op(
    x: Tensor,
    weight_q: Tensor,
    weight_scales: Tensor,
    smooth_inv: Tensor,
    lora_down: Tensor,
    lora_up: Tensor,
    bias: Tensor | None,
    group_size: int,
    x_tail: Tensor | None = None,
    gelu_start: int = 0,
    gelu_end: int = 0,
) -> Tensor:
    check_w4a4_args(x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, group_size, x_tail, gelu_start, gelu_end)
    return w4a4_linear_reference(x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, group_size, x_tail, gelu_start, gelu_end)


@_w4a4_linear_op.register_fake
def _w4a4_linear_fake(x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, group_size, x_tail=None, gelu_start=0, gelu_end=0):
    check_w4a4_args(x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, group_size, x_tail, gelu_start, gelu_end)
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


@torch.library.custom_op("svdq::concat_lowrank", mutates_args=())
def concat_lowrank(factors: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` of low-rank factors (the SVD branch and appended LoRAs), opaque to Inductor.

    The quantized factors' rank is symbolic in compiled graphs (a graph serves blocks whose branches
    differ), and a concatenation that Inductor generated itself would guard on that size, which
    Dynamo cannot express (no source): seen on torch 2.11 with CUDA. As an op it is one copy.

    Example:
        >>> concat_lowrank([torch.ones(2, 4), torch.zeros(1, 4)], 0).shape
        torch.Size([3, 4])
    """
    return torch.cat(factors, dim)


@concat_lowrank.register_fake
def _concat_lowrank_fake(factors, dim):
    return torch.cat(factors, dim)


@torch.library.custom_op("svdq::place_rows", mutates_args=())
def place_rows(factor: Tensor, offset: int, rows: int) -> Tensor:
    """``factor`` [n, r] at rows ``offset:offset + n`` of a [rows, r] zero tensor: a LoRA's up factor
    as its columns of a shared-input op's low-rank up factor (the other members' rows are 0).
    Opaque to Inductor for the reason ``concat_lowrank`` is (r is symbolic in compiled graphs).

    Example:
        >>> place_rows(torch.ones(2, 3), 1, 4).sum(1).tolist()
        [0.0, 3.0, 3.0, 0.0]
    """
    out = factor.new_zeros((rows, factor.shape[1]))
    out[offset : offset + factor.shape[0]] = factor
    return out


@place_rows.register_fake
def _place_rows_fake(factor, offset, rows):
    return factor.new_empty((rows, factor.shape[1]))


def w4a4_linear(
    x: Tensor,
    weight_q: Tensor,
    weight_scales: Tensor,
    smooth_inv: Tensor,
    lora_down: Tensor,
    lora_up: Tensor,
    bias: Tensor | None = None,
    group_size: int = 64,
    x_tail: Tensor | None = None,
    gelu_start: int = 0,
    gelu_end: int = 0,
) -> Tensor:
    """W4A4 SVDQuant linear ``[..., K] -> [..., N]`` in x's dtype (see ``w4a4_linear_reference``).

    Any leading dims; rows of x may be strided (other layouts are copied first). ``x_tail`` gives
    the input's last features as a second tensor (the op reads ``cat([x, x_tail], -1)`` without
    forming it); GELU (tanh approximation) is applied to the output columns ``gelu_start:gelu_end``.
    A token containing NaN or Inf gives a non-finite output row; other rows are unaffected.
    Arguments that do not fit raise a ValueError naming what to change.

    Example:
        >>> from svdq_compile.quantized_linear import QuantizedLinear
        >>> ql = QuantizedLinear.from_linear(torch.nn.Linear(64, 8), None)
        >>> w4a4_linear(torch.randn(3, 64), ql.weight_operand(), ql.scales, ql.smooth_inv, ql.lora_down, ql.lora_up).shape
        torch.Size([3, 8])
    """
    return torch.ops.svdq.w4a4_linear(x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, group_size, x_tail, gelu_start, gelu_end)


@functools.cache
def _reference_reason(device_index: int, group_size: int, fp8: bool) -> str | None:
    """Why this GPU, group size and operand type run the PyTorch reference instead of the kernels
    (None: they do not); warns the first time. Cached: the capability query costs microseconds on
    every call."""
    reason = None
    if torch.cuda.get_device_capability(device_index)[0] < 8:
        reason = "this GPU has no int8 tensor cores (compute capability < 8.0)"
    elif fp8 and torch.cuda.get_device_capability(device_index) < (8, 9):
        reason = "this GPU has no fp8 tensor cores for the int4_pow2 format (compute capability < 8.9); use int4_2level"
    elif group_size not in (16, 32, 64, 128, 256):
        reason = f"group_size {group_size} is not a power of two in 16..256"
    if reason is not None:
        warnings.warn(f"svdq::w4a4_linear runs the slow PyTorch reference: {reason}", stacklevel=3)
    return reason


@_w4a4_linear_op.register_kernel("cuda")
def _w4a4_linear_cuda(x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, group_size, x_tail=None, gelu_start=0, gelu_end=0):
    """CUDA: the two fused Triton kernels (quantize + low-rank down, then GEMM + epilogue), plus
    the expansion of a packed 4-bit weight to the 8-bit operand before the GEMM.

    GPUs without int8 tensor cores (compute capability < 8.0; < 8.9 for the fp8 operands of
    "int4_pow2") and group sizes the kernels do not take (not a power of two in 16..256) run the
    reference instead, with a one-time warning.
    """
    check_w4a4_args(x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, group_size, x_tail, gelu_start, gelu_end)
    two_level = weight_scales.dim() == 1
    k = smooth_inv.shape[0]
    fp8 = weight_q.dtype == torch.float8_e4m3fn or (weight_q.dtype == torch.uint8 and two_level and packed_pow2(weight_q.shape[1], k, group_size))
    if _reference_reason(x.device.index, group_size, fp8) is not None:
        return w4a4_linear_reference(x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, group_size, x_tail, gelu_start, gelu_end)
    # Imported here so that importing the package does not compile or decorate Triton kernels.
    from .kernels.quantize_act_lowrank_down import quantize_act_lowrank_down
    from .kernels.w4a4_gemm import w4a4_gemm

    # reshape keeps a view where it can (a column slice of a larger output stays in place).
    x2d = x.reshape(-1, x.shape[-1])
    tail2d = None if x_tail is None else x_tail.reshape(-1, x_tail.shape[-1])
    act_q, act_scales, lora_act = quantize_act_lowrank_down(x2d, smooth_inv, lora_down, group_size, two_level, x_tail=tail2d, fp8=fp8)
    weight_q = gemm_weight_operand(weight_q, x2d.shape[0], k, group_size, two_level)
    out = w4a4_gemm(act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias, x.dtype, gelu_start=gelu_start, gelu_end=gelu_end)
    return out.reshape(*x.shape[:-1], out.shape[1])


def gemm_weight_operand(weight_q: Tensor, m: int, k: int, group_size: int, two_level: bool) -> Tensor:
    """The weight operand ``w4a4_gemm`` takes for M tokens: an 8-bit operand as it is; a packed
    "int4_2level" weight as it is up to ``PACKED_GEMM_MAX_M`` tokens (the GEMM expands its tiles
    as it loads them: at small M it waits on reading the weight); any other packed weight expanded
    by ``unpack_weight`` into a buffer that lives for this call.

    Example:
        >>> from svdq_compile.numerics import pack_weight_operand
        >>> packed = pack_weight_operand(torch.full((8, 64), 3, dtype=torch.int8), 64, True)
        >>> gemm_weight_operand(packed, 1, 64, 64, True).dtype, gemm_weight_operand(packed, 4096, 64, 64, True).dtype
        (torch.uint8, torch.int8)
    """
    if weight_q.dtype != torch.uint8 or (two_level and m <= PACKED_GEMM_MAX_M and not packed_pow2(weight_q.shape[1], k, group_size)):
        return weight_q
    from .kernels.unpack_weight import unpack_weight

    return unpack_weight(weight_q, k, group_size, two_level)
