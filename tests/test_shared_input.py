"""``fuse_shared_input`` through the backend: linears reading one input quantized as one layer and run
as one op; member entries as row views; skips, checkpoints, the disk cache, the Inductor pass, FLUX.

Op counts are taken from what Inductor compiles (a post-grad pass). References are independent of the
backend: ``QuantizedLinear.from_weight`` on the concatenated weights (what the fused op must compute)
and the fp32 model (within quantization error).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from test_backend import OPTIONS, CountW4A4, flux_inputs, flux_model, gen, outlier_input, rel_err, swap_to_quantized
from test_passes import SharedInput, SingleBlock

import svdq_compile
from svdq_compile import QuantizedLinear, SVDQuantConfig, load_quantized, save_quantized
from svdq_compile import backend as svdq_backend
from svdq_compile import quantized_weights
from svdq_compile.passes.base import W4A4_OP

CONFIG = SVDQuantConfig(**OPTIONS)


pytestmark = pytest.mark.usefixtures("inductor_in_process")


def qkv_model() -> SharedInput:
    """q, k (no bias), v read x; o reads their activations (seeded weights)."""
    torch.manual_seed(0)
    return SharedInput().eval()


def compile_and_count(model: nn.Module, inputs: dict, **options) -> tuple[torch.Tensor, int, svdq_backend.CompileSummary]:
    """Output of ``model`` compiled with svdquant, the number of W4A4 ops Inductor compiled, the summary."""
    counter = CountW4A4()
    start = len(svdq_backend.recent_summaries)
    torch._dynamo.reset()  # every model here is compiled afresh, never served a graph made with other options
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=counter):
        out = torch.compile(model, backend="svdquant", fullgraph=True, options=OPTIONS | options)(**inputs)
    (summary,) = list(svdq_backend.recent_summaries)[start:]
    return out[0] if isinstance(out, tuple) else out, sum(counter.counts), summary


def joint_reference(model: SharedInput, x: torch.Tensor) -> torch.Tensor:
    """q/k/v as one QuantizedLinear of their concatenated weights (k's bias zeros), o quantized alone."""
    joint = QuantizedLinear.from_weight(torch.cat([model.q.weight, model.k.weight, model.v.weight]), torch.cat([model.q.bias, torch.zeros(128), model.v.bias]), CONFIG)
    with torch.no_grad():
        return QuantizedLinear.from_linear(model.o, CONFIG)(F.gelu(joint(x)))


def test_linears_of_one_input_run_as_one_op_and_compute_the_joint_layer():
    model, x = qkv_model(), outlier_input(2, 5, 128)
    fp, ref = copy.deepcopy(model), joint_reference(model, x)
    out, ops, summary = compile_and_count(model, {"x": x})
    assert ops == 2 and summary.rewrites == {"LoraLinearFusionPass": 0, "SharedInputFusionPass": 1, "LinearToW4A4Pass": 1, "GeluEpilogueFusionPass": 0, "CatInputFusionPass": 0}
    assert sorted(name for name, *_ in summary.layers) == ["k", "o", "q", "v"]  # every member listed as quantized
    assert rel_err(out, ref) < 1e-5
    with torch.no_grad():
        assert 1e-3 < rel_err(out, fp(x)) < 0.3


def test_member_entries_are_row_views_that_run_alone_as_the_fused_op_does():
    model, x = qkv_model(), outlier_input(3, 128)
    biases = {name: getattr(model, name).bias for name in ("q", "k", "v", "o")}
    out, _, _ = compile_and_count(model, {"x": x})
    entries = {name: next(iter(quantized_weights.quantized_entries(getattr(model, name).weight).values())) for name in ("q", "k", "v", "o")}
    q, k, v = (entries[n] for n in "qkv")
    # one copy of the joint operands: the members' rows of it, the smoothing and down factor shared
    assert q.weight_q.untyped_storage().data_ptr() == k.weight_q.untyped_storage().data_ptr() == v.weight_q.untyped_storage().data_ptr()
    assert q.smooth_inv is k.smooth_inv is v.smooth_inv and q.lora_down is v.lora_down
    assert entries["o"].weight_q.untyped_storage().data_ptr() != q.weight_q.untyped_storage().data_ptr()

    def alone(name: str, inp: torch.Tensor) -> torch.Tensor:
        return torch.ops.svdq.w4a4_linear(inp, *entries[name].operands(), biases[name], entries[name].group_size)

    with torch.no_grad():
        one_by_one = alone("o", F.gelu(torch.cat([alone(n, x) for n in "qkv"], -1)))
    assert rel_err(one_by_one, out) < 1e-6


def test_fuse_shared_input_false_gives_one_op_per_linear():
    model, x = qkv_model(), outlier_input(2, 5, 128)
    alone = {name: QuantizedLinear.from_linear(getattr(model, name), CONFIG) for name in ("q", "k", "v", "o")}
    with torch.no_grad():
        ref = alone["o"](F.gelu(torch.cat([alone[n](x) for n in "qkv"], -1)))
    out, ops, summary = compile_and_count(model, {"x": x}, fuse_shared_input=False)
    assert ops == 4 and summary.rewrites == {"LoraLinearFusionPass": 0, "LinearToW4A4Pass": 4, "GeluEpilogueFusionPass": 0, "CatInputFusionPass": 0}
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("skip, ops, fused", [(["k"], 2, 1), (["k", "v"], 2, 0)])
def test_skipped_member_leaves_the_others_grouped_or_alone(skip, ops, fused):
    model, x = qkv_model(), outlier_input(4, 128)
    out, counted, summary = compile_and_count(model, {"x": x}, skip=skip)
    assert counted == ops and summary.rewrites["SharedInputFusionPass"] == fused
    assert {name for name, _ in summary.skips} == set(skip)
    assert model.k.weight.untyped_storage().nbytes() > 0  # a 16-bit layer keeps its weight


def test_member_quantized_alone_before_declines_the_group():
    model, x = qkv_model(), outlier_input(4, 128)
    alone, _, _ = compile_and_count(model, {"x": x}, fuse_shared_input=False, free_weights=False)
    again, ops, summary = compile_and_count(model, {"x": x})
    assert ops == 4 and summary.rewrites["SharedInputFusionPass"] == 0  # their operands are reused, not quantized again
    assert {origin for *_, origin in summary.layers} == {"reused"}
    assert torch.equal(again, alone)


def test_save_load_round_trip_rebuilds_the_joint_op(tmp_path):
    model, x = qkv_model(), outlier_input(2, 5, 128)
    out, _, _ = compile_and_count(model, {"x": x})
    path = save_quantized(model, tmp_path / "qkv.safetensors")
    with torch.device("meta"):
        loaded = qkv_model()
    load_quantized(loaded, path, device="cpu")
    again, ops, summary = compile_and_count(loaded, {"x": x}, checkpoint=str(path))
    assert ops == 2 and {origin for *_, origin in summary.layers} == {"reused"}
    assert torch.equal(again, out)
    # the members' separate tensors from the file became views of one joint copy
    q, v = (next(iter(quantized_weights.quantized_entries(w).values())) for w in (loaded.q.weight, loaded.v.weight))
    assert q.lora_up.untyped_storage().data_ptr() == v.lora_up.untyped_storage().data_ptr()


def test_disk_cache_keys_the_concatenated_weight(tmp_path):
    config = SVDQuantConfig(cache_dir=str(tmp_path))
    weights = [nn.Parameter(torch.randn(64, 128, generator=gen(i))) for i in range(3)]
    first = quantized_weights.quantize_group(weights, ["q", "k", "v"], config)
    assert not first.joint.from_cache and len(list(tmp_path.glob("*.safetensors"))) == 1
    again = quantized_weights.quantize_group([nn.Parameter(w.detach().clone()) for w in weights], ["q", "k", "v"], config)
    assert again.joint.from_cache and all(m.from_cache for m in again.members)
    for a, b in zip(first.joint.operands(), again.joint.operands()):
        assert torch.equal(a, b)


def compile_with_inductor_pass(model: nn.Module, x: torch.Tensor, post_grad_pass) -> torch.Tensor:
    """``model(x)`` compiled by plain torch.compile with the svdquant Inductor pass registered
    (frozen weights); ``post_grad_pass`` sees what Inductor compiles."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(pre_grad_custom_pass=None, freezing=False, post_grad_custom_post_pass=post_grad_pass), torch.no_grad():
        svdq_compile.register_inductor_pass(OPTIONS, freeze=True)
        out = torch.compile(model)(x)
        svdq_compile.unregister_inductor_pass()
    torch._dynamo.reset()
    return out


def test_inductor_pass_with_freezing_fuses_too():
    model, x = qkv_model(), outlier_input(3, 128)
    ref = joint_reference(model, x)
    counter = CountW4A4()
    out = compile_with_inductor_pass(model, x, counter)
    assert counter.counts == [2]
    assert rel_err(out, ref) < 1e-5


def test_inductor_pass_folds_gelu_and_cat_as_the_backend_does():
    """A FLUX-single-block stand-in (q, k and the MLP input share x; tanh GELU; a cat feeding one
    projection) through the Inductor pass with frozen weights: the same four W4A4 ops and the same
    output as through the backend."""
    torch.manual_seed(0)
    model, x = SingleBlock().eval(), outlier_input(2, 5, 128)
    backend_out, ops, summary = compile_and_count(copy.deepcopy(model), {"x": x}, free_weights=False)
    assert ops == 4 and summary.rewrites["GeluEpilogueFusionPass"] == 2 and summary.rewrites["CatInputFusionPass"] == 1
    compiled = []  # (W4A4 ops, GELUs, cats) of what Inductor compiles

    def record(graph):
        compiled.append(tuple(sum(1 for n in graph.nodes if n.target is t) for t in (W4A4_OP, torch.ops.aten.gelu.default, torch.ops.aten.cat.default)))

    out = compile_with_inductor_pass(model, x, record)
    assert compiled == [(4, 0, 0)]  # both GELUs in GEMM epilogues, no concatenation left
    assert rel_err(out, backend_out) < 1e-5


def test_flux_q_k_v_and_proj_mlp_fuse():
    # 1 double + 1 single block: 20 eligible linears; fused are the double block's to_q/k/v and
    # add_q/k/v_proj, the single block's to_q/k/v + proj_mlp: 10 linears in 3 ops
    inputs = flux_inputs()
    off, ops_off, _ = compile_and_count(flux_model(), inputs, fuse_shared_input=False)
    on, ops_on, summary = compile_and_count(flux_model(), inputs)
    assert (ops_off, ops_on) == (20, 13)
    # + the GELUs of both double-block MLPs and the single block's MLP piece; proj_out's two pieces
    assert summary.rewrites == {"LoraLinearFusionPass": 0, "SharedInputFusionPass": 3, "LinearToW4A4Pass": 10, "GeluEpilogueFusionPass": 3, "CatInputFusionPass": 1}
    with torch.no_grad():
        ref = swap_to_quantized(flux_model(), inputs)(**inputs)[0]
        fp = flux_model()(**inputs)[0]
    assert rel_err(on, ref) < 1e-4
    assert rel_err(on, fp) < 0.1 and rel_err(off, fp) < 0.1  # the joint quantization is as good as one by one
