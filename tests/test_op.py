"""The svdq::w4a4_linear custom op: reference semantics, torch.compile, and bad input."""

import pytest
import torch

from svdq_compile import QuantizedLinear, SVDQuantConfig, numerics, w4a4_linear
from formula import w4a4_by_hand

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _layer(k=192, n=96, fmt="int4_2level", rank=16, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight[:, :3] *= 20
    return linear, QuantizedLinear.from_linear(linear, SVDQuantConfig(format=fmt, rank=rank, alpha=0.0, beta=0.0))


def _args(layer):
    bias = layer.bias if layer.bias.numel() else None
    return layer.weight_operand(), layer.scales, layer.smooth_inv, layer.lora_down, layer.lora_up, bias, layer.group_size


def _inputs(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 5] *= 40  # an outlier channel
    return x.to(dtype)


@pytest.mark.parametrize("fmt", ["int4", "int4_2level", "int4_pow2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_integer_arithmetic_by_hand(fmt, dtype):
    """The op equals an independent spelling of the formula (int64 dots, explicit groups)."""
    _, layer = _layer(fmt=fmt, dtype=dtype)
    x = _inputs((2, 7, 192), dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 7, 96)
    expected = w4a4_by_hand(x, *_args(layer))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("fmt", ["int4", "int4_2level", "int4_pow2"])
def test_op_tracks_float_layer(fmt):
    linear, layer = _layer(fmt=fmt)
    x = _inputs((33, 192), torch.float32)
    with torch.no_grad():
        ref = linear(x)
    rel = (layer(x) - ref).norm() / ref.norm()
    assert rel < 0.15


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_under_torch_compile_matches_eager(dtype):
    torch._dynamo.reset()
    _, layer = _layer(dtype=dtype)
    x = _inputs((3, 10, 192), dtype)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_rank_zero_and_no_bias():
    _, layer = _layer(rank=0, bias=False)
    x = _inputs((4, 192), torch.float32)
    assert layer.rank == 0 and torch.isfinite(layer(x)).all()


def test_non_contiguous_input_is_accepted():
    _, layer = _layer()
    x = _inputs((192, 12), torch.float32).T  # [12, 192], stride (1, 12)
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


def test_non_finite_tokens_poison_only_their_row():
    _, layer = _layer()
    x = _inputs((5, 192), torch.float32)
    clean = layer(x)
    x[1, 7] = float("nan")
    x[3, 100] = float("inf")
    out = layer(x)
    assert not torch.isfinite(out[1]).any() and not torch.isfinite(out[3]).all()
    torch.testing.assert_close(out[[0, 2, 4]], clean[[0, 2, 4]], rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x": a["x"].to(torch.int32)}, "bfloat16, float16 or float32"),
        (lambda a: {**a, "x": a["x"][..., :128]}, "features"),
        (lambda a: {**a, "group_size": 128}, "multiple of group_size"),
        (lambda a: {**a, "weight_q": a["weight_q"].float()}, "int8"),
        (lambda a: {**a, "smooth_inv": a["smooth_inv"][:10]}, "smooth_inv"),
        (lambda a: {**a, "lora_up": a["lora_up"][:, :3]}, "lora_up"),
        (lambda a: {**a, "bias": a["bias"][:5]}, "bias"),
        (lambda a: {**a, "weight_q": a["weight_q"][:, :96].view(torch.uint8)}, "packed weight_q"),
        (lambda a: {**a, "x": a["x"][..., :128], "x_tail": a["x"][..., :32]}, "features"),
        (lambda a: {**a, "x": a["x"][..., :128], "x_tail": a["x"][:2, 128:]}, "x_tail"),
        (lambda a: {**a, "gelu_start": 90, "gelu_end": 97}, "GELU columns"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, message):
    _, layer = _layer()
    w_q, w_s, s_inv, down, up, bias, gs = _args(layer)
    args = dict(x=_inputs((4, 192), torch.float32), weight_q=w_q, weight_scales=w_s, smooth_inv=s_inv,
                lora_down=down, lora_up=up, bias=bias, group_size=gs)
    with pytest.raises(ValueError, match=message):
        w4a4_linear(**change(args))


@pytest.mark.parametrize("gelu_columns", [(0, 0), (0, 96), (13, 50)])
def test_two_piece_input_and_gelu_columns(gelu_columns):
    """``x_tail`` is the same op as its concatenation with x, and the GELU columns the same as GELU
    (tanh) on those output columns afterwards: bit for bit in fp32, where both round once."""
    start, end = gelu_columns
    _, layer = _layer()
    x = _inputs((3, 5, 192), torch.float32)
    args = _args(layer)
    plain = w4a4_linear(x, *args)
    expected = plain.clone()
    expected[..., start:end] = torch.nn.functional.gelu(plain[..., start:end], approximate="tanh")
    wide = torch.cat((x[..., 64:], torch.zeros(3, 5, 7)), -1)[..., :128]  # a strided piece
    out = w4a4_linear(x[..., :64], *args, x_tail=wide, gelu_start=start, gelu_end=end)
    assert torch.equal(out, expected)
    assert start == end or not torch.equal(out, plain)


@pytest.mark.parametrize("fmt", ["int4", "int4_2level", "int4_pow2"])
def test_packed_weight_gives_the_8bit_operands_output_exactly(fmt):
    """The 4-bit packed form of the weight operand (numerics.pack_weight_operand) is the same op."""
    _, layer = _layer(fmt=fmt)
    w_q, *rest = _args(layer)
    packed = numerics.pack_weight_operand(w_q, layer.group_size, fmt != "int4")
    assert packed.dtype == torch.uint8 and packed.numel() < 0.52 * w_q.numel()
    x = _inputs((9, 192), torch.float32)
    assert torch.equal(w4a4_linear(x, packed, *rest), w4a4_linear(x, w_q, *rest))


def test_layer_with_k_not_multiple_of_group_is_refused():
    with pytest.raises(ValueError, match="multiple of group_size"):
        QuantizedLinear.from_linear(torch.nn.Linear(100, 64))
