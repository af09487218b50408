"""Odd but real use of the backend: several models and configs in one process, grad, odd shapes."""

import pytest
import torch
from torch import nn

from svdq_compile import QuantizedLinear, SVDQuantConfig
from svdq_compile import backend as svdq_backend
from svdq_compile import quantized_weights


def _mlp(seed: int, k: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    with torch.no_grad():
        model[0].weight[:, :2] *= 25  # weight outliers
    return model


def _reference(model: nn.Module, options: dict, x: torch.Tensor) -> torch.Tensor:
    """The same model with every eligible linear swapped for QuantizedLinear, run eagerly."""
    config = SVDQuantConfig(**{k: v for k, v in options.items() if k != "cache_dir"}, cache_dir="")
    layers = [QuantizedLinear.from_linear(m, config) if isinstance(m, nn.Linear) and m.in_features % 64 == 0 else m for m in model]
    with torch.no_grad():
        return nn.Sequential(*layers)(x)


def _x(k: int = 128) -> torch.Tensor:
    x = torch.randn(2, 9, k, generator=torch.Generator().manual_seed(3))
    x[..., 7] *= 40
    return x


def test_two_models_in_one_process_keep_their_own_weights():
    torch._dynamo.reset()
    a, b = _mlp(0), _mlp(1)
    options = {"rank": 8, "cache_dir": "", "free_weights": False}
    x = _x()
    ref_a, ref_b = _reference(a, options, x), _reference(b, options, x)
    ca = torch.compile(a, backend="svdquant", options=options)
    cb = torch.compile(b, backend="svdquant", options=options)
    with torch.no_grad():
        out_a, out_b, out_a_again = ca(x), cb(x), ca(x)
    torch.testing.assert_close(out_a, ref_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_b, ref_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_a_again, out_a, rtol=0, atol=0)
    assert (out_a - out_b).abs().max() > 0.1


def test_one_model_compiled_with_two_configs_gets_both():
    torch._dynamo.reset()
    model = _mlp(2)
    x = _x()
    low, high = {"rank": 0, "cache_dir": "", "free_weights": False}, {"rank": 32, "cache_dir": "", "free_weights": False}
    c_low = torch.compile(model, backend="svdquant", options=low)
    c_high = torch.compile(model, backend="svdquant", options=high)
    with torch.no_grad():
        out_low, out_high = c_low(x), c_high(x)
    torch.testing.assert_close(out_low, _reference(model, low, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_high, _reference(model, high, x), rtol=1e-5, atol=1e-5)
    assert len(quantized_weights.quantized_entries(model[0].weight)) == 2


def test_grad_enabled_keeps_16bit_layers_with_correct_gradients():
    """Documented behaviour: with gradients on, svdquant leaves linears in 16-bit (logged), so
    training through the compiled model gives the float model's gradients, never wrong ones."""
    torch._dynamo.reset()
    model = _mlp(4).train()
    x = _x()
    compiled = torch.compile(model, backend="svdquant", options={"rank": 8, "cache_dir": ""})
    start = len(svdq_backend.recent_summaries)
    compiled(x).square().mean().backward()
    grad = model[0].weight.grad.clone()
    (summary,) = list(svdq_backend.recent_summaries)[start:]
    assert not summary.layers and all("gradients" in reason for _, reason in summary.skips)
    model.zero_grad()
    model(x).square().mean().backward()
    torch.testing.assert_close(grad, model[0].weight.grad, rtol=1e-4, atol=1e-6)


def test_shapes_that_do_not_fit_stay_16bit_with_a_reason():
    torch._dynamo.reset()
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(100, 128), nn.Linear(128, 8), nn.Linear(8, 64)).eval()  # K % 64, tiny N, tiny K
    x = torch.randn(4, 100)
    start = len(svdq_backend.recent_summaries)
    with torch.no_grad():
        out = torch.compile(model, backend="svdquant", options={"cache_dir": ""})(x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    (summary,) = list(svdq_backend.recent_summaries)[start:]
    reasons = dict(summary.skips)
    assert "multiple of group_size" in reasons["0"] and "too small" in reasons["1"] and "multiple of group_size" in reasons["2"]


@pytest.mark.parametrize("fmt,operand_dtype", [("int4_2level", torch.int8), ("int4_pow2", torch.float8_e4m3fn)])
def test_packed_weights_give_identical_outputs_from_half_the_bytes(fmt, operand_dtype):
    torch._dynamo.reset()
    x = _x()
    outs, entries = [], []
    for packed in (False, True):
        model = _mlp(4)
        compiled = torch.compile(model, backend="svdquant", options={"rank": 8, "cache_dir": "", "format": fmt, "packed_weights": packed})
        with torch.no_grad():
            outs.append(compiled(x))
        (entry,) = quantized_weights.quantized_entries(model[0].weight).values()
        entries.append(entry)
    assert torch.equal(outs[0], outs[1])
    assert entries[0].weight_q.dtype == operand_dtype and entries[1].weight_q.dtype == torch.uint8
    assert entries[1].weight_q.nbytes < 0.52 * entries[0].weight_q.nbytes


def test_configs_with_the_same_graph_code_get_their_own_inductor_cache_entries():
    """Packed int4_2level and packed int4_pow2 weights are uint8 operands of the same graph code that
    differ only in width, which the backend's extra graph inputs do not guard: without the config in
    Inductor's FX-graph cache key, the second compile was served the first one's graph (and failed
    its size asserts)."""
    x = _x()
    with torch._inductor.config.patch(fx_graph_cache=True):
        for fmt in ("int4_2level", "int4_pow2"):
            torch._dynamo.reset()
            model = _mlp(4)
            options = {"rank": 8, "cache_dir": "", "format": fmt, "packed_weights": True, "free_weights": False}
            with torch.no_grad():
                out = torch.compile(model, backend="svdquant", options=options)(x)
            torch.testing.assert_close(out, _reference(model, options, x), rtol=1e-5, atol=1e-5)


def test_a_post_grad_pass_set_before_still_runs_and_keys_the_cache():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Counting(CustomGraphPass):
        calls = 0

        def __call__(self, graph):
            Counting.calls += 1

        def uuid(self):
            return "counting-v1"

    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_pre_pass=Counting(), fx_graph_cache=False):  # a cache hit runs no pass
        torch.compile(_mlp(6), backend="svdquant", options={"rank": 8, "cache_dir": "", "free_weights": False})(_x())
    assert Counting.calls == 1
    config = SVDQuantConfig()
    keys = {svdq_backend._ConfigInCacheKey(config, previous).uuid() for previous in (None, Counting(), [Counting()])}
    assert len(keys) == 2 and None not in keys  # the pass's uuid enters the key, in a list or not
    assert svdq_backend._ConfigInCacheKey(config, lambda graph: None).uuid() is None  # unkeyable: no caching


def test_deepcopy_of_a_model_whose_weights_were_freed_says_what_to_do():
    import copy

    import pytest

    torch._dynamo.reset()
    model = _mlp(5)
    compiled = torch.compile(model, backend="svdquant", options={"rank": 8, "cache_dir": ""})
    before = copy.deepcopy(model)  # before the first call nothing is freed: copying works
    with torch.no_grad():
        compiled(_x())
    assert model[0].weight.untyped_storage().nbytes() == 0 and before[0].weight.untyped_storage().nbytes() > 0
    with pytest.raises(RuntimeError, match="save_quantized|free_weights"):
        copy.deepcopy(model)


def test_mode_rides_in_options_and_twice_is_an_error():
    import pytest

    from svdq_compile.backend import svdquant_backend

    torch._dynamo.reset()
    model, x = _mlp(6), _x()
    options = {"rank": 8, "cache_dir": "", "free_weights": False}
    compiled = torch.compile(model, backend="svdquant", options=options | {"mode": "max-autotune-no-cudagraphs"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _reference(model, options, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mode given twice"):
        svdquant_backend(torch.fx.symbolic_trace(model), [x], mode="default", options={"mode": "reduce-overhead"})


def test_moving_or_casting_a_model_whose_weights_were_freed_says_what_to_do():
    """A conversion would read the freed weights (a segfault on CPU): it raises instead, for the
    compiled wrapper and the model; a conversion that changes nothing still works."""
    import pytest

    torch._dynamo.reset()
    model = _mlp(7)
    compiled = torch.compile(model, backend="svdquant", options={"rank": 8, "cache_dir": ""})
    with torch.no_grad():
        out = compiled(_x())
    for target in (model, compiled):
        with pytest.raises(RuntimeError, match="free_weights"):
            target.to(torch.float64)
    assert model.to(torch.float32) is model and model[0].bias.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(compiled(_x()), out, rtol=0, atol=0)
    kept = _mlp(8)
    compiled_kept = torch.compile(kept, backend="svdquant", options={"rank": 8, "cache_dir": "", "free_weights": False})
    with torch.no_grad():
        compiled_kept(_x())
    assert kept.to(torch.float64)[0].weight.dtype == torch.float64


def test_cuda_graph_replay_leaves_cpu_calls_alone_and_can_be_turned_off():
    """The backend's CUDA graphs never capture a CPU call (each runs the compiled graph), and
    ``cuda_graphs=False`` compiles without them, with the same output."""
    from svdq_compile.cuda_graphs import GraphReplay

    calls = []
    replay = GraphReplay(lambda x, w: calls.append(1) or (x @ w,))
    x, w = torch.randn(2, 3), nn.Parameter(torch.randn(3, 4))
    outs = [replay([x, w]) for _ in range(3)]
    assert len(calls) == 3 and not replay.captures and not replay.seen
    torch.testing.assert_close(outs[-1][0], x @ w)

    torch._dynamo.reset()
    model, x = _mlp(8), _x()
    options = {"rank": 8, "cache_dir": "", "free_weights": False, "cuda_graphs": False}
    compiled = torch.compile(model, backend="svdquant", options=options)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _reference(model, options, x), rtol=1e-5, atol=1e-5)
