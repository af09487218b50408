"""SVDQuant numerics in plain PyTorch: the oracle every kernel, pass and test agrees with.

Weight side (offline): smoothing factors, a low-rank split of the smoothed weight, per-group
symmetric int4 quantization of the residual, packing. Activation side (run time): per-token
per-group int4 quantization. ``w4a4_linear_reference`` computes exactly what the fused kernels
compute: the same rounding (half to even), the same scale handling, exact integer dots and fp32
accumulation. See REFERENCE.md section 1 for the maths.

Two scale formats (``SVDQuantConfig.format``):

* "int4": one float scale per group, ``absmax / 7``.
* "int4_2level": a float row scale ``s1 = rowmax / 112`` and per group an integer
  ``m = ceil(absmax / (7 * s1))`` in 1..16; the group's scale is ``s1 * m``. The GEMM operand is the
  int8 value ``q * m`` (in [-128, 112]), so a whole row is one int8 dot and one float rescale.
* "int4_pow2": "int4_2level" with ``m`` rounded up to a power of two (1, 2, 4, 8 or 16). Then
  ``q * m`` has at most 4 significant bits and is exact in fp8 e4m3, and the GEMM runs on fp8
  tensor cores, which Triton keeps busier than int8 ones on Hopper (benchmarks/KERNEL_NOTES.md, v10).
"""

from __future__ import annotations

import torch
from torch import Tensor

QMIN, QMAX = -8, 7
MULT_MAX = 16  # largest two-level group multiplier: 8 * 16 = 128 still fits int8
_ROW_DIVISOR = QMAX * MULT_MAX  # s1 = rowmax / 112 gives the largest group the multiplier 16
# The power of two at or above each multiplier 1..16 ("int4_pow2"): index m - 1.
_POW2_CEIL = torch.tensor([1, 2, 4, 4] + [8] * 4 + [16] * 8, dtype=torch.float32)


def _groups(x: Tensor, group_size: int) -> Tensor:
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"the last dimension ({k}) must be a multiple of group_size ({group_size})")
    return x.float().unflatten(-1, (k // group_size, group_size))


def _div(x: Tensor, divisor: float) -> Tensor:
    # A tensor divisor: on CUDA, PyTorch turns ``tensor / python_float`` into a product with the
    # rounded reciprocal, one ulp off the true quotient the kernels (and the CPU) compute.
    return x / torch.tensor(divisor, dtype=x.dtype, device=x.device)


def _round_clamp(x: Tensor) -> Tensor:
    # torch.round rounds half to even, as the kernels do. A non-finite input gives q = 0: its scale
    # is already NaN or Inf and carries the non-finite value to the output instead.
    return torch.nan_to_num(torch.round(x).clamp_(QMIN, QMAX), nan=0.0)


def quantize_int4_groups(x: Tensor, group_size: int = 64, scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Symmetric int4 with one float scale per group of the last dimension ("int4" format).

    Returns ``q`` (int8 in [-8, 7], shape of x) and ``scale`` (``absmax / 7`` rounded to
    ``scale_dtype``, shape ``[..., K / group_size]``). An all-zero group has scale 0 and q = 0.

    Example:
        >>> q, s = quantize_int4_groups(torch.tensor([[7.0, -3.5] + [0.0] * 62]))
        >>> q[0, :2].tolist(), s.tolist()
        ([7, -4], [[1.0]])
    """
    xg = _groups(x, group_size)
    scale = _div(xg.abs().amax(-1), QMAX).to(scale_dtype).float()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = _round_clamp(xg / safe.unsqueeze(-1))
    return q.to(torch.int8).flatten(-2), scale.to(scale_dtype)


def quantize_int4_2level(x: Tensor, group_size: int = 64, pow2: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric int4 with two-level scales ("int4_2level" format), per row of the last dimension.

    Returns ``q`` (int8 in [-8, 7]), ``mult`` (uint8 in 1..16, ``[..., K / group_size]``) and the
    fp32 row scale ``s1`` (``[...]``); element k of a row is ``q * mult[k // group_size] * s1``.
    An all-zero row has ``s1 = 0`` and q = 0. ``pow2`` rounds each multiplier up to a power of
    two ("int4_pow2" format).

    Example:
        >>> x = torch.tensor([[112.0] + [0.0] * 63 + [21.0] + [0.0] * 63])
        >>> q, m, s1 = quantize_int4_2level(x)
        >>> s1.tolist(), m.tolist(), q[0, [0, 64]].tolist()
        ([1.0], [[16, 3]], [7, 7])
        >>> quantize_int4_2level(x, pow2=True)[1].tolist()
        [[16, 4]]
    """
    xg = _groups(x, group_size)
    gmax = xg.abs().amax(-1)
    s1 = _div(gmax.amax(-1), _ROW_DIVISOR)
    s1_safe = torch.where(s1 == 0, torch.ones_like(s1), s1).unsqueeze(-1)
    mult = torch.nan_to_num(torch.ceil(gmax / (s1_safe * QMAX)), nan=1.0).clamp_(1, MULT_MAX)
    if pow2:
        mult = _POW2_CEIL.to(mult.device)[mult.long() - 1]
    q = _round_clamp(xg / (s1_safe * mult).unsqueeze(-1))
    return q.to(torch.int8).flatten(-2), mult.to(torch.uint8), s1


def expand_2level(q: Tensor, mult: Tensor, group_size: int = 64, fp8: bool = False) -> Tensor:
    """The GEMM operand ``q * mult`` of the two-level formats (values in [-128, 112]): int8, or with
    ``fp8`` ("int4_pow2", power-of-two multipliers) float8_e4m3fn holding the same values exactly
    (``q * 2^e`` with ``|q| <= 8`` has at most 4 significant bits, as many as e4m3 holds).

    Example:
        >>> expand_2level(torch.full((1, 64), -8, dtype=torch.int8), torch.tensor([[16]], dtype=torch.uint8)).min().item()
        -128
        >>> expand_2level(torch.tensor([[-8, 7]]), torch.tensor([[16]], dtype=torch.uint8), 2, fp8=True).float().tolist()
        [[-128.0, 112.0]]
    """
    operand = (q.to(torch.int16) * mult.to(torch.int16).repeat_interleave(group_size, dim=-1)).to(torch.int8)
    return operand.to(torch.float8_e4m3fn) if fp8 else operand


def split_2level(operand: Tensor, group_size: int = 64, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """Inverse of ``expand_2level``: int4 values and multipliers that expand to ``operand`` exactly.

    Per group, the smallest multiplier m in 1..16 (with ``pow2``, a power of two) that divides
    every value with a quotient in [-8, 7]; the multiplier the quantizer chose always qualifies, so
    a solution exists for every operand ``expand_2level`` made, and it reproduces the operand bit
    for bit. An fp8 operand ("int4_pow2") is read as the integers it holds.

    Example:
        >>> q, m = split_2level(expand_2level(torch.full((1, 64), 7, dtype=torch.int8), torch.tensor([[5]], dtype=torch.uint8)))
        >>> m.item(), q[0, 0].item()
        (5, 7)
        >>> split_2level(torch.full((1, 64), -48, dtype=torch.int8), pow2=True)[1].item()  # -8 * 6 fits too, but 6 is no power of two
        8
    """
    values = operand.float() if operand.dtype == torch.float8_e4m3fn else operand
    e = values.to(torch.int16).unflatten(-1, (-1, group_size))
    mult = torch.zeros(e.shape[:-1], dtype=torch.int16, device=e.device)
    for m in ((16, 8, 4, 2, 1) if pow2 else range(MULT_MAX, 0, -1)):  # descending, so the smallest valid m is written last
        fits = ((e % m == 0) & (e >= QMIN * m) & (e <= QMAX * m)).all(-1)
        mult = torch.where(fits, m, mult)
    if bool((mult == 0).any()):
        raise ValueError(f"split_2level: operand is not q * m with q in [-8, 7] and m in {'1, 2, 4, 8, 16' if pow2 else '1..16'}")
    return (e // mult.unsqueeze(-1)).flatten(-2).to(torch.int8), mult.to(torch.uint8)


def quantize_activations(x: Tensor, group_size: int, two_level: bool, fp8: bool = False) -> tuple[Tensor, Tensor]:
    """Run-time activation quantization, per token (row): the GEMM operand and its scales.

    Two-level: ``(q * mult, s1 [M])``, the operand int8, or with ``fp8`` ("int4_pow2": power-of-two
    multipliers) float8_e4m3fn holding the same integers exactly. Float groups:
    ``(q, scale [M, K / group_size])`` in fp32.

    Example:
        >>> a, s = quantize_activations(torch.randn(3, 128), 64, two_level=True)
        >>> a.dtype, tuple(s.shape)
        (torch.int8, (3,))
        >>> quantize_activations(torch.randn(3, 128), 64, two_level=True, fp8=True)[0].dtype
        torch.float8_e4m3fn
    """
    if two_level:
        q, mult, s1 = quantize_int4_2level(x, group_size, pow2=fp8)
        return expand_2level(q, mult, group_size, fp8), s1
    return quantize_int4_groups(x, group_size)


def pack_int4(q: Tensor) -> Tensor:
    """Pack int4 values (int8 in [-8, 7], even last dim) two per byte: element 2j in the low nibble.

    Example:
        >>> pack_int4(torch.tensor([[-1, 7]], dtype=torch.int8)).tolist()
        [[127]]
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    nib = q.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of ``pack_int4``: exact, returns int8 in [-8, 7].

    Example:
        >>> unpack_int4(torch.tensor([[127]], dtype=torch.uint8)).tolist()
        [[-1, 7]]
    """
    p = packed.to(torch.int16)
    low = ((p & 0xF) ^ 8) - 8  # sign-extend a nibble
    high = ((p >> 4) ^ 8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2).to(torch.int8)


def pack_weight_operand(operand: Tensor, group_size: int, two_level: bool) -> Tensor:
    """The weight GEMM operand at 4 bits per value, uint8 ``[N, packed_weight_columns(...)]``:
    packed ``q``, then per group its multiplier (int8 "int4_2level" operand: one byte), its
    exponent (float8_e4m3fn "int4_pow2" operand, ``q * 2^e``: a nibble, two groups per byte) or
    nothing (float groups, "int4").

    What the op keeps in GPU memory with ``SVDQuantConfig(packed_weights=True)``: 0.27x the bytes of
    bf16 instead of 0.5x for the 8-bit operand; ``unpack_weight_operand`` restores it exactly. The
    column count tells the formats apart, so an "int4_pow2" operand needs two groups or more per row.

    Example:
        >>> op = expand_2level(torch.full((1, 64), -3, dtype=torch.int8), torch.tensor([[5]], dtype=torch.uint8))
        >>> packed = pack_weight_operand(op, 64, True)
        >>> packed.shape, torch.equal(unpack_weight_operand(packed, 64, 64, True), op)
        (torch.Size([1, 33]), True)
        >>> pow2 = expand_2level(torch.full((1, 128), -3, dtype=torch.int8), torch.tensor([[4, 16]], dtype=torch.uint8), fp8=True)
        >>> packed = pack_weight_operand(pow2, 64, True)
        >>> packed.shape, torch.equal(unpack_weight_operand(packed, 128, 64, True).float(), pow2.float())
        (torch.Size([1, 65]), True)
    """
    fp8 = operand.dtype == torch.float8_e4m3fn
    if operand.dtype != torch.int8 and not (fp8 and two_level):
        raise ValueError(f"pack_weight_operand: the operand must be int8, or float8_e4m3fn with two_level (int4_pow2), got {operand.dtype}")
    if not two_level:
        return pack_int4(operand)
    groups = operand.shape[-1] // group_size
    if not packs(operand, group_size):
        raise ValueError(f"pack_weight_operand: an int4_pow2 operand needs K >= 2 * group_size to be packed, got K = {operand.shape[-1]}")
    q, mult = split_2level(operand, group_size, pow2=fp8)
    if not fp8:
        return torch.cat((pack_int4(q), mult), dim=-1)
    exponent = torch.log2(mult.float()).to(torch.int8)
    if groups % 2:
        exponent = torch.cat((exponent, exponent.new_zeros((*exponent.shape[:-1], 1))), dim=-1)
    return torch.cat((pack_int4(q), pack_int4(exponent)), dim=-1)


def packs(operand: Tensor, group_size: int) -> bool:
    """Whether ``pack_weight_operand`` takes this 8-bit operand: int8, or an "int4_pow2" one
    (float8_e4m3fn) with two groups or more per row.

    Example:
        >>> packs(torch.zeros(2, 64, dtype=torch.int8), 64), packs(torch.zeros(2, 64, dtype=torch.float8_e4m3fn), 64)
        (True, False)
    """
    return operand.dtype == torch.int8 or operand.shape[-1] >= 2 * group_size


def unpack_weight_operand(packed: Tensor, k: int, group_size: int, two_level: bool) -> Tensor:
    """Inverse of ``pack_weight_operand``: the int8 (or, packed from "int4_pow2", float8_e4m3fn)
    [N, K] GEMM operand, exactly.

    Example:
        >>> unpack_weight_operand(pack_weight_operand(torch.ones(2, 64, dtype=torch.int8), 64, False), 64, 64, False).sum().item()
        128
    """
    q = unpack_int4(packed[..., : k // 2])
    if not two_level:
        return q
    if packed_pow2(packed.shape[-1], k, group_size):
        exponent = unpack_int4(packed[..., k // 2 :])[..., : k // group_size]
        return expand_2level(q, (1 << exponent.to(torch.int16)).to(torch.uint8), group_size, fp8=True)
    return expand_2level(q, packed[..., k // 2 :], group_size)


def packed_weight_columns(k: int, group_size: int, two_level: bool, pow2: bool = False) -> int:
    """Bytes per row of ``pack_weight_operand``'s result (``pow2``: from an "int4_pow2" operand).

    Example:
        >>> packed_weight_columns(3072, 64, True), packed_weight_columns(3072, 64, True, pow2=True)
        (1584, 1560)
    """
    groups = k // group_size
    return k // 2 + ((groups + 1) // 2 if pow2 else groups if two_level else 0)


def packed_pow2(columns: int, k: int, group_size: int) -> bool:
    """Whether a two-level packed weight of ``columns`` bytes per row holds an "int4_pow2" operand
    (exponent nibbles) rather than an "int4_2level" one (multiplier bytes): they differ in size
    from two groups per row on.

    Example:
        >>> packed_pow2(1560, 3072, 64), packed_pow2(1584, 3072, 64)
        (True, False)
    """
    return k >= 2 * group_size and columns == packed_weight_columns(k, group_size, True, pow2=True)


def smoothing_factors(act_absmax: Tensor | None, weight: Tensor, alpha: float, beta: float) -> Tensor:
    """Per-input-channel smoothing ``lambda_j = max|X_j|^alpha / max|W_j|^beta`` (fp32, [K]).

    The layer then computes ``(X / lambda) @ (W * lambda)^T``. Without activation statistics only
    ``alpha = 0`` makes sense, and ``alpha = beta = 0`` is no smoothing (all ones).

    Example:
        >>> smoothing_factors(torch.tensor([4.0, 1.0]), torch.ones(3, 2), 0.5, 0.5).tolist()
        [2.0, 1.0]
    """
    w_max = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    lam = w_max.pow(-beta)
    if alpha:
        if act_absmax is None:
            raise ValueError("alpha > 0 needs activation statistics: calibrate first or set alpha=0")
        lam = lam * act_absmax.float().to(lam.device).clamp_min(1e-5).pow(alpha)
    return lam.clamp(1e-4, 1e4)


def lowrank_svd(w: Tensor, rank: int, niter: int = 4, oversample: int = 16) -> tuple[Tensor, Tensor]:
    """Top-``rank`` factors ``up [N, r] @ down [r, K]`` of ``w`` (fp32) by seeded subspace iteration.

    A randomized SVD: deterministic (fixed seed), a few matmuls instead of a full SVD, so a 12B
    model's layers decompose in seconds on a GPU and tests run on a CPU. float64 on CPU, fp32 on GPU.

    Example:
        >>> w = torch.randn(64, 1) @ torch.randn(1, 32)
        >>> up, down = lowrank_svd(w, 1)
        >>> bool(torch.allclose(up @ down, w, atol=1e-4))
        True
    """
    n, k = w.shape
    dtype = torch.float64 if w.device.type == "cpu" else torch.float32
    if rank == 0:
        return w.new_zeros(n, 0, dtype=torch.float32), w.new_zeros(0, k, dtype=torch.float32)
    a = w.to(dtype)
    width = min(rank + oversample, n, k)
    gen = torch.Generator(device=w.device).manual_seed(0)
    omega = torch.randn(k, width, generator=gen, device=w.device, dtype=dtype)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    r = min(rank, s.numel())
    up = (basis @ u[:, :r]) * s[:r]
    return up.float(), vh[:r].float()


def dequantize_weight(q: Tensor, scales: Tensor, mult: Tensor | None, group_size: int) -> Tensor:
    """Float weight of a quantized residual (fp32, [N, K]); ``mult`` is given for two-level scales.

    Example:
        >>> q, s = quantize_int4_groups(torch.full((1, 64), 2.0))
        >>> dequantize_weight(q, s, None, 64).max().item()
        2.0
    """
    if mult is None:
        return (q.float().unflatten(-1, (-1, group_size)) * scales.float().unsqueeze(-1)).flatten(-2)
    return expand_2level(q, mult, group_size).float() * scales.float().unsqueeze(-1)


def quantize_weight(residual: Tensor, group_size: int, two_level: bool, scale_dtype: torch.dtype, pow2: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize a residual weight [N, K]: ``(q int8, scales, mult or None)``.

    Float group scales are kept in the model dtype (``scale_dtype``); two-level row scales in fp32;
    ``pow2``: two-level multipliers that are powers of two ("int4_pow2").

    Example:
        >>> q, s, m = quantize_weight(torch.randn(8, 128), 64, True, torch.bfloat16)
        >>> tuple(s.shape), tuple(m.shape)
        ((8,), (8, 2))
    """
    if two_level:
        q, mult, s1 = quantize_int4_2level(residual, group_size, pow2)
        return q, s1, mult
    q, scale = quantize_int4_groups(residual, group_size, scale_dtype)
    return q, scale, None


def apply_gelu_columns(out: Tensor, gelu_start: int, gelu_end: int) -> Tensor:
    """GELU (tanh approximation) on the last-dim columns ``gelu_start:gelu_end`` of ``out`` (in place,
    returns ``out``; an empty range leaves it unchanged). Applied in fp32 before the cast to the
    output dtype, as the GEMM epilogue does.

    Example:
        >>> apply_gelu_columns(torch.tensor([[-1.0, -1.0, -1.0]]), 1, 2).tolist()
        [[-1.0, -0.15880799293518066, -1.0]]
    """
    if gelu_start < gelu_end:
        out[..., gelu_start:gelu_end] = torch.nn.functional.gelu(out[..., gelu_start:gelu_end], approximate="tanh")
    return out


def w4a4_linear_reference(
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
    """The W4A4 SVDQuant linear, exactly as the fused kernels compute it.

    ``y = deq(Q(x * smooth_inv) . W_q) + (x @ lora_down^T) @ lora_up^T + bias``, returned in x's dtype,
    where x is ``cat([x, x_tail], -1)`` when ``x_tail`` is given, and with GELU (tanh approximation)
    on the output columns ``gelu_start:gelu_end``.

    Args:
        x: [..., K] bf16, fp16 or fp32.
        weight_q: [N, K] int8 GEMM operand: ``q * mult`` for two-level scales, ``q`` for float groups;
            or that operand packed by ``pack_weight_operand`` (uint8, 4 bits per value); or
            float8_e4m3fn for "int4_pow2" (the activations then get power-of-two multipliers too).
        weight_scales: [N] fp32 row scales (two-level) or [N, K / group_size] float group scales.
        smooth_inv: [K] fp32, ``1 / lambda``; the activations are quantized as ``x * smooth_inv``.
        lora_down: [R, K] 16-bit, already divided by lambda so that it reads the raw x.
        lora_up: [N, R] 16-bit.
        bias: [N] or None.
        group_size: activation (and float weight) group size along K.
        x_tail: [..., K2], the input's last K2 features when it arrives in two pieces (x then has K - K2).
        gelu_start, gelu_end: output columns passed through GELU (tanh approximation) in fp32,
            after the bias (an empty range: none).

    The low-rank branch is ``lora_act = (x @ lora_down^T)`` accumulated in fp32 and stored in x's
    dtype (as the fused kernel hands it from one kernel to the next), then ``lora_act @ lora_up^T``
    in fp32. The quantized part is an exact integer dot (fp64 here holds every int32 sum exactly),
    then ``acc * s_act * s_weight``. A token with NaN or Inf gives a non-finite output row.

    Example:
        >>> from svdq_compile.quantized_linear import QuantizedLinear
        >>> ql = QuantizedLinear.from_linear(torch.nn.Linear(128, 32))
        >>> ql(torch.randn(2, 5, 128)).shape
        torch.Size([2, 5, 32])
    """
    if x_tail is not None:
        x = torch.cat((x, x_tail), dim=-1)
    k = x.shape[-1]
    n = weight_q.shape[0]
    two_level = weight_scales.dim() == 1
    if weight_q.dtype == torch.uint8:
        weight_q = unpack_weight_operand(weight_q, k, group_size, two_level)
    x2 = x.reshape(-1, k)
    lora_act = (x2.float() @ lora_down.float().T).to(x.dtype)
    out = lora_act.float() @ lora_up.float().T
    xs = x2.float() * smooth_inv.float()
    a_q, a_scale = quantize_activations(xs, group_size, two_level, fp8=weight_q.dtype == torch.float8_e4m3fn)
    if two_level:
        acc = (a_q.double() @ weight_q.double().T).float()
        out += acc * a_scale.unsqueeze(1) * weight_scales.float().unsqueeze(0)
    else:
        w_g = weight_q.float().unflatten(-1, (-1, group_size))
        w_scale = weight_scales.float()
        for start in range(0, x2.shape[0], 256):  # bounds the [rows, N, groups] intermediate
            rows = slice(start, start + 256)
            a_g = a_q[rows].float().unflatten(-1, (-1, group_size))
            acc = torch.einsum("mgk,ngk->mng", a_g, w_g)  # per-group integer dots, exact in fp32
            out[rows] += (acc * a_scale[rows].unsqueeze(1) * w_scale.unsqueeze(0)).sum(-1)
    if bias is not None:
        out += bias.float()
    return apply_gelu_columns(out, gelu_start, gelu_end).to(x.dtype).reshape(*x.shape[:-1], n)
