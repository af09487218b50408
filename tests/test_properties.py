"""Property tests of the W4A4 op: random shapes, dtypes, ranks and hostile values (issue 8)."""

import torch
from formula import w4a4_by_hand
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from svdq_compile import QuantizedLinear, SVDQuantConfig, numerics, w4a4_linear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@st.composite
def problems(draw):
    m = draw(st.integers(1, 5000))
    k = 64 * draw(st.integers(1, 4))
    n = 64 * draw(st.integers(1, 3))
    rank = draw(st.sampled_from([0, 1, 16, 48]))
    dtype = draw(st.sampled_from(DTYPES))
    fmt = draw(st.sampled_from(["int4", "int4_2level", "int4_pow2"]))
    seed = draw(st.integers(0, 2**31 - 1))
    outlier = draw(st.sampled_from([1.0, 30.0, 1e4]))
    return m, k, n, rank, dtype, fmt, seed, outlier


def _case(m, k, n, rank, dtype, fmt, seed, outlier):
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        linear.weight[:, torch.randint(k, (2,), generator=g)] *= 20
    layer = QuantizedLinear.from_linear(linear.to(dtype), SVDQuantConfig(format=fmt, rank=rank, alpha=0.0, beta=0.0))
    x = torch.randn(m, k, generator=g)
    x[:, torch.randint(k, (3,), generator=g)] *= outlier
    x[torch.randint(m, (max(1, m // 10),), generator=g)] = 0.0  # all-zero tokens
    x[0, 0] = -0.0
    x[-1, -1] = 1e-40  # subnormal in fp32 (0 once cast to a 16-bit type that cannot hold it)
    x = x.to(dtype)
    args = (layer.weight_operand(), layer.scales, layer.smooth_inv, layer.lora_down, layer.lora_up, layer.bias, layer.group_size)
    return x, args


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_op_matches_formula_on_random_problems(problem):
    x, args = _case(*problem)
    out = w4a4_linear(x, *args)
    expected = w4a4_by_hand(x, *args)
    assert out.shape == expected.shape and out.dtype == x.dtype
    # 1e4 outliers against 20x weight columns can exceed fp16's range: then there is no finite answer
    assume(torch.isfinite(expected).all())
    assert torch.isfinite(out).all()
    tol = TOL[x.dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * expected.abs().max().item() + 1e-6)
    zero_rows = (x == 0).all(-1)
    if zero_rows.any():  # an all-zero token gets exactly the bias (its low-rank branch is zero too)
        torch.testing.assert_close(out[zero_rows], args[5].expand(int(zero_rows.sum()), -1), rtol=0, atol=0)
    # the weight packed at 4 bits (packed_weights=True) is the same operand: the same output, exactly
    if numerics.packs(args[0], args[6]):
        packed = numerics.pack_weight_operand(args[0], args[6], args[1].dim() == 1)
        assert torch.equal(w4a4_linear(x, packed, *args[1:]), out)


@settings(max_examples=15, deadline=None)
@given(problems(), st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_non_finite_inputs_propagate_to_their_rows_only(problem, bad):
    x, args = _case(*problem)
    clean = w4a4_linear(x, *args)
    row = x.shape[0] // 2
    x[row, x.shape[1] // 3] = bad
    out = w4a4_linear(x, *args)
    assert not torch.isfinite(out[row]).all()
    others = torch.arange(x.shape[0]) != row
    torch.testing.assert_close(out[others], clean[others], rtol=0, atol=0)
