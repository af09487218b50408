"""The Triton kernels on a CUDA GPU at FLUX shapes, against their PyTorch references (skipped without CUDA).

Same rules as tests/test_kernels.py: integer outputs exactly, float outputs within the bound that
reordered fp32 sums plus one final rounding allow. Output buffers are poisoned with NaN before every
launch (the caching allocator hands the poisoned block back), so an unwritten element fails: every
check is written ``~(error <= bound)``, which NaN fails, where ``error > bound`` would pass it.
"""

from __future__ import annotations


import pytest
import torch

from kernel_checks import FORMAT_CASES, FP32_EPS, MANTISSA_BITS, TANH_APPROX_ERROR, gelu_gemm_bound, gemm_bound, gemm_inputs, near_tie_rows, outlier_input, seed, ulp_bound

from svdq_compile import numerics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FLUX_M = [1, 77, 256, 4096, 4608]
FLUX_NK = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]


def _poison(*shapes_and_dtypes: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Leave NaN-filled blocks of these sizes in the caching allocator, then check one comes back."""
    for shape, dtype in shapes_and_dtypes:
        block = torch.empty(shape, dtype=dtype, device="cuda")
        block.view(torch.uint8).fill_(0xFF)  # NaN in every float format, -1 in int8
        del block
    shape, dtype = shapes_and_dtypes[-1]
    probe = torch.empty(shape, dtype=dtype, device="cuda")
    assert (probe.view(torch.uint8) == 0xFF).all(), "poisoning did not reach the allocator"
    del probe


@pytest.mark.parametrize("n,k", FLUX_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("m", FLUX_M)
@pytest.mark.parametrize("two_level,fp8", **FORMAT_CASES)
def test_w4a4_gemm_flux_shapes(two_level, fp8, m, n, k):
    from svdq_compile.kernels.w4a4_gemm import w4a4_gemm

    gen = torch.Generator(device="cuda").manual_seed(seed(two_level, fp8, m, n, k))
    args = gemm_inputs(m, n, k, 32, torch.bfloat16, two_level, gen, fp8)
    w4a4_gemm(*args, torch.bfloat16)  # tunes on the first call: poison the call after it
    _poison(((m, n), torch.bfloat16))
    out = w4a4_gemm(*args, torch.bfloat16)
    torch.cuda.synchronize()
    ref, bound = gemm_bound(args, torch.bfloat16)
    bad = ~((out.float() - ref).abs() <= bound)
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside the bound, first at {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("n,k", FLUX_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_w4a4_gemm_gemv_flux_shapes(fp8, m, n, k):
    """Every GEMV candidate (1-4 tokens in one program, CUDA cores) within the bound, every output
    written."""
    from svdq_compile.kernels import w4a4_gemm as gk

    gen = torch.Generator(device="cuda").manual_seed(seed("gemv", fp8, m, n, k))
    args = gemm_inputs(m, n, k, 32, torch.bfloat16, True, gen, fp8)
    ref, bound = gemm_bound(args, torch.bfloat16)
    for cfg in [cfg for cfg in gk._candidate_configs(m, True, 0) if cfg.gemv]:
        gk.w4a4_gemm(*args, torch.bfloat16, config=cfg)  # compiles first: poison the call after it
        _poison(((m, n), torch.bfloat16))
        bad = ~((gk.w4a4_gemm(*args, torch.bfloat16, config=cfg).float() - ref).abs() <= bound)
        assert not bad.any(), f"{cfg}: {int(bad.sum())} of {bad.numel()} outside the bound"


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("gelu", [(0, 0), (1000, 2900)], ids=["plain", "gelu"])
@pytest.mark.parametrize("m,n,k,split_k", [(4608, 3072, 15360, 1), (4608, 3072, 3072, 1), (512, 3072, 12288, 2), (512, 3072, 3072, 4)])
def test_w4a4_gemm_split_tail_and_split_k(m, n, k, split_k, gelu, fp8):
    """The FLUX shapes these configs exist for, forced: 4608 rows leave a last wave of 36 tiles
    on 132 SMs (persistent launch + tail split along K), 512 rows give 96 tiles (split-K)."""
    from svdq_compile.kernels import w4a4_gemm as gk

    cfg = gk.GemmConfig(256, 128, 128, split_k, 8, 3 if split_k == 1 else 4, persistent=split_k == 1, split_tail=split_k == 1)
    if split_k == 1:
        tiles = -(-m // 256) * -(-n // 128)
        assert gk._tail_split(tiles, min(gk.sm_count(torch.device("cuda")), tiles), k // 128)[1] > 1
    gen = torch.Generator(device="cuda").manual_seed(seed("tail", m, n, k))
    args = gemm_inputs(m, n, k, 32, torch.bfloat16, True, gen, fp8)
    _, ref, bound = gelu_gemm_bound(args, torch.bfloat16, *gelu)
    for _ in range(2):  # the second launch checks that the first left the workspace clean
        _poison(((m, n), torch.bfloat16))
        out = gk.w4a4_gemm(*args, torch.bfloat16, config=cfg, gelu_start=gelu[0], gelu_end=gelu[1])
        bad = ~((out.float() - ref).abs() <= bound)
        assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside the bound, first at {bad.nonzero()[0].tolist()}"


def _wgmma_configs():
    from svdq_compile.kernels import w4a4_gemm as gk

    return [cfg for cfg in gk._candidate_configs(4096, True, 64, wgmma=True) if cfg.wgmma]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="wgmma needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("cfg", _wgmma_configs(), ids=lambda c: f"{c.block_m}x{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}"
                         + ("p" if c.persistent else "") + ("n256" if c.n256 else ""))
@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("m,n,k,rank,dtype,out_dtype,gelu", [
    (4608, 3072, 15360, 32, torch.bfloat16, torch.bfloat16, (0, 0)),
    (4096, 12288, 3072, 32, torch.bfloat16, torch.bfloat16, (1000, 12000)),  # GELU range off the tile edges
    (1000, 1000, 3136, 0, torch.bfloat16, torch.bfloat16, (0, 0)),  # odd M, N; K not a multiple of the K tile; no low-rank
    (333, 2000, 1024, 160, torch.float16, torch.float16, (0, 2000)),  # three rank chunks, the last partial
    (777, 1500, 2048, 32, torch.bfloat16, torch.float32, (0, 700)),  # fp32 output, stored from the accumulator layout
], ids=str)
def test_w4a4_gemm_wgmma(m, n, k, rank, dtype, out_dtype, gelu, fp8, cfg):
    """The Gluon kernel (one wgmma in flight), forced, against the reference (its GELU's tanh is
    tanh.approx); n256 configs with int8 run the s8 wgmma renamed in the PTX (kernels/int8_wgmma_256.py)."""
    from svdq_compile.kernels import w4a4_gemm as gk

    gen = torch.Generator(device="cuda").manual_seed(seed("wgmma", m, n, k, rank, fp8))
    args = gemm_inputs(m, n, k, rank, dtype, True, gen, fp8)
    _, ref, bound = gelu_gemm_bound(args, out_dtype, *gelu, tanh_approx=True)
    _poison(((m, n), out_dtype))
    out = gk.w4a4_gemm(*args, out_dtype, config=cfg, gelu_start=gelu[0], gelu_end=gelu[1])
    bad = ~((out.float() - ref).abs() <= bound)
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside the bound, first at {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("k", sorted({k for _, k in FLUX_NK}))
@pytest.mark.parametrize("m", FLUX_M)
@pytest.mark.parametrize("two_level,fp8", **FORMAT_CASES)
def test_quantize_act_lowrank_down_flux_shapes(two_level, fp8, m, k):
    from svdq_compile.kernels.quantize_act_lowrank_down import quantize_act_lowrank_down, quantize_act_lowrank_down_reference

    gen = torch.Generator(device="cuda").manual_seed(seed("q", two_level, fp8, m, k))
    x = outlier_input(m, k, torch.bfloat16, gen)
    x[0, 5] = float("nan") if m > 1 else x[0, 5]
    smooth_inv = 0.25 + torch.rand(k, generator=gen, device="cuda")
    lora_down = (torch.randn(32, k, generator=gen, device="cuda") / k**0.5).bfloat16()
    scale_shape = (m,) if two_level else (m, k // 64)
    _poison(((m, 32), torch.bfloat16), (scale_shape, torch.float32), ((m, k), torch.int8))  # probe: act_q
    act_q, scales, lora_act = quantize_act_lowrank_down(x, smooth_inv, lora_down, 64, two_level, fp8=fp8)
    # The reference runs on the CPU: PyTorch on CUDA divides by a Python scalar (the 112 and 7 of
    # the scales) as a multiplication by its rounded reciprocal, which is not the division the
    # oracle specifies (and the CPU computes).
    ref_q, ref_scales, ref_lora = (t.cuda() for t in quantize_act_lowrank_down_reference(x.cpu(), smooth_inv.cpu(), lora_down.cpu(), 64, two_level, fp8=fp8))
    assert act_q.dtype == ref_q.dtype and torch.equal(act_q.float(), ref_q.float())
    assert torch.equal(scales.isnan(), ref_scales.isnan()) and torch.equal(scales.nan_to_num(), ref_scales.nan_to_num())
    finite = torch.isfinite(ref_lora.float()).all(dim=1)
    bound = k * FP32_EPS * (x.float().abs() @ lora_down.float().abs().T) + ulp_bound(ref_lora.float(), torch.bfloat16)
    assert ((lora_act.float() - ref_lora.float()).abs() <= bound)[finite].all()
    assert torch.equal(torch.isfinite(lora_act).all(dim=1), finite)


@pytest.mark.parametrize("two_level", [True, False], ids=["2level", "groups"])
def test_quantize_near_ties(two_level):
    """Quotients on and next to .5: the compiled reciprocal + fma correction rounds like division."""
    from svdq_compile.kernels.quantize_act_lowrank_down import quantize_act_lowrank_down, quantize_act_lowrank_down_reference

    x = near_tie_rows(64, 64 * 48, two_level, torch.Generator().manual_seed(seed("ties", two_level))).cuda()
    empty = torch.zeros(0, x.shape[1], device="cuda")
    act_q, _, _ = quantize_act_lowrank_down(x, torch.ones(x.shape[1], device="cuda"), empty, 64, two_level)
    ref_q, _, _ = quantize_act_lowrank_down_reference(x.cpu(), torch.ones(x.shape[1]), empty.cpu(), 64, two_level)  # CPU: see above
    assert torch.equal(act_q.cpu(), ref_q)


@pytest.mark.parametrize("rank", [16, 48, 64, 128, 160, 256, 272])
@pytest.mark.parametrize("m", [256, 4096])
def test_quantize_ranks(m, rank):
    """The low-rank down projection at every rank chunking (LoRAs appended to the SVD branch)."""
    from svdq_compile.kernels.quantize_act_lowrank_down import quantize_act_lowrank_down, quantize_act_lowrank_down_reference

    gen = torch.Generator(device="cuda").manual_seed(seed("qrank", m, rank))
    x = outlier_input(m, 3072, torch.bfloat16, gen)
    lora_down = (torch.randn(rank, 3072, generator=gen, device="cuda") / 3072**0.5).bfloat16()
    smooth_inv = torch.ones(3072, device="cuda")
    act_q, _, lora_act = quantize_act_lowrank_down(x, smooth_inv, lora_down, 64, True)
    ref_q, _, ref_lora = (t.cuda() for t in quantize_act_lowrank_down_reference(x.cpu(), smooth_inv.cpu(), lora_down.cpu(), 64, True))
    assert torch.equal(act_q, ref_q), f"{int((act_q != ref_q).sum())} of {act_q.numel()} int8 values differ"
    bound = 3072 * FP32_EPS * (x.float().abs() @ lora_down.float().abs().T) + ulp_bound(ref_lora.float(), torch.bfloat16)
    err = (lora_act.float() - ref_lora.float()).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} low-rank sums outside the bound (worst error/bound "
                           f"{(err / bound).max().item():.3g}, relative error {(err.norm() / ref_lora.float().norm()).item():.3g}), "
                           f"rows {bad.any(1).nonzero().flatten()[:8].tolist()}, columns {bad.any(0).nonzero().flatten()[:8].tolist()}")


@pytest.mark.parametrize("rank", [16, 48, 128, 256, 272])
def test_ranks(rank):
    from svdq_compile.kernels.w4a4_gemm import w4a4_gemm

    gen = torch.Generator(device="cuda").manual_seed(seed("rank", rank))
    args = gemm_inputs(333, 3072, 3072, rank, torch.bfloat16, True, gen)
    out = w4a4_gemm(*args, torch.bfloat16)
    ref, bound = gemm_bound(args, torch.bfloat16)
    assert ((out.float() - ref).abs() <= bound).all()


def _op_args(m_shape, n, k, rank, dtype, two_level, gen, fp8=False):
    x = outlier_input(int(torch.tensor(m_shape).prod()), k, dtype, gen).reshape(*m_shape, k)
    smooth_inv = 0.5 + torch.rand(k, generator=gen, device="cuda")
    weight = torch.randn(n, k, generator=gen, device="cuda") / k**0.5
    q, scales, mult = numerics.quantize_weight(weight, 64, two_level, dtype, pow2=fp8)
    weight_q = numerics.expand_2level(q, mult, 64, fp8) if two_level else q
    lora_down = (torch.randn(rank, k, generator=gen, device="cuda") / k).to(dtype)
    lora_up = (torch.randn(n, rank, generator=gen, device="cuda") / 4).to(dtype)
    bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
    return x, weight_q, scales, smooth_inv, lora_down, lora_up, bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("two_level,fp8", **FORMAT_CASES)
@pytest.mark.parametrize("m_shape,n,k", [((2, 77), 3072, 3072), ((1, 333), 3072, 15360), ((3,), 21504, 3072)], ids=str)
def test_custom_op_on_cuda_matches_reference(m_shape, n, k, two_level, fp8, dtype):
    """torch.ops.svdq.w4a4_linear on CUDA (both kernels) vs numerics.w4a4_linear_reference.

    lora_act is rounded to x's dtype in both, from fp32 sums that may differ in order, so it may
    differ by one ulp: that moves the output by at most ulp * |lora_act| @ |lora_up|^T.
    """
    from svdq_compile.kernels.quantize_act_lowrank_down import quantize_act_lowrank_down

    gen = torch.Generator(device="cuda").manual_seed(seed("op", m_shape, n, k, two_level, fp8, dtype))
    x, weight_q, scales, smooth_inv, lora_down, lora_up, bias = _op_args(m_shape, n, k, 32, dtype, two_level, gen, fp8)
    out = torch.ops.svdq.w4a4_linear(x, weight_q, scales, smooth_inv, lora_down, lora_up, bias, 64)
    cpu = [t.cpu() for t in (x, weight_q, scales, smooth_inv, lora_down, lora_up, bias)]
    ref = numerics.w4a4_linear_reference(*cpu, 64).cuda()  # on the CPU: see test_quantize_act_lowrank_down_flux_shapes
    assert out.shape == ref.shape and out.dtype == dtype
    act_q, act_scales, lora_act = quantize_act_lowrank_down(x.reshape(-1, k), smooth_inv, lora_down, 64, two_level, fp8=fp8)
    _, bound = gemm_bound((act_q, act_scales, weight_q, scales, lora_act, lora_up, bias), dtype)
    bound += 2.0 ** -MANTISSA_BITS[dtype] * (lora_act.float().abs() @ lora_up.float().abs().T)
    assert ((out.float() - ref.float()).reshape(-1, n).abs() <= bound).all()
    if x.dim() == 3:  # a non-contiguous input is copied first: the same numbers come out
        strided = torch.ops.svdq.w4a4_linear(x.transpose(0, 1), weight_q, scales, smooth_inv, lora_down, lora_up, bias, 64)
        assert torch.equal(strided, out.transpose(0, 1))
    if numerics.packs(weight_q, 64):  # 4-bit weights in memory: same output
        packed = numerics.pack_weight_operand(weight_q, 64, two_level)
        assert torch.equal(torch.ops.svdq.w4a4_linear(x, packed, scales, smooth_inv, lora_down, lora_up, bias, 64), out)


@pytest.mark.parametrize("two_level", [True, False], ids=["2level", "groups"])
@pytest.mark.parametrize("m", [77, 4608])
def test_custom_op_two_pieces_and_gelu_on_cuda(m, two_level):
    """FLUX single blocks after the cat and GELU passes: proj_out reads the attention output and a
    column slice of the fused q/k/v/MLP output in place, and that GEMM applied GELU to its MLP
    columns (here a range with ends off the tile edges). Same result as the contiguous
    concatenation and GELU afterwards (fp32 output), except that the low-rank partial sums are
    sliced per piece, so they add up in another order."""
    from svdq_compile.kernels.quantize_act_lowrank_down import quantize_act_lowrank_down

    gen = torch.Generator(device="cuda").manual_seed(seed("pieces", m, two_level))
    n, k = 3072, 15360
    x, weight_q, scales, smooth_inv, lora_down, lora_up, bias = _op_args((m,), n, k, 32, torch.float32, two_level, gen)
    fused_output = torch.cat((torch.randn(m, 9216, device="cuda"), x[:, 3072:]), 1)  # [M, 21504]
    head, tail = x[:, :3072].clone(), fused_output[:, 9216:]
    assert tail.stride() == (21504, 1)
    whole_q, whole_scales, whole_lora = quantize_act_lowrank_down(x, smooth_inv, lora_down, 64, two_level)
    act_q, act_scales, lora_act = quantize_act_lowrank_down(head, smooth_inv, lora_down, 64, two_level, x_tail=tail)
    assert torch.equal(act_q, whole_q) and torch.equal(act_scales, whole_scales)
    lora_bound = 2 * k * FP32_EPS * (x.abs() @ lora_down.abs().T)  # both orders against the exact sum
    assert ((lora_act - whole_lora).abs() <= lora_bound).all()
    args = (weight_q, scales, smooth_inv, lora_down, lora_up, bias, 64)
    plain = torch.ops.svdq.w4a4_linear(x, *args)
    pieces = torch.ops.svdq.w4a4_linear(head, *args, tail)
    # the low-rank difference through lora_up, plus the epilogue's roundings of the rank-32 dot
    # and of the sum, which differ with its inputs
    bound = lora_bound @ lora_up.abs().T + 36 * FP32_EPS * (whole_lora.abs() @ lora_up.abs().T + plain.abs())
    assert ((pieces - plain).abs() <= bound).all()
    gelu_out = torch.ops.svdq.w4a4_linear(head, *args, tail, 1000, 2900)
    expected = pieces.clone()
    expected[:, 1000:2900] = torch.nn.functional.gelu(pieces[:, 1000:2900], approximate="tanh")
    # the kernels' tanh and torch's differ by a few fp32 roundings of |v|, the Gluon kernels'
    # tanh.approx by up to TANH_APPROX_ERROR of it (the tuner may pick either kind)
    assert ((gelu_out - expected).abs() <= (16 * FP32_EPS + 0.5 * TANH_APPROX_ERROR) * pieces.abs() + 1e-30).all()
    assert torch.equal(gelu_out[:, :1000], pieces[:, :1000]) and torch.equal(gelu_out[:, 2900:], pieces[:, 2900:])


@pytest.mark.parametrize("n,k", FLUX_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 3, 64])
def test_w4a4_gemm_packed_weights_flux_shapes(m, n, k):
    """The GEMM on a packed "int4_2level" weight (expanded in its K loop) gives exactly what every
    candidate config gives on the 8-bit operand, at FLUX's shapes and the op's M range."""
    from svdq_compile.kernels import w4a4_gemm as gk

    gen = torch.Generator(device="cuda").manual_seed(seed("packed gemm", m, n, k))
    args = gemm_inputs(m, n, k, 32, torch.bfloat16, True, gen)
    packed = numerics.pack_weight_operand(args[2], 64, True)
    for cfg in gk._candidate_configs(m, True, 0, packed_group=64):
        out = gk.w4a4_gemm(args[0], args[1], packed, *args[3:], torch.bfloat16, config=cfg)
        assert torch.equal(out, gk.w4a4_gemm(*args, torch.bfloat16, config=cfg)), cfg


@pytest.mark.parametrize("n,k", FLUX_NK, ids=lambda v: str(v))
@pytest.mark.parametrize("two_level,fp8", **FORMAT_CASES)
def test_unpack_weight_flux_shapes(two_level, fp8, n, k):
    from svdq_compile.kernels.unpack_weight import unpack_weight

    gen = torch.Generator(device="cuda").manual_seed(seed(two_level, fp8, n, k))
    q = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    mult = torch.randint(1, 17, (n, k // 64), generator=gen, device="cuda", dtype=torch.uint8)
    if fp8:
        mult = (1 << torch.randint(0, 5, mult.shape, generator=gen, device="cuda")).to(torch.uint8)
    operand = numerics.expand_2level(q, mult, 64, fp8) if two_level else q
    packed = numerics.pack_weight_operand(operand, 64, two_level)
    _poison(((n, k), operand.dtype))
    assert torch.equal(unpack_weight(packed, k, 64, two_level).view(torch.uint8), operand.view(torch.uint8))
