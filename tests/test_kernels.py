"""The Triton kernels under Triton's CPU interpreter, against their PyTorch references.

Integer outputs (int8 activations, two-level row scales, group scales) must match exactly. Float
outputs may differ from the reference only by the order of fp32 additions (the kernels accumulate
in tiles) and, for 16-bit outputs, by the one rounding that follows: bounds below are derived from
that, not picked by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable

import pytest
import torch

# The interpreter is chosen when a kernel is decorated (and Triton checks the variable again at the
# first launch): set it, (re)import the kernel modules, restore it, and set it again only while this
# module's tests run (fixture below), so that the rest of the suite is unaffected.
_saved_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import svdq_compile.kernels.gemm_epilogue as ek  # noqa: E402
import svdq_compile.kernels.quantize_act_lowrank_down as qk  # noqa: E402
import svdq_compile.kernels.unpack_weight as uk  # noqa: E402
import svdq_compile.kernels.w4a4_gemm as gk  # noqa: E402
import svdq_compile.kernels.w4a4_gemv as gv  # noqa: E402

# In import order: a module reloaded after the ones it imports from takes their reloaded functions.
for _module, _kernel in ((ek, "grouped_tile"), (uk, "_unpack_weight_kernel"), (gv, "_w4a4_gemv_kernel"), (qk, "_quantize_kernel"), (gk, "_w4a4_gemm_kernel")):
    if not isinstance(getattr(_module, _kernel), InterpretedFunction):
        importlib.reload(_module)  # imported earlier without the interpreter
if _saved_interpret is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _saved_interpret

from svdq_compile import numerics  # noqa: E402
from kernel_checks import FORMAT_CASES, FP32_EPS, gelu_gemm_bound, gemm_bound, gemm_inputs, near_tie_rows, outlier_input, seed, ulp_bound  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


def test_kernels_run_under_the_interpreter():
    assert isinstance(qk._row_max_lowrank_kernel, InterpretedFunction)
    assert isinstance(qk._quantize_kernel, InterpretedFunction)
    assert isinstance(gk._w4a4_gemm_kernel, InterpretedFunction)
    assert isinstance(uk._unpack_weight_kernel, InterpretedFunction)


@pytest.mark.parametrize("n,k,group", [(37, 192, 64), (16, 512, 64), (5, 384, 128), (33, 96, 32)])
@pytest.mark.parametrize("two_level,fp8", **FORMAT_CASES)
def test_unpack_weight_matches_reference(n, k, group, two_level, fp8):
    """Every nibble value (-8..7) and multiplier (1..16, or 1..16 by powers of two) at odd N and K
    (not multiples of the tile; 3 groups per row: an odd count of int4_pow2 exponent nibbles)."""
    gen = torch.Generator().manual_seed(seed(n, k, group, two_level, fp8))
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    mult = torch.randint(1, 17, (n, k // group), generator=gen, dtype=torch.uint8)
    if fp8:
        mult = (1 << torch.randint(0, 5, mult.shape, generator=gen)).to(torch.uint8)
    operand = numerics.expand_2level(q, mult, group, fp8) if two_level else q
    packed = numerics.pack_weight_operand(operand, group, two_level)
    assert packed.shape[1] == numerics.packed_weight_columns(k, group, two_level, fp8)
    out = uk.unpack_weight(packed, k, group, two_level)
    assert out.dtype == operand.dtype and torch.equal(out.view(torch.uint8), uk.unpack_weight_reference(packed, k, group, two_level).view(torch.uint8))
    assert torch.equal(out.view(torch.uint8), operand.view(torch.uint8))


@pytest.mark.parametrize("rank", [0, 16, 48, 160])
@pytest.mark.parametrize("two_level,fp8", **FORMAT_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_quantize_act_lowrank_down_matches_reference(dtype, two_level, fp8, rank):
    gen = torch.Generator().manual_seed(seed(dtype, two_level, fp8, rank))
    m, k = 37, 64 * 3
    x = outlier_input(m, k, dtype, gen)
    smooth_inv = 0.25 + torch.rand(k, generator=gen)
    lora_down = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype)
    # Larger quantizer tiles than the GPU default keep the interpreter fast; the default runs below.
    act_q, scales, lora_act = qk.quantize_act_lowrank_down(x, smooth_inv, lora_down, 64, two_level, qk.QuantizeConfig(16, 128, 4, 2), fp8=fp8)
    ref_q, ref_scales, ref_lora = qk.quantize_act_lowrank_down_reference(x, smooth_inv, lora_down, 64, two_level, fp8=fp8)
    assert act_q.dtype == (torch.float8_e4m3fn if fp8 else torch.int8) and torch.equal(act_q.float(), ref_q.float())
    assert scales.dtype == torch.float32 and torch.equal(scales, ref_scales)
    assert lora_act.dtype == dtype and lora_act.shape == (m, rank)
    # The fp32 sum over K differs from the reference's only in order: at most K * eps * sum|x * down|
    # (first order); the cast to x's dtype then rounds once, which can move the result by one ulp of
    # that dtype when the two fp32 sums straddle a rounding boundary.
    abs_sum = x.float().abs() @ lora_down.float().abs().T
    bound = k * FP32_EPS * abs_sum + ulp_bound(ref_lora.float(), dtype)
    assert ((lora_act.float() - ref_lora.float()).abs() <= bound).all()


@pytest.mark.parametrize("two_level,fp8", **FORMAT_CASES)
def test_quantize_edge_rows(two_level, fp8):
    """Exact ties, a zero token, a token with NaN, one with Inf, a batch of one: same as the oracle."""
    gen = torch.Generator().manual_seed(7)
    k = 64 * 5
    x = outlier_input(19, k, torch.bfloat16, gen)
    # Row 0: group 0 has max 112 (s1 = 1, mult 16; int4 scale 16), group 1 max 7 (mult 1; scale 1):
    # its other entries land exactly on .5 after division, where rounding half to even matters.
    halves = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5])
    x[0] = 0
    x[0, 0], x[0, 1:9] = 112.0, 16 * halves
    x[0, 64], x[0, 65:73] = 7.0, halves
    x[2] = 0
    x[5, 100] = float("nan")
    x[11, 3] = float("inf")
    lora_down = (torch.randn(16, k, generator=gen) / 16).bfloat16()
    smooth_inv = torch.ones(k)
    act_q, scales, lora_act = qk.quantize_act_lowrank_down(x, smooth_inv, lora_down, 64, two_level, fp8=fp8)
    ref_q, ref_scales, _ = qk.quantize_act_lowrank_down_reference(x, smooth_inv, lora_down, 64, two_level, fp8=fp8)
    assert torch.equal(act_q.float(), ref_q.float())
    assert torch.equal(scales.isnan(), ref_scales.isnan()) and torch.equal(scales.nan_to_num(), ref_scales.nan_to_num())
    assert not torch.isfinite(lora_act[[5, 11]]).all(dim=1).any() and torch.isfinite(lora_act[2]).all()
    one_q, one_scales, _ = qk.quantize_act_lowrank_down(x[7:8], smooth_inv, lora_down, 64, two_level, fp8=fp8)
    assert torch.equal(one_q.float(), ref_q[7:8].float()) and torch.equal(one_scales, ref_scales[7:8])


@pytest.mark.parametrize("two_level", [True, False], ids=["2level", "groups"])
@pytest.mark.parametrize(
    "config",
    [qk.QuantizeConfig(16, 64, 4, 2, k_split=3), qk.QuantizeConfig(32, 128, 4, 2, k_split=2), qk.QuantizeConfig(16, 128, 4, 2, k_split=5)],
    ids=lambda c: f"m{c.block_m}k{c.block_k}s{c.k_split}",
)
def test_quantize_k_slices(config, two_level):
    """K sliced over programs (small M): slice-local quantization, whole-row max, ordered partial sums."""
    gen = torch.Generator().manual_seed(seed(config, two_level))
    m, k, rank = 21, 64 * 5, 24
    x = outlier_input(m, k, torch.float16, gen)
    smooth_inv = 0.25 + torch.rand(k, generator=gen)
    lora_down = (torch.randn(rank, k, generator=gen) / k**0.5).half()
    ref_q, ref_scales, ref_lora = qk.quantize_act_lowrank_down_reference(x, smooth_inv, lora_down, 64, two_level)
    for _ in range(2):  # a second launch gives the same result (no state left between launches)
        act_q, scales, lora_act = qk.quantize_act_lowrank_down(x, smooth_inv, lora_down, 64, two_level, config)
        assert torch.equal(act_q, ref_q) and torch.equal(scales, ref_scales)
        bound = k * FP32_EPS * (x.float().abs() @ lora_down.float().abs().T) + ulp_bound(ref_lora.float(), torch.float16)
        assert ((lora_act.float() - ref_lora.float()).abs() <= bound).all()


@pytest.mark.parametrize("two_level", [True, False], ids=["2level", "groups"])
@pytest.mark.parametrize(
    "head_k,config",
    [(256, qk.QuantizeConfig(8, 128, 4, 2)), (256, qk.QuantizeConfig(4, 128, 4, 2, k_split=3)), (192, qk.QuantizeConfig(8, 128, 4, 2))],
    ids=["in-place", "in-place-k-slices", "straddling-tile"],
)
def test_quantize_two_pieces_and_strided_rows(head_k, config, two_level):
    """x given as two strided pieces (FLUX's proj_out input: attention output, then a column slice
    of the MLP GEMM's output) quantizes exactly as their contiguous concatenation; a head whose
    width is not a multiple of the K tiles (192) is concatenated first, with the same result."""
    gen = torch.Generator().manual_seed(seed(head_k, config, two_level))
    m, tail_k, rank = 23, 64 * 3, 16
    head = outlier_input(m, head_k + 64, torch.bfloat16, gen)[:, 64:]  # row stride head_k + 64
    wide = outlier_input(m, 64 + tail_k, torch.bfloat16, gen)
    tail = wide[:, 64:]  # row stride 64 + tail_k, as a piece of a split GEMM output
    k = head_k + tail_k
    smooth_inv = 0.25 + torch.rand(k, generator=gen)
    lora_down = (torch.randn(rank, k, generator=gen) / k**0.5).bfloat16()
    whole = torch.cat((head, tail), dim=1)
    ref_q, ref_scales, ref_lora = qk.quantize_act_lowrank_down_reference(whole, smooth_inv, lora_down, 64, two_level)
    assert torch.equal(qk.quantize_act_lowrank_down_reference(head, smooth_inv, lora_down, 64, two_level, tail)[0], ref_q)
    act_q, scales, lora_act = qk.quantize_act_lowrank_down(head, smooth_inv, lora_down, 64, two_level, config, x_tail=tail)
    assert torch.equal(act_q, ref_q) and torch.equal(scales, ref_scales)
    bound = k * FP32_EPS * (whole.float().abs() @ lora_down.float().abs().T) + ulp_bound(ref_lora.float(), torch.bfloat16)
    assert ((lora_act.float() - ref_lora.float()).abs() <= bound).all()


def test_quantize_near_ties_and_random_quotients():
    """The kernel's quotient (reciprocal + one fma correction) rounds like torch's division."""
    gen = torch.Generator().manual_seed(11)
    m, k = 32, 64 * 12
    x = (torch.randn(m, k, generator=gen) * torch.exp(4 * torch.randn(m, 1, generator=gen))).float()
    smooth_inv = torch.exp(torch.randn(k, generator=gen))
    empty = torch.zeros(0, k)
    for two_level in (True, False):
        ties = near_tie_rows(8, k, two_level, gen)
        act_q, _, _ = qk.quantize_act_lowrank_down(ties, torch.ones(k), empty, 64, two_level, qk.QuantizeConfig(8, 256, 4, 2))
        ref_q, _, _ = qk.quantize_act_lowrank_down_reference(ties, torch.ones(k), empty, 64, two_level)
        assert torch.equal(act_q, ref_q)
    for two_level in (True, False):
        act_q, scales, _ = qk.quantize_act_lowrank_down(x, smooth_inv, empty, 64, two_level, qk.QuantizeConfig(32, 256, 4, 2))
        ref_q, ref_scales, _ = qk.quantize_act_lowrank_down_reference(x, smooth_inv, empty, 64, two_level)
        assert torch.equal(act_q, ref_q) and torch.equal(scales, ref_scales)


@pytest.mark.parametrize("two_level,fp8", **FORMAT_CASES)
def test_quantize_largest_quotients_round_into_range_without_a_clamp(two_level, fp8):
    """The kernel leaves out numerics' clamp to [-8, 7]: a group's largest quotients, a few ulp
    over 7 where a multiplier's rounding leaves the step a little short, still round to 7.

    Each row: group 0 holds the row max (its multiplier is 16, or ceil gives 17 and the clamp to
    16 applies), group j a max whose multiplier quotient lands within 2 ulp of j, and every group
    its max with both signs and values just under it."""
    gen = torch.Generator().manual_seed(5)
    rows, groups = 32, 17
    pool = torch.exp(torch.empty(4096).uniform_(-20, 20, generator=gen))
    over_16 = torch.ceil(pool / (pool / 112 * 7)) > 16  # numerics' multiplier quotient for the row max
    row_max = torch.cat((pool[over_16][: rows // 2], pool[~over_16][: rows - rows // 2]))
    s1 = row_max / 112
    ulps = torch.randint(-2, 3, (rows, groups), generator=gen).float()
    ratio = torch.arange(groups).float().clamp(min=1) * (1 + ulps * torch.finfo(torch.float32).eps)
    group_max = torch.where(torch.arange(groups) == 0, row_max[:, None], (s1 * 7)[:, None] * ratio).clamp(max=row_max[:, None])
    shrink = 1 - torch.randint(0, 4, (rows, groups, 64), generator=gen).float() * torch.finfo(torch.float32).eps
    sign = torch.where(torch.rand(rows, groups, 64, generator=gen) < 0.5, -1.0, 1.0)
    x = (group_max[:, :, None] * shrink * sign).reshape(rows, groups * 64)
    k = x.shape[1]
    act_q, scales, _ = qk.quantize_act_lowrank_down(x, torch.ones(k), torch.zeros(0, k), 64, two_level, qk.QuantizeConfig(8, 256, 4, 2), fp8=fp8)
    ref_q, ref_scales, _ = qk.quantize_act_lowrank_down_reference(x, torch.ones(k), torch.zeros(0, k), 64, two_level, fp8=fp8)
    assert torch.equal(act_q.float(), ref_q.float()) and torch.equal(scales, ref_scales)
    # The inputs reach the cases the clamp's absence relies on (else this test could not fail).
    if two_level:
        q, mult, oracle_s1 = numerics.quantize_int4_2level(x, 64, pow2=fp8)
        quotients = x.reshape(rows, groups, 64) / (oracle_s1[:, None, None] * mult[:, :, None].float())
        assert quotients.abs().max() > 7 and q.abs().max() == 7
        t = group_max[:, 0] / (oracle_s1 * 7)
        assert (torch.ceil(t) > 16).any()


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rank", [0, 16, 48, 160])
@pytest.mark.parametrize("two_level,fp8", **FORMAT_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_w4a4_gemm_matches_reference(dtype, two_level, fp8, rank, with_bias):
    """The interpreter sums fp8 products in fp32, exactly at these sizes (|sums| < 2^24), so the
    int8 bound holds for fp8 operands here; the GPU's fp8 accumulation has its own bound (GPU tests)."""
    gen = torch.Generator().manual_seed(seed(dtype, two_level, fp8, rank, with_bias))
    args = gemm_inputs(37, 72, 64 * 3, rank, dtype, two_level, gen, fp8, with_bias)
    out = gk.w4a4_gemm(*args, dtype)
    ref, bound = gemm_bound(args, dtype)
    assert out.dtype == dtype and out.shape == (37, 72)
    assert ((out.float() - ref).abs() <= bound).all()
    # The bound is far below the size of what is added: dropping the bias or the low-rank part fails.
    assert bound.max() < 1e-2 * ref.abs().max()


@pytest.mark.parametrize(
    "config",
    [gk.GemmConfig(16, 32, 128, 1, 4, 2), gk.GemmConfig(16, 32, 128, 2, 4, 2), gk.GemmConfig(32, 64, 64, 4, 4, 2),
     gk.GemmConfig(16, 16, 64, 8, 4, 2, group_m=2), gk.GemmConfig(64, 32, 128, 1, 4, 2, group_m=1),
     gk.GemmConfig(16, 32, 128, 1, 4, 2, group_m=2, persistent=True), gk.GemmConfig(32, 16, 64, 1, 4, 2, persistent=True),
     gk.GemmConfig(16, 32, 128, 1, 4, 2, persistent=True, split_tail=True), gk.GemmConfig(32, 32, 64, 1, 4, 2, group_m=2, persistent=True, split_tail=True)],
    ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.split_k}g{c.group_m}" + ("p" if c.persistent else "") + ("t" if c.split_tail else ""),
)
@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_w4a4_gemm_tile_configs(config, fp8):
    """Split-K (more splits than K tiles included), masked K tails, tile groups, odd M and N, the
    persistent kernel (more tiles than programs, so each program walks several; TMA zero-fill past
    M, N and K), and its split tail (9 or 6 tiles on the interpreter's 4 programs leave a last wave
    of 1 or 2 tiles, split 3 or 2 ways along K, the second with a masked K tail); int8 and fp8
    operands (fp32 split-K partial sums)."""
    gen = torch.Generator().manual_seed(config.block_m * 1000 + config.split_k)
    args = gemm_inputs(45, 83, 64 * 5, 32, torch.bfloat16, True, gen, fp8)
    if config.split_tail:
        tiles = -(-45 // config.block_m) * -(-83 // config.block_n)
        assert gk._tail_split(tiles, min(4, tiles), -(-320 // config.block_k))[1] > 1
    ref, bound = gemm_bound(args, torch.bfloat16)
    for _ in range(2):  # the second launch checks that split-K left its workspace clean
        out = gk.w4a4_gemm(*args, torch.bfloat16, config=config)
        assert ((out.float() - ref).abs() <= bound).all()


@pytest.mark.parametrize(
    "config", [gk.GemmConfig(16, 32, 128, 1, 4, 2), gk.GemmConfig(16, 32, 256, 2, 4, 2), gk.GemmConfig(32, 16, 64, 4, 4, 2, group_m=2)],
    ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.split_k}",
)
@pytest.mark.parametrize("m,n,k,group", [(1, 83, 64 * 5, 64), (45, 40, 32 * 12, 32), (7, 24, 128 * 3, 128), (3, 33, 256 * 2, 256)])
def test_w4a4_gemm_on_packed_weights(config, m, n, k, group):
    """A packed "int4_2level" weight, expanded tile by tile in the K loop, gives exactly what the
    same config gives on the 8-bit operand: every nibble -8..7 and multiplier 1..16, groups of 32 to
    256 (a 64-wide K tile grows to hold a whole group), masked K tails, split-K; the reference
    takes the packed weight too."""
    gen = torch.Generator().manual_seed(seed(config.block_k, config.split_k, m, group))
    act_q, act_scales, _, weight_scales, lora_act, lora_up, bias = gemm_inputs(m, n, k, 32, torch.bfloat16, True, gen)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    mult = torch.randint(1, 17, (n, k // group), generator=gen, dtype=torch.uint8)
    weight_q = numerics.expand_2level(q, mult, group)
    packed = numerics.pack_weight_operand(weight_q, group, True)
    args = (act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias)
    packed_args = (act_q, act_scales, packed, weight_scales, lora_act, lora_up, bias)
    for _ in range(2):  # the second launch checks that split-K left its workspace clean
        out = gk.w4a4_gemm(*packed_args, torch.bfloat16, config=config)
        assert torch.equal(out, gk.w4a4_gemm(*args, torch.bfloat16, config=config))
    ref, bound = gemm_bound(args, torch.bfloat16)
    assert ((out.float() - ref).abs() <= bound).all()
    assert torch.equal(gk.w4a4_gemm_reference(*packed_args, torch.bfloat16), gk.w4a4_gemm_reference(*args, torch.bfloat16))


def test_w4a4_gemm_refuses_packed_weights_it_cannot_take():
    """A uint8 weight that is not "int4_2level" rows (wrong width, float group scales) and configs
    of the kernels that read 8-bit tiles through TMA are refused with what to do; the tuner never
    offers those configs for a packed weight."""
    gen = torch.Generator().manual_seed(9)
    act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias = gemm_inputs(5, 24, 64 * 3, 16, torch.bfloat16, True, gen)
    packed = numerics.pack_weight_operand(weight_q, 64, True)
    with pytest.raises(ValueError, match="int4_2level.*unpack_weight"):
        gk.w4a4_gemm(act_q, act_scales, packed[:, :-1], weight_scales, lora_act, lora_up, bias, torch.bfloat16)
    groups = gemm_inputs(5, 24, 64 * 3, 16, torch.bfloat16, False, gen)
    with pytest.raises(ValueError, match="two-level scales"):
        gk.w4a4_gemm(groups[0], groups[1], numerics.pack_weight_operand(groups[2], 64, False), *groups[3:], torch.bfloat16)
    with pytest.raises(ValueError, match="plain kernel"):
        gk.w4a4_gemm(act_q, act_scales, packed, weight_scales, lora_act, lora_up, bias, torch.bfloat16,
                      config=gk.GemmConfig(16, 32, 128, 1, 4, 2, persistent=True))
    for m in (1, 64, 256, 4096):
        candidates = gk._candidate_configs(m, True, 0, packed_group=64, wgmma=True)
        assert candidates and not any(cfg.persistent or cfg.wgmma for cfg in candidates)


GEMV_CONFIGS = [gk.GemmConfig(4, 16, 256, 1, 4, 3, gemv=True), gk.GemmConfig(4, 8, 512, 1, 4, 3, gemv=True), gk.GemmConfig(4, 4, 128, 1, 4, 3, gemv=True)]


@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}")
@pytest.mark.parametrize("m,n,k,group", [(1, 83, 64 * 12, 64), (2, 40, 32 * 12, 32), (2, 19, 16 * 12, 16), (3, 33, 128 * 4, 128), (4, 21, 256 * 4, 256)])
@pytest.mark.parametrize("rank", [32, 80])
def test_w4a4_gemm_gemv_configs(config, m, n, k, group, rank):
    """The GEMV kernel (1 to 4 tokens in one program) within the reference's bound on the int8 and
    fp8 operands, at N not a multiple of its rows, masked K tails and ranks in one or two chunks; on
    packed weights (groups 32 to 256, every nibble and multiplier) exactly its output on the 8-bit
    operand; with GELU columns whose ends are not tile edges."""
    gen = torch.Generator().manual_seed(seed("gemv", config.block_k, m, group, rank))
    for fp8 in (False, True):
        args = gemm_inputs(m, n, k, rank, torch.bfloat16, True, gen, fp8)
        ref, bound = gemm_bound(args, torch.bfloat16)
        out = gk.w4a4_gemm(*args, torch.bfloat16, config=config)
        assert ((out.float() - ref).abs() <= bound).all()
    act_q, act_scales, _, weight_scales, lora_act, lora_up, bias = gemm_inputs(m, n, k, rank, torch.bfloat16, True, gen)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    mult = torch.randint(1, 17, (n, k // group), generator=gen, dtype=torch.uint8)
    weight_q = numerics.expand_2level(q, mult, group)
    args = (act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias)
    packed = numerics.pack_weight_operand(weight_q, group, True)
    out = gk.w4a4_gemm(*args, torch.bfloat16, config=config)
    assert torch.equal(gk.w4a4_gemm(args[0], args[1], packed, *args[3:], torch.bfloat16, config=config), out)
    ref, bound = gemm_bound(args, torch.bfloat16)
    assert ((out.float() - ref).abs() <= bound).all()
    pre, ref, bound = gelu_gemm_bound(args, torch.bfloat16, 5, n - 3)
    out = gk.w4a4_gemm(*args, torch.bfloat16, config=config, gelu_start=5, gelu_end=n - 3)
    assert ((out.float() - ref).abs() <= bound).all() and (ref[:, 5 : n - 3] - pre[:, 5 : n - 3]).abs().max() > 0.1


def test_gemv_refuses_packed_rows_that_are_not_whole_words():
    """The GEMV reads packed weights in 4-byte words: rows of K / 2 + K / G bytes with K / G not a
    multiple of 4, or operands that do not start on a word, get no GEMV candidate, and a forced
    GEMV config a message saying what to do instead of misaligned loads."""
    args = gemm_inputs(1, 24, 64 * 5, 16, torch.bfloat16, True, torch.Generator().manual_seed(5))
    packed = numerics.pack_weight_operand(args[2], 64, True)
    assert not gv.gemv_fits(args[0], packed, 64) and gv.gemv_fits(args[0], args[2], 0)
    assert not any(cfg.gemv for cfg in gk._candidate_configs(1, True, 0, packed_group=64, gemv_allowed=False))
    with pytest.raises(ValueError, match="4-byte words"):
        gk.w4a4_gemm(args[0], args[1], packed, *args[3:], torch.bfloat16, config=GEMV_CONFIGS[0])
    act_q = torch.zeros(1, 1 + 64 * 4, dtype=torch.int8)[:, 1:]  # a view one byte into its storage
    assert not gv.gemv_fits(act_q, torch.zeros(8, 132, dtype=torch.uint8), 64)
    assert gv.gemv_fits(act_q.clone(), torch.zeros(8, 132, dtype=torch.uint8), 64)


def test_gemv_configs_only_for_two_level_and_up_to_four_tokens():
    """The tuner offers GEMV configs for 1-4 tokens (each count range its own tuning bucket, so a
    pick for one token never serves 16), after the untimed default; forced elsewhere they are
    refused with a message."""
    for m in (1, 2, 3, 4):
        candidates = gk._candidate_configs(m, True, 0)
        assert any(cfg.gemv for cfg in candidates) and not candidates[0].gemv
        assert any(cfg.gemv for cfg in gk._candidate_configs(m, True, 0, packed_group=64))
        assert not any(cfg.gemv for cfg in gk._candidate_configs(m, False, 64))
    assert not any(cfg.gemv for m in (5, 16, 64, 4096) for cfg in gk._candidate_configs(m, True, 0))
    assert [gk._m_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 5000)] == [1, 2, 4, 4, 16, 16, 32, 4096]
    args = gemm_inputs(5, 24, 64 * 3, 16, torch.bfloat16, True, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="at most block_m = 4 tokens"):
        gk.w4a4_gemm(*args, torch.bfloat16, config=GEMV_CONFIGS[0])
    groups = gemm_inputs(2, 24, 64 * 3, 16, torch.bfloat16, False, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="two-level scales"):
        gk.w4a4_gemm(*groups, torch.bfloat16, config=GEMV_CONFIGS[0])


@pytest.mark.parametrize(
    "tiles,programs,k_tiles,expected",
    [(432, 132, 120, (396, 3)), (432, 132, 2, (396, 2)), (384, 132, 96, (384, 1)), (264, 132, 24, (264, 1)),
     (133, 132, 24, (132, 8)), (100, 100, 24, (100, 1))],
)
def test_tail_split_only_where_the_last_wave_is_at_most_half_full(tiles, programs, k_tiles, expected):
    assert gk._tail_split(tiles, programs, k_tiles) == expected


def test_wgmma_configs_only_where_the_gluon_kernel_runs():
    """The Gluon kernel is a candidate only when asked for (Hopper, 16-bit low-rank operands), never
    the untimed default; forced elsewhere, it is refused with a message instead of failing to compile."""
    for m in (1, 64, 256, 4096):
        assert not any(cfg.wgmma for cfg in gk._candidate_configs(m, True, 64))
    wgmma = [cfg for cfg in gk._candidate_configs(4096, True, 64, wgmma=True) if cfg.wgmma]
    assert wgmma and not gk._candidate_configs(4096, True, 64, wgmma=True)[0].wgmma
    assert not gk._wgmma_runs(torch.device("cpu"), torch.bfloat16)
    args = gemm_inputs(45, 83, 64 * 5, 32, torch.bfloat16, True, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="Hopper GPU"):
        gk.w4a4_gemm(*args, torch.bfloat16, config=wgmma[0])


def test_a_gluon_kernel_that_does_not_build_leaves_the_triton_kernels(monkeypatch):
    """Autotuning on a Hopper GPU whose Triton cannot build the Gluon kernel: one warning, a Triton
    config is chosen, and the other Gluon candidates are not tried. (No GPU here: the Gluon launch
    raises the compiler's error, and the timer runs each candidate once under the interpreter and
    ranks persistent tiles first.)"""
    def fake_bench(fn):
        fn()
        return 1.0 if launched[-1].persistent else 2.0

    def gluon_fails_to_build(*args):
        raise RuntimeError("PassManager::run failed")

    launched = []
    original_launch = gk._launch
    monkeypatch.setattr(gk, "_launch", lambda args, *rest: (launched.append(rest[-1]), original_launch(args, *rest))[1])
    monkeypatch.setattr(gk, "launch_wgmma", gluon_fails_to_build)
    monkeypatch.setattr(gk, "_gpu_ms", fake_bench)
    monkeypatch.setattr(gk, "_wgmma_runs", lambda device, lora_dtype: gk._wgmma_build_error is None)  # "a Hopper GPU"
    monkeypatch.setattr(gk, "_wgmma_build_error", None)
    args = gemm_inputs(300, 40, 64 * 2, 16, torch.bfloat16, True, torch.Generator().manual_seed(6))
    out = torch.empty(300, 40, dtype=torch.bfloat16)
    full_args = (*args[:6], args[6], out)
    with pytest.warns(UserWarning, match="Gluon .* did not build"):
        chosen = gk._tune(full_args, ("test",), 300, 40, 128, 16, 0, 0, True, (0, 0), torch.bfloat16)
    assert chosen.persistent and not chosen.wgmma
    assert [cfg.wgmma for cfg in launched].count(True) == 1  # the first Gluon candidate only
    assert "PassManager" in gk._wgmma_build_error


def test_the_tuner_ranks_close_configs_by_their_second_timings(monkeypatch):
    """A config whose first timing came at boost clocks (after an idle moment) is not picked over
    one that is faster under sustained load, configs far slower in the first pass or behind the
    four fastest are not timed again, and the second pass reads copies of the weight in turn. (No
    GPU here: the timer runs each launch under the interpreter and makes up its time.)"""
    candidates = gk._candidate_configs(300, True, 0)
    boosted, slow = candidates[3], candidates[-1]
    timed = []

    def fake_bench(fn):
        fn()
        cfg = launched[-1]
        ms = 2.0 if cfg == slow else 0.95 if cfg == boosted and cfg not in timed else 1.0 + 0.01 * candidates.index(cfg)
        timed.append(cfg)
        return ms

    launched, weights = [], []
    original_launch = gk._launch
    monkeypatch.setattr(gk, "_launch", lambda args, *rest: (launched.append(rest[-1]), weights.append(args[2]), original_launch(args, *rest))[2])
    monkeypatch.setattr(gk, "_gpu_ms", fake_bench)
    args = gemm_inputs(300, 40, 64 * 2, 16, torch.bfloat16, True, torch.Generator().manual_seed(8))
    monkeypatch.setattr(gk, "_l2_bytes", lambda device: args[2].nbytes * 3 // 2)  # twice that is three weights
    out = torch.empty(300, 40, dtype=torch.bfloat16)
    chosen = gk._tune((*args, out), ("test",), 300, 40, 128, 16, 0, 0, True, (0, 0), torch.bfloat16)
    assert chosen == candidates[0]
    assert timed.count(boosted) == 3 and timed.count(slow) == 1
    assert timed.count(candidates[4]) == 1  # close, but not among the four fastest first timings
    first_pass = len(candidates)
    assert all(w is args[2] for w in weights[:first_pass])
    second = weights[first_pass:]  # cycles through the weight and two copies of it
    assert len({w.data_ptr() for w in second}) == 3 and all(torch.equal(w, args[2]) for w in second)


def test_the_tuner_copies_no_weight_without_a_second_pass(monkeypatch):
    """One config far ahead of the rest in the first pass is picked as it is: nothing is timed
    again, and the weight copies the second pass reads are never made."""
    candidates = gk._candidate_configs(300, True, 0)
    launched = []
    original_launch = gk._launch
    monkeypatch.setattr(gk, "_launch", lambda args, *rest: (launched.append(rest[-1]), original_launch(args, *rest))[1])
    monkeypatch.setattr(gk, "_gpu_ms", lambda fn: (fn(), 1.0 if launched[-1] == candidates[2] else 2.0)[1])
    monkeypatch.setattr(gk, "_weight_copies", lambda *a: pytest.fail("weight copies made without a second pass"))
    args = gemm_inputs(300, 40, 64 * 2, 16, torch.bfloat16, True, torch.Generator().manual_seed(9))
    out = torch.empty(300, 40, dtype=torch.bfloat16)
    assert gk._tune((*args, out), ("test",), 300, 40, 128, 16, 0, 0, True, (0, 0), torch.bfloat16) == candidates[2]
    assert len(launched) == len(candidates)


def fake_timed_tuning(monkeypatch, key: tuple, seed: int) -> tuple[list, list, Callable[[], gk.GemmConfig]]:
    """The candidates of a 300 x 40 x 128 GEMM, the list of configs launched, and a function that
    empties that list and tunes ``key`` on the interpreter, under a timer that makes the third
    candidate the fastest."""
    candidates = gk._candidate_configs(300, True, 0)
    launched = []
    original_launch = gk._launch
    monkeypatch.setattr(gk, "_launch", lambda args, *rest: (launched.append(rest[-1]), original_launch(args, *rest))[1])
    monkeypatch.setattr(gk, "_gpu_ms", lambda fn: (fn(), 1.0 if launched[-1] == candidates[2] else 2.0)[1])
    args = gemm_inputs(300, 40, 64 * 2, 16, torch.bfloat16, True, torch.Generator().manual_seed(seed))
    out = torch.empty(300, 40, dtype=torch.bfloat16)

    def tune() -> gk.GemmConfig:
        launched.clear()
        return gk._tune((*args, out), key, 300, 40, 128, 16, 0, 0, True, (0, 0), torch.bfloat16)

    return candidates, launched, tune


def test_the_tuners_pick_is_stored_and_taken_by_the_next_process(tmp_path, monkeypatch):
    """With a tuning folder the pick goes to a file named for the device and the kernels' build. A
    later tuning of the same key (a new process: the in-memory picks gone) launches that pick alone,
    to check that it builds. Another build's file, a pick that is no longer a candidate and a file
    that is not JSON are tuned in full. (No GPU here: the interpreter runs the launches and the
    timer makes up their times.)"""
    candidates, launched, tune = fake_timed_tuning(monkeypatch, ("test", 300), seed=10)
    gk.use_tuning_cache(tmp_path)
    assert tune() == candidates[2] and len(launched) == len(candidates)
    [stored] = tmp_path.iterdir()
    assert stored.name.startswith("gemm_tuning-cpu-") and stored.suffix == ".json"
    assert tune() == candidates[2] and launched == [candidates[2]]
    with monkeypatch.context() as other_build:
        other_build.setattr(gk, "_build_tag", lambda device: "cpu-another-build")
        assert tune() == candidates[2] and len(launched) == len(candidates)
    picks = json.loads(stored.read_text())
    stored.write_text(json.dumps({name: pick | {"num_stages": 99} for name, pick in picks.items()}))  # not a candidate now
    assert tune() == candidates[2] and len(launched) == len(candidates)
    stored.write_text("{ half written")
    assert tune() == candidates[2] and len(launched) == len(candidates)
    assert tune() == candidates[2] and launched == [candidates[2]]  # the file was written again
    gk.use_tuning_cache(None)
    assert tune() == candidates[2] and len(launched) == len(candidates)


def test_picks_made_before_the_tuning_folder_is_set_reach_its_file(tmp_path, monkeypatch):
    """A pick tuned while no folder was set (a QuantizedLinear called eagerly before the backend's
    compile, as bench_e2e's layer errors do) is reused from memory, never tuned again, so setting
    the folder writes it to the file at once; the next process then launches it alone. A file that
    has every pick already is not written again. (No GPU here: "cuda" is faked where the folder is
    set, and the interpreter runs the launches under a made-up timer.)"""
    key = ("test", 302)
    candidates, launched, tune = fake_timed_tuning(monkeypatch, key, seed=12)
    monkeypatch.setattr(gk, "_build_tag", lambda device: "test-build")  # one file for the faked GPU and the CPU
    monkeypatch.setattr(gk, "_tuned", {})
    assert tune() == candidates[2] and len(launched) == len(candidates)
    assert list(tmp_path.iterdir()) == []
    with monkeypatch.context() as gpu:
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.cuda, "current_device", lambda: 0)
        gk.use_tuning_cache(tmp_path)
        [stored] = tmp_path.iterdir()
        assert stored.name == "gemm_tuning-test-build.json"
        assert json.loads(stored.read_text()) == {repr(key): dataclasses.asdict(candidates[2])}
        gpu.setattr(gk.os, "replace", lambda *a: pytest.fail("the file was written again with nothing new"))
        gk.use_tuning_cache(tmp_path)
    monkeypatch.setattr(gk, "_tuned", {})  # the next process
    assert tune() == candidates[2] and launched == [candidates[2]]


def test_a_stored_256_wide_pick_that_strays_is_tuned_again(tmp_path, monkeypatch):
    """A stored n256 pick is checked against the first candidate as in a full tuning: when its output
    strays in this process, it is dropped with the warning and the others are timed."""
    def gluon(args, m, n, k, rank, has_bias, gelu, acc_dtype, block_r, cfg):
        args[-1].copy_(expected * (1.5 if cfg.n256 else 1.0))

    launched = []
    original_launch = gk._launch
    monkeypatch.setattr(gk, "_launch", lambda args, *rest: (launched.append(rest[-1]), original_launch(args, *rest))[1])
    monkeypatch.setattr(gk, "launch_wgmma", gluon)
    monkeypatch.setattr(gk, "_gpu_ms", lambda fn: (fn(), 1.0 if launched[-1].persistent else 2.0)[1])
    monkeypatch.setattr(gk, "_wgmma_runs", lambda device, lora_dtype: True)  # "a Hopper GPU"
    monkeypatch.setattr(gk, "_n256_error", None)
    args = gemm_inputs(300, 40, 64 * 2, 16, torch.bfloat16, True, torch.Generator().manual_seed(11))
    expected = gk.w4a4_gemm(*args, torch.bfloat16, config=gk.GemmConfig(64, 32, 64, 1, 4, 2))
    out = torch.empty(300, 40, dtype=torch.bfloat16)
    candidates = gk._candidate_configs(300, True, 0, wgmma=True)
    n256 = next(cfg for cfg in candidates if cfg.n256)
    gk.use_tuning_cache(tmp_path)
    gk._store_picks(torch.device("cpu"), {("test", 301): n256})
    launched.clear()
    with pytest.warns(UserWarning, match="256-wide wgmma kernel gave other results"):
        chosen = gk._tune((*args, out), ("test", 301), 300, 40, 128, 16, 0, 0, True, (0, 0), torch.float32)
    assert launched[:2] == [candidates[0], n256]
    assert chosen.persistent and not chosen.n256 and len(launched) > 2


@pytest.mark.parametrize("n256_scale", [1.5, 1 + 2**-10], ids=["strays", "agrees"])
def test_a_256_wide_candidate_is_picked_only_if_it_reproduces_the_first(n256_scale, monkeypatch):
    """The 256-wide wgmma candidates (for int8 an instruction renamed in the PTX by
    kernels/int8_wgmma_256.py) must reproduce the first candidate's output on the real arguments:
    faster but 50% off, they are dropped for the process with a warning; off by one bf16 rounding,
    the faster one is chosen. (No GPU here: the Gluon launches write the plain kernel's output,
    scaled for the n256 ones, and the timer ranks n256 first, then persistent tiles; fp32 low-rank
    operands, as the interpreter needs.)"""
    def fake_bench(fn):
        fn()
        return 0.5 if launched[-1].n256 else 1.0 if launched[-1].persistent else 2.0

    def gluon(args, m, n, k, rank, has_bias, gelu, acc_dtype, block_r, cfg):
        args[-1].copy_(expected * (n256_scale if cfg.n256 else 1.0))

    launched = []
    original_launch = gk._launch
    monkeypatch.setattr(gk, "_launch", lambda args, *rest: (launched.append(rest[-1]), original_launch(args, *rest))[1])
    monkeypatch.setattr(gk, "launch_wgmma", gluon)
    monkeypatch.setattr(gk, "_gpu_ms", fake_bench)
    monkeypatch.setattr(gk, "_wgmma_runs", lambda device, lora_dtype: True)  # "a Hopper GPU"
    monkeypatch.setattr(gk, "_n256_error", None)
    args = gemm_inputs(300, 40, 64 * 2, 16, torch.bfloat16, True, torch.Generator().manual_seed(7))
    expected = gk.w4a4_gemm(*args, torch.bfloat16, config=gk.GemmConfig(64, 32, 64, 1, 4, 2))
    out = torch.empty(300, 40, dtype=torch.bfloat16)
    if n256_scale > 1.1:
        with pytest.warns(UserWarning, match="256-wide wgmma kernel gave other results"):
            chosen = gk._tune((*args, out), ("test",), 300, 40, 128, 16, 0, 0, True, (0, 0), torch.float32)
        assert chosen.persistent and not chosen.n256
        assert [cfg.n256 for cfg in launched].count(True) == 1  # the second n256 candidate is not tried
        assert "0.5" in gk._n256_error
    else:
        chosen = gk._tune((*args, out), ("test",), 300, 40, 128, 16, 0, 0, True, (0, 0), torch.float32)
        assert chosen.n256 and gk._n256_error is None


@pytest.mark.parametrize("gelu_columns", [(0, 83), (37, 60), (0, 16)], ids=str)
@pytest.mark.parametrize(
    "config",
    [gk.GemmConfig(16, 32, 128, 1, 4, 2), gk.GemmConfig(16, 32, 128, 2, 4, 2), gk.GemmConfig(32, 16, 64, 1, 4, 2, persistent=True),
     gk.GemmConfig(16, 32, 128, 1, 4, 2, persistent=True, split_tail=True)],
    ids=lambda c: f"m{c.block_m}n{c.block_n}s{c.split_k}" + ("p" if c.persistent else "") + ("t" if c.split_tail else ""),
)
def test_w4a4_gemm_gelu_epilogue(config, gelu_columns):
    """GELU (tanh) on all output columns, or on a range whose ends are not tile edges: the same as
    the reference (within ``gelu_gemm_bound``), and the columns outside the range untouched."""
    start, end = gelu_columns
    gen = torch.Generator().manual_seed(seed(config, gelu_columns))
    args = gemm_inputs(45, 83, 64 * 5, 32, torch.bfloat16, True, gen)
    pre, ref, bound = gelu_gemm_bound(args, torch.bfloat16, start, end)
    out = gk.w4a4_gemm(*args, torch.bfloat16, config=config, gelu_start=start, gelu_end=end)
    assert ((out.float() - ref).abs() <= bound).all()
    outside = torch.ones(83, dtype=torch.bool)
    outside[start:end] = False
    assert torch.equal(ref[:, outside], pre[:, outside]) and (ref[:, start:end] - pre[:, start:end]).abs().max() > 0.1


def test_kernels_compose_to_the_op_reference():
    """quantize kernel -> GEMM kernel equals numerics.w4a4_linear_reference.

    lora_act is rounded to bf16 in both, but the two fp32 sums before that rounding may differ, so
    lora_act may differ by one bf16 ulp: that moves the output by at most 2**-7 * |lora_act| @ |lora_up|.
    """
    gen = torch.Generator().manual_seed(3)
    m, n, k, rank = 29, 40, 64 * 3, 32
    for two_level, fp8 in FORMAT_CASES["argvalues"]:
        x = outlier_input(m, k, torch.bfloat16, gen)
        smooth_inv = 0.5 + torch.rand(k, generator=gen)
        weight = torch.randn(n, k, generator=gen) / k**0.5
        q, scales, mult = numerics.quantize_weight(weight, 64, two_level, torch.bfloat16, pow2=fp8)
        weight_q = numerics.expand_2level(q, mult, 64, fp8) if two_level else q
        lora_down = (torch.randn(rank, k, generator=gen) / k).bfloat16()
        lora_up = (torch.randn(n, rank, generator=gen) / 4).bfloat16()
        bias = torch.randn(n, generator=gen).bfloat16()
        act_q, act_scales, lora_act = qk.quantize_act_lowrank_down(x, smooth_inv, lora_down, 64, two_level, fp8=fp8)
        assert act_q.dtype == weight_q.dtype
        out = gk.w4a4_gemm(act_q, act_scales, weight_q, scales, lora_act, lora_up, bias, torch.bfloat16)
        ref = numerics.w4a4_linear_reference(x, weight_q, scales, smooth_inv, lora_down, lora_up, bias, 64)
        _, bound = gemm_bound((act_q, act_scales, weight_q, scales, lora_act, lora_up, bias), torch.bfloat16)
        bound += 2.0**-7 * (lora_act.float().abs() @ lora_up.float().abs().T)
        assert ((out.float() - ref.float()).abs() <= bound).all()


def test_rank_above_256_is_split_off():
    gen = torch.Generator().manual_seed(5)
    x = outlier_input(3, 64, torch.float32, gen)
    lora_down = torch.randn(264, 64, generator=gen)
    act_q, _, lora_act = qk.quantize_act_lowrank_down(x, torch.ones(64), lora_down, 64, True)
    ref_q, _, ref_lora = qk.quantize_act_lowrank_down_reference(x, torch.ones(64), lora_down, 64, True)
    assert torch.equal(act_q, ref_q) and lora_act.shape == (3, 264)
    assert ((lora_act - ref_lora).abs() <= 64 * FP32_EPS * (x.abs() @ lora_down.abs().T)).all()
    wide, down = outlier_input(3, 256, torch.float32, gen), torch.randn(264, 256, generator=gen)  # and from two pieces
    act_q, _, lora_act = qk.quantize_act_lowrank_down(wide[:, :128], torch.ones(256), down, 64, True, x_tail=wide[:, 128:])
    ref_q, _, ref_lora = qk.quantize_act_lowrank_down_reference(wide, torch.ones(256), down, 64, True)
    assert torch.equal(act_q, ref_q) and ((lora_act - ref_lora).abs() <= 2 * 256 * FP32_EPS * (wide.abs() @ down.abs().T)).all()


def test_bad_arguments_name_the_fix():
    x = torch.randn(4, 96)
    with pytest.raises(ValueError, match="group_size"):
        qk.quantize_act_lowrank_down(x, torch.ones(96), torch.zeros(0, 96), 48, True)
    with pytest.raises(ValueError, match="multiple of group_size"):
        qk.quantize_act_lowrank_down(x, torch.ones(96), torch.zeros(0, 96), 64, True)
    a = torch.zeros(4, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match="K = 128 but weight_q has K = 64"):
        gk.w4a4_gemm(a, torch.ones(4), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), torch.zeros(4, 0), torch.zeros(8, 0), None, torch.float32)
    with pytest.raises(ValueError, match="scales must be"):
        gk.w4a4_gemm(a, torch.ones(4, 3), torch.zeros(8, 128, dtype=torch.int8), torch.ones(8, 3), torch.zeros(4, 0), torch.zeros(8, 0), None, torch.float32)
    with pytest.raises(ValueError, match="GELU columns"):
        gk.w4a4_gemm(a, torch.ones(4), torch.zeros(8, 128, dtype=torch.int8), torch.ones(8), torch.zeros(4, 0), torch.zeros(8, 0), None, torch.float32,
                     gelu_start=4, gelu_end=9)
    with pytest.raises(ValueError, match="x_tail must be"):
        qk.quantize_act_lowrank_down(x[:, :64], torch.ones(96), torch.zeros(0, 96), 32, True, x_tail=x[:3, 64:])
    with pytest.raises(ValueError, match="needs two_level=True"):
        qk.quantize_act_lowrank_down(x, torch.ones(96), torch.zeros(0, 96), 32, False, fp8=True)
    a8 = a.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="both int8 or both float8_e4m3fn"):
        gk.w4a4_gemm(a8, torch.ones(4), torch.zeros(8, 128, dtype=torch.int8), torch.ones(8), torch.zeros(4, 0), torch.zeros(8, 0), None, torch.float32)
    with pytest.raises(ValueError, match="take two-level scales"):
        gk.w4a4_gemm(a8, torch.ones(4, 2), torch.zeros(8, 128, dtype=torch.float8_e4m3fn), torch.ones(8, 2), torch.zeros(4, 0), torch.zeros(8, 0), None, torch.float32)


def test_split_k_workspace_grows_without_freeing_what_graphs_captured():
    """A CUDA graph captured with a workspace keeps using its address: growing must not free it."""
    device = torch.device("cpu")
    saved = gk._workspaces.pop(device, None)
    try:
        ws, counts = gk._split_k_workspace(device, 100, 4)
        assert ws.numel() >= 100 and counts.numel() >= 4 and not counts.any()
        same = gk._split_k_workspace(device, 50, 2)
        assert same[0] is ws and same[1] is counts
        bigger_ws, bigger_counts = gk._split_k_workspace(device, 150, 9)
        assert bigger_ws.numel() >= 200 and bigger_counts.numel() >= 9 and not bigger_counts.any()
        assert any(t is ws for t in gk._outgrown) and any(t is counts for t in gk._outgrown)
    finally:
        gk._workspaces.pop(device, None)
        if saved is not None:
            gk._workspaces[device] = saved
