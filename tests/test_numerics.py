"""Properties of the SVDQuant numerics: packing, the quantization grids, smoothing, low-rank split."""

import pytest
import torch

from svdq_compile import numerics as nm
from svdq_compile.config import SVDQuantConfig


def _outlier_rows(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:3]] *= 60.0
    return x


@pytest.mark.parametrize("shape", [(1, 2), (7, 64), (3, 5, 130)])
def test_pack_unpack_round_trip(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = nm.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == shape[-1] // 2
    assert torch.equal(nm.unpack_int4(packed), q)


def test_pack_covers_every_byte():
    # all 256 byte values decode to distinct nibble pairs and re-encode to themselves
    packed = torch.arange(256, dtype=torch.uint8).reshape(1, 256)
    assert torch.equal(nm.pack_int4(nm.unpack_int4(packed)), packed)


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError, match="even"):
        nm.pack_int4(torch.zeros(3, 5, dtype=torch.int8))


def test_int4_groups_grid_and_scale():
    x = _outlier_rows(9, 192, seed=1)
    q, scale = nm.quantize_int4_groups(x, 64)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(scale, x.unflatten(-1, (3, 64)).abs().amax(-1) / 7)
    # each value is within half a step of its grid point (no clamping happens at absmax / 7)
    deq = (q.float().unflatten(-1, (3, 64)) * scale.unsqueeze(-1)).flatten(-2)
    assert bool(((deq - x).abs() <= scale.repeat_interleave(64, -1) / 2 * (1 + 1e-6)).all())


def test_round_half_to_even():
    # values exactly between two grid points: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2 (scale 1)
    row = torch.tensor([7.0, 0.5, 1.5, 2.5, -2.5, -0.5] + [0.0] * 58)
    q, _ = nm.quantize_int4_groups(row.unsqueeze(0), 64)
    assert q[0, :6].tolist() == [7, 0, 2, 2, -2, 0]


def test_zero_groups_give_zero_without_nan():
    x = _outlier_rows(4, 128, seed=2)
    x[1] = 0.0  # a whole zero token
    x[2, 64:] = 0.0  # one zero group
    q, scale = nm.quantize_int4_groups(x, 64)
    assert scale[1].tolist() == [0.0, 0.0] and scale[2, 1].item() == 0.0
    assert not q[1].any() and not q[2, 64:].any()
    q2, mult, s1 = nm.quantize_int4_2level(x, 64)
    assert s1[1].item() == 0.0 and not q2[1].any() and not q2[2, 64:].any()
    assert torch.isfinite(s1).all() and torch.isfinite(scale).all()


def test_two_level_grid():
    x = _outlier_rows(11, 320, seed=3)
    q, mult, s1 = nm.quantize_int4_2level(x, 64)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert int(mult.min()) >= 1 and int(mult.max()) <= 16
    assert torch.equal(s1, x.abs().amax(-1) / 112)
    assert bool((mult.amax(-1) == 16).all())  # the row's largest group takes the top multiplier
    step = s1.unsqueeze(-1) * mult.float()
    deq = (q.float().unflatten(-1, (5, 64)) * step.unsqueeze(-1)).flatten(-2)
    assert bool(((deq - x).abs() <= step.repeat_interleave(64, -1) / 2 * (1 + 1e-5)).all())
    e = nm.expand_2level(q, mult, 64)
    assert e.dtype == torch.int8 and torch.equal(e.to(torch.int32), q.to(torch.int32) * mult.to(torch.int32).repeat_interleave(64, -1))


def test_pow2_multipliers_round_the_integer_ones_up_and_are_exact_in_fp8():
    x = _outlier_rows(11, 320, seed=5)
    q, mult, s1 = nm.quantize_int4_2level(x, 64)
    q2, mult2, s1_2 = nm.quantize_int4_2level(x, 64, pow2=True)
    assert torch.equal(s1, s1_2)
    m, m2 = mult.long(), mult2.long()
    assert bool(((m2 & (m2 - 1)) == 0).all()), "every multiplier is a power of two"
    assert bool(((m2 >= m) & (m2 < 2 * m)).all()), "the smallest power of two at or above the integer multiplier"
    assert bool((m2 != m).any()) and bool((m2 == m).any())  # these rows exercise both cases
    assert torch.equal(q2[(m2 == m).repeat_interleave(64, -1)], q[(m2 == m).repeat_interleave(64, -1)])
    step = (s1_2.unsqueeze(-1) * mult2.float()).repeat_interleave(64, -1)
    assert bool(((q2.float() * step - x).abs() <= step / 2 * (1 + 1e-5)).all())
    operand = nm.expand_2level(q2, mult2, 64)
    fp8 = nm.expand_2level(q2, mult2, 64, fp8=True)
    assert fp8.dtype == torch.float8_e4m3fn and torch.equal(fp8.float(), operand.float())
    a, scales = nm.quantize_activations(x, 64, two_level=True, fp8=True)
    assert torch.equal(a.float(), fp8.float()) and torch.equal(scales, s1_2)


def test_two_level_error_close_to_float_groups():
    # integer multipliers cost a little precision against float group scales, never a lot
    x = _outlier_rows(64, 1024, seed=4)
    q, s = nm.quantize_int4_groups(x, 64)
    err_float = (nm.dequantize_weight(q, s, None, 64) - x).norm() / x.norm()
    q2, m2, s1 = nm.quantize_int4_2level(x, 64)
    err_2l = (nm.dequantize_weight(q2, s1, m2, 64) - x).norm() / x.norm()
    assert err_float < err_2l < 1.5 * err_float


def test_smoothing_factors():
    w = torch.tensor([[1.0, -4.0], [0.5, 2.0]])
    act = torch.tensor([9.0, 1.0])
    lam = nm.smoothing_factors(act, w, alpha=0.5, beta=0.5)
    assert torch.allclose(lam, torch.tensor([3.0 / 1.0, 1.0 / 2.0]))
    assert torch.equal(nm.smoothing_factors(None, w, 0.0, 0.0), torch.ones(2))
    with pytest.raises(ValueError, match="calibrate"):
        nm.smoothing_factors(None, w, 0.5, 0.5)


def test_lowrank_svd_matches_exact_svd():
    g = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(200, 40, generator=g)).Q
    v = torch.linalg.qr(torch.randn(150, 40, generator=g)).Q
    w = (u * torch.logspace(2, -2, 40)) @ v.T
    up, down = nm.lowrank_svd(w, 8)
    exact = torch.linalg.svd(w.double())
    best = (exact.U[:, :8] * exact.S[:8]) @ exact.Vh[:8]
    assert torch.allclose((up @ down).double(), best, atol=1e-4 * best.abs().max().item())
    up2, down2 = nm.lowrank_svd(w, 8)
    assert torch.equal(up, up2) and torch.equal(down, down2)  # seeded: deterministic


def test_config_checks():
    with pytest.raises(ValueError, match="format"):
        SVDQuantConfig(format="int3")
    with pytest.raises(ValueError, match="both alpha and beta"):
        SVDQuantConfig(alpha=0.5)
    with pytest.raises(ValueError, match="valid options"):
        SVDQuantConfig.from_options({"rnak": 4})
    assert SVDQuantConfig.from_options({"skip": "proj_out"}).skip == ("proj_out",)
    with pytest.raises(ValueError, match="must be int8"):
        nm.pack_weight_operand(torch.zeros(2, 128, dtype=torch.float8_e4m3fn), 64, False)
    with pytest.raises(ValueError, match="K >= 2 \\* group_size"):  # one group: its width would be int4_2level's
        nm.pack_weight_operand(torch.zeros(2, 64, dtype=torch.float8_e4m3fn), 64, True)


def test_split_2level_inverts_expand_exactly():
    x = _outlier_rows(37, 256, seed=6)
    q, mult, _ = nm.quantize_int4_2level(x, 64)
    e = nm.expand_2level(q, mult, 64)
    q2, mult2 = nm.split_2level(e, 64)
    assert torch.equal(nm.expand_2level(q2, mult2, 64), e)
    assert int(q2.min()) >= -8 and int(q2.max()) <= 7 and bool((mult2 <= mult).all())
    with pytest.raises(ValueError, match="not q"):
        nm.split_2level(torch.full((1, 64), 127, dtype=torch.int8), 64)  # 127 is prime and > 7 * 16
