"""SVDQuant against naive W4A4 on a 3072x3072 layer with activation and weight outliers."""

import pytest
import torch

from svdq_compile import CalibrationStats, QuantizedLinear, SVDQuantConfig

K = N = 3072


@pytest.fixture(scope="module")
def outlier_layer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:12]] *= torch.linspace(30, 100, 12)  # activation outlier channels
    w = torch.randn(N, K, generator=g) / K**0.5
    w[:, torch.randperm(K, generator=g)[:16]] *= 10  # weight outlier input channels
    w[torch.rand(N, K, generator=g) < 0.001] *= 20  # scattered large weights
    linear = torch.nn.Linear(K, N)
    with torch.no_grad():
        linear.weight.copy_(w)
    calib, held_out = x[:256], x[256:]
    return linear, CalibrationStats(calib.abs().amax(0), calib[:64]), held_out


@pytest.mark.parametrize("fmt", ["int4", "int4_2level", "int4_pow2"])
def test_svdquant_beats_naive_and_smoothing_alone(outlier_layer, fmt):
    linear, stats, x = outlier_layer

    def error(rank, smooth):
        alpha = beta = 0.5 if smooth else 0.0
        layer = QuantizedLinear.from_linear(linear, SVDQuantConfig(format=fmt, rank=rank, alpha=alpha, beta=beta), stats)
        return layer.output_error(linear.weight, linear.bias, x)

    naive = error(0, smooth=False)
    smooth_only = error(0, smooth=True)
    by_rank = {r: error(r, smooth=True) for r in (8, 16, 32, 64)}
    print(f"\n{fmt}: relative output error on held-out tokens")
    print("| method | error |\n| --- | --- |")
    print(f"| naive W4A4 | {naive:.4f} |\n| smoothing only | {smooth_only:.4f} |")
    for r, e in by_rank.items():
        print(f"| SVDQuant rank {r} | {e:.4f} |")
    assert by_rank[32] * 3 <= naive
    assert by_rank[32] < smooth_only
    ranks = list(by_rank.values())
    assert all(a > b for a, b in zip(ranks, ranks[1:])), "error must fall as rank grows"


def test_smoothing_search_beats_no_smoothing_on_held_out_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(384, 512, generator=g)
    x[:, torch.randperm(512, generator=g)[:4]] *= 50
    linear = torch.nn.Linear(512, 256)
    stats = CalibrationStats(x[:256].abs().amax(0), x[:64])
    searched = QuantizedLinear.from_linear(linear, SVDQuantConfig(rank=16), stats)
    plain = QuantizedLinear.from_linear(linear, SVDQuantConfig(rank=16, alpha=0.0, beta=0.0))
    held_out = x[256:]
    assert (searched.alpha, searched.beta) != (0.0, 0.0)
    assert searched.output_error(linear.weight, linear.bias, held_out) < 0.7 * plain.output_error(linear.weight, linear.bias, held_out)


def test_refinement_never_worse_in_weight_error():
    torch.manual_seed(2)
    linear = torch.nn.Linear(256, 128)
    with torch.no_grad():
        linear.weight[:, :4] *= 30
    base = QuantizedLinear.from_linear(linear, SVDQuantConfig(rank=8))
    refined = QuantizedLinear.from_linear(linear, SVDQuantConfig(rank=8, refine_iters=3))
    err = lambda layer: (layer.dequantize() - linear.weight).norm().item()  # noqa: E731
    assert err(refined) <= err(base)
    assert not torch.equal(refined.lora_up, base.lora_up)  # refinement did change the branch
