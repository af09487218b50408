"""The ``svdquant`` torch.compile backend on tiny random diffusers models (CPU, fp32).

Each model is compiled once per module (fixtures) with backend="svdquant", fullgraph=True, and
checked against (a) the same model with its eligible linears swapped for ``QuantizedLinear`` in
eager mode (tight: the rewrite must compute exactly that) and (b) the fp32 model (within
quantization error, and not equal to it). Inductor's CPU compile is the slow part, so the compile
worker pool is off (one process is faster on a 2-core machine) and compiled models are reused.
"""

from __future__ import annotations

import copy
import functools
import fnmatch
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

import svdq_compile
from svdq_compile import QuantizedLinear, SVDQuantConfig
from svdq_compile import backend as svdq_backend
from svdq_compile import quantized_weights
from svdq_compile.passes.base import W4A4_OP

OPTIONS = {"cache_dir": ""}
CONFIG = SVDQuantConfig(**OPTIONS)


pytestmark = pytest.mark.usefixtures("inductor_in_process")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float())).item()


def eligible(name: str, linear: nn.Linear) -> bool:
    """The documented rule: not matched by a skip glob, K a multiple of 64, N >= 16."""
    n, k = linear.weight.shape
    return not any(fnmatch.fnmatchcase(name, g) for g in CONFIG.skip) and k % CONFIG.group_size == 0 and n >= 16


def eligible_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and "lora_" not in name and eligible(name.replace(".base_layer", ""), m)}


def swap_to_quantized(model: nn.Module, inputs: dict, config: SVDQuantConfig = CONFIG) -> nn.Module:
    """The eager reference: every eligible linear (peft's base_layer for LoRA layers) -> QuantizedLinear.

    Eligible linears that read the same tensor in ``model(**inputs)`` are quantized as one layer over
    their concatenated weights and each gets its rows (``rows_of``): what ``fuse_shared_input`` does.
    """
    targets = eligible_linears(model)
    for names in shared_input_readers(model, targets, inputs):
        weights = [targets[name].weight for name in names]
        joint = QuantizedLinear.from_weight(torch.cat(weights), None, config)
        start = 0
        for name, weight in zip(names, weights):
            targets[name] = rows_of(joint, start, start + weight.shape[0], targets[name].bias)
            start += weight.shape[0]
    for name, linear in targets.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear if isinstance(linear, QuantizedLinear) else QuantizedLinear.from_linear(linear, config))
    return model


def shared_input_readers(model: nn.Module, linears: dict[str, nn.Linear], inputs: dict) -> list[list[str]]:
    """Names of the ``linears`` that read one tensor (two or more), in call order, found by running ``model``."""
    seen: list[torch.Tensor] = []  # held, so no two inputs share an id
    readers: dict[int, list[str]] = {}

    def record(name):
        def hook(module, args):
            if not any(name in names for names in readers.values()):
                seen.append(args[0])
                readers.setdefault(id(args[0]), []).append(name)
        return hook

    handles = [linear.register_forward_pre_hook(record(name)) for name, linear in linears.items()]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return [names for names in readers.values() if len(names) > 1]


def rows_of(joint: QuantizedLinear, start: int, stop: int, bias: torch.Tensor | None) -> QuantizedLinear:
    """Output rows ``start:stop`` of a quantized layer, with ``bias``, as a layer of their own."""
    layer = QuantizedLinear(joint.in_features, stop - start, joint.group_size, joint.format, joint.alpha, joint.beta)
    for name in ("qweight", "scales", "lora_up"):
        layer.register_buffer(name, getattr(joint, name)[start:stop])
    layer.register_buffer("mult", joint.mult[start:stop] if joint.two_level else joint.mult)
    layer.register_buffer("smooth_inv", joint.smooth_inv)
    layer.register_buffer("lora_down", joint.lora_down)
    layer.register_buffer("bias", bias.detach().clone() if bias is not None else torch.empty(0))
    return layer


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flux_model(double: int = 1, single: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(4, 6, 6)).eval()


def flux_inputs(h: int = 4, w: int = 4, text: int = 8) -> dict:
    g = gen()
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2).float()
    img_ids = torch.cat([torch.zeros(h * w, 1), grid], 1)
    return dict(hidden_states=torch.randn(1, h * w, 16, generator=g), encoder_hidden_states=torch.randn(1, text, 64, generator=g), pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(text, 3), return_dict=False)


def pixart_model() -> nn.Module:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=64, caption_channels=64, norm_type="ada_norm_single", use_additional_conditions=False).eval()


def pixart_inputs() -> dict:
    g = gen()
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g), timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


def sd3_model() -> nn.Module:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64, out_channels=4).eval()


def sd3_inputs() -> dict:
    g = gen()
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g), pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500]), return_dict=False)


def unet_model() -> nn.Module:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32).eval()


def unet_inputs() -> dict:
    g = gen()
    # a small timestep: Inductor's sin/cos of the sinusoidal time embedding differ from eager by
    # ~1e-5 at large arguments, enough to flip 4-bit roundings in time_emb_proj (one token broadcast
    # to every pixel), which would hide a real mismatch behind a 1% difference
    return dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([3]), encoder_hidden_states=torch.randn(1, 8, 64, generator=g), return_dict=False)


MODELS = {"flux": (flux_model, flux_inputs), "pixart": (pixart_model, pixart_inputs), "sd3": (sd3_model, sd3_inputs), "unet": (unet_model, unet_inputs)}


class Compiled:
    """A model compiled with svdquant and called once, with its references."""

    def __init__(self, make_model, make_inputs) -> None:
        self.model = make_model()
        self.make_inputs = make_inputs
        self.fp_model = copy.deepcopy(self.model)
        self.reference = swap_to_quantized(copy.deepcopy(self.model), make_inputs())
        self.eligible = eligible_linears(self.model)
        self.groups = shared_input_readers(self.fp_model, eligible_linears(self.fp_model), make_inputs())
        self.skipped = {name: m for name, m in self.model.named_modules() if isinstance(m, nn.Linear) and name not in self.eligible}
        self.compiled = torch.compile(self.model, backend="svdquant", fullgraph=True, options=OPTIONS)
        start = len(svdq_backend.recent_summaries)
        with torch.no_grad():
            self.out = self.compiled(**make_inputs())[0]
            self.fp_out = self.fp_model(**make_inputs())[0]
            self.ref_out = self.reference(**make_inputs())[0]
        self.summaries = list(svdq_backend.recent_summaries)[start:]


_BUILT: dict[str, Compiled] = {}


def built(name: str) -> Compiled:
    """Each model compiled once per session (Inductor's CPU compile is the slow part)."""
    if name not in _BUILT:
        _BUILT[name] = Compiled(*MODELS[name])
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(MODELS))
def compiled(request) -> Compiled:
    return built(request.param)


def test_every_eligible_linear_is_rewritten(compiled):
    (summary,) = compiled.summaries  # fullgraph: one graph
    # one op per group of linears reading the same tensor, one per other linear
    grouped = sum(len(names) for names in compiled.groups)
    assert summary.rewrites["SharedInputFusionPass"] == len(compiled.groups) > 0
    assert summary.rewrites["LinearToW4A4Pass"] == len(compiled.eligible) - grouped > 0
    assert sorted(name for name, *_ in summary.layers) == sorted(compiled.eligible)
    assert sorted(name for name, _ in summary.skips) == sorted(compiled.skipped)


def test_output_matches_swapped_eager_model(compiled):
    assert torch.isfinite(compiled.out).all()
    assert rel_err(compiled.out, compiled.ref_out) < 1e-4


def test_output_is_the_fp_model_within_quantization_error(compiled):
    err = rel_err(compiled.out, compiled.fp_out)
    assert 1e-4 < err < 0.1, err


def test_int4_pow2_format_runs_its_own_numerics():
    """format="int4_pow2" gives the swapped eager model of that format (fp8 operands, power-of-two
    multipliers on both sides), not the int4_2level one."""
    torch._dynamo.reset()
    config = SVDQuantConfig(**OPTIONS, format="int4_pow2")
    model = flux_model()
    reference = swap_to_quantized(copy.deepcopy(model), flux_inputs(), config)
    assert {m.weight_operand().dtype for m in reference.modules() if isinstance(m, QuantizedLinear)} == {torch.float8_e4m3fn}
    compiled = torch.compile(model, backend="svdquant", fullgraph=True, options={**OPTIONS, "format": "int4_pow2"})
    with torch.no_grad():
        out, ref = compiled(**flux_inputs())[0], reference(**flux_inputs())[0]
    assert rel_err(out, ref) < 1e-4
    assert rel_err(out, built("flux").out) > 1e-3  # the int4_2level model computes something else


def test_16bit_weights_freed_after_first_call(compiled):
    for name, linear in compiled.eligible.items():
        assert linear.weight.untyped_storage().nbytes() == 0, name
        assert linear.weight.shape == compiled.fp_model.get_submodule(name).weight.shape
    for name, linear in compiled.skipped.items():
        assert linear.weight.untyped_storage().nbytes() > 0, name
    with torch.no_grad():  # the compiled model keeps working on the freed weights
        again = compiled.compiled(**compiled.make_inputs())[0]
    assert torch.equal(again, compiled.out)


@pytest.fixture(scope="module")
def flux() -> Compiled:
    return built("flux")  # shared with the parametrized tests above, which run first and do not change it


def test_second_resolution_recompiles_without_requantizing(flux):
    start = len(svdq_backend.recent_summaries)
    with torch.no_grad():
        out = flux.compiled(**flux_inputs(6, 4))[0]
        ref = flux.reference(**flux_inputs(6, 4))[0]
    (summary,) = list(svdq_backend.recent_summaries)[start:]
    assert {origin for *_, origin in summary.layers} == {"reused"}
    assert len(summary.layers) == len(flux.eligible)
    assert rel_err(out, ref) < 1e-4


def test_eager_call_after_freeing_is_an_error_not_garbage(flux):
    with torch.no_grad(), pytest.raises(RuntimeError, match="storage"):
        flux.model(**flux_inputs())


def test_lora_loaded_after_compile_recompiles_fused_without_requantizing(flux, tmp_path):
    # the usual diffusers flow: compile, generate, then load a LoRA (the 16-bit weights are gone by now)
    targets = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"]
    write_flux_lora(tmp_path / "lora.safetensors", flux.fp_model, targets)
    reference = copy.deepcopy(flux.fp_model)
    for model in (flux.model, reference):
        model.load_lora_adapter(str(tmp_path), weight_name="lora.safetensors", adapter_name="late", prefix="transformer")
    reference = swap_to_quantized(reference, flux_inputs())
    start = len(svdq_backend.recent_summaries)
    with torch.no_grad():
        out = flux.compiled(**flux_inputs())[0]
        ref = reference(**flux_inputs())[0]
    (summary,) = list(svdq_backend.recent_summaries)[start:]
    # the LoRA layers stay in their groups (double block {to_q, to_k, to_v}, {add_q_proj, add_k_proj,
    # add_v_proj}; single block {to_q, to_k, to_v, proj_mlp}), their adapters folded into the
    # group ops; GELU folds into both double-block MLP up projections and the single block's group
    # op (proj_mlp's columns); proj_out reads its two pieces in place
    assert summary.rewrites == {"LoraLinearFusionPass": len(targets), "SharedInputFusionPass": 3, "LinearToW4A4Pass": len(flux.eligible) - len(targets) - 8,
                                "GeluEpilogueFusionPass": 3, "CatInputFusionPass": 1}
    assert {origin for *_, origin in summary.layers} == {"reused"}
    assert rel_err(out, ref) < 1e-4 and rel_err(out, flux.out) > 0.01


def write_flux_lora(path, model: nn.Module, targets: list[str], rank: int = 4) -> None:
    g = gen(7)
    tensors = {}
    for name in targets:
        n, k = model.get_submodule(name).weight.shape
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, k, generator=g) * 0.5
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(n, rank, generator=g) * 0.5
    save_file(tensors, str(path))


def test_lora_from_safetensors_is_fused_and_acts_like_the_fp_lora(tmp_path):
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_mlp"]
    base = flux_model()
    write_flux_lora(tmp_path / "lora.safetensors", base, targets)
    fp_plain = copy.deepcopy(base)
    base.load_lora_adapter(str(tmp_path), weight_name="lora.safetensors", adapter_name="t", prefix="transformer")
    base.set_adapters(["t"], weights=[0.7])
    fp_lora = copy.deepcopy(base)
    reference = swap_to_quantized(copy.deepcopy(base), flux_inputs())
    quant_plain = swap_to_quantized(copy.deepcopy(fp_plain), flux_inputs())
    start = len(svdq_backend.recent_summaries)
    compiled = torch.compile(base, backend="svdquant", fullgraph=True, options=OPTIONS)
    counter = CountW4A4()
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=counter):
        out = compiled(**flux_inputs())[0]
    with torch.no_grad():
        ref = reference(**flux_inputs())[0]
        q_plain = quant_plain(**flux_inputs())[0]
        fp_delta = fp_lora(**flux_inputs())[0] - fp_plain(**flux_inputs())[0]
    (summary,) = list(svdq_backend.recent_summaries)[start:]
    assert summary.rewrites["LoraLinearFusionPass"] == len(targets)
    # q/k/v groups with their LoRA'd members (to_q, proj_mlp): 10 linears in 3 ops
    assert summary.rewrites["SharedInputFusionPass"] == 3
    assert summary.rewrites["LinearToW4A4Pass"] == len(eligible_linears(base)) - 10 - 1
    # one op per group, per other quantized linear, and ff.net.2's own op with its adapter
    assert sum(counter.counts) == 3 + summary.rewrites["LinearToW4A4Pass"] + 1
    assert rel_err(out, ref) < 1e-4
    # the LoRA moves the quantized model's output the way it moves the fp model's: within the
    # quantization error of a network whose activations the LoRA doubled (0.12 measured), while a
    # lost 0.7 adapter weight would be off by 0.43 and a dropped adapter by 1.0
    assert rel_err(fp_delta, q_plain) > 0.5
    assert rel_err(out - q_plain, fp_delta) < 0.25


def test_regional_compile_serves_every_block_with_its_own_weights():
    model = flux_model(double=2, single=2)
    reference = swap_to_quantized(copy.deepcopy(model), flux_inputs())
    start = len(svdq_backend.recent_summaries)
    model.compile_repeated_blocks(backend="svdquant", fullgraph=True, options=OPTIONS)
    with torch.no_grad():
        out = model(**flux_inputs())[0]
        ref = reference(**flux_inputs())[0]
    names = {name for s in list(svdq_backend.recent_summaries)[start:] for name, *_ in s.layers}
    # names are relative to the block, prefixed by its class; FLUX's single-block proj_out is quantized
    assert "FluxSingleTransformerBlock.proj_out" in names and "FluxTransformerBlock.attn.to_q" in names
    assert rel_err(out, ref) < 1e-4
    for block in (model.transformer_blocks[1], model.single_transformer_blocks[1]):
        assert block.attn.to_q.weight.untyped_storage().nbytes() == 0
    # every block that freed weights refuses a conversion that would read them (a segfault otherwise)
    for target in (model, model.single_transformer_blocks[1]):
        with pytest.raises(RuntimeError, match="free_weights"):
            target.to(torch.bfloat16)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(128, 128)
        self.fc2 = nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def outlier_input(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen(3))
    x[..., :4] *= 30.0
    return x


class CountW4A4:
    """A post-grad pass that counts svdq ops in what Inductor compiles."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def __call__(self, graph) -> None:
        self.counts.append(sum(1 for n in graph.nodes if n.target is W4A4_OP))


def test_quantized_weights_stay_out_of_the_fx_graph_cache_key():
    # two models that differ only in their weights: the second compile is a cache hit (the quantized
    # operands are graph inputs, keyed by shape and dtype) and still computes with its own weights
    from torch._dynamo.utils import counters

    models = []
    for seed in (0, 1):
        model = Tiny().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen(seed)) * 0.1)
        models.append(model)
    reference = swap_to_quantized(copy.deepcopy(models[1]), {"x": outlier_input(3, 128)})
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True):
        torch.compile(models[0], backend="svdquant", options=OPTIONS)(outlier_input(3, 128))
        torch._dynamo.reset()
        counters.clear()
        out = torch.compile(models[1], backend="svdquant", options=OPTIONS)(outlier_input(3, 128))
    assert counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] >= 1
    assert rel_err(out, reference(outlier_input(3, 128))) < 1e-5


def test_svdquant_0_compiles_plain_inductor(monkeypatch):
    monkeypatch.setenv("SVDQUANT", "0")
    model = Tiny().eval()
    counter = CountW4A4()
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=counter):
        out = torch.compile(model, backend="svdquant", options=OPTIONS)(outlier_input(4, 128))
        ref = model(outlier_input(4, 128))
    assert counter.counts == [0]
    assert rel_err(out, ref) < 1e-5
    assert model.fc1.weight.untyped_storage().nbytes() > 0
    torch._dynamo.reset()  # Dynamo would serve this unrewritten Tiny graph to later "svdquant" compiles


def test_dynamic_shapes_and_mode():
    model = Tiny().eval()
    reference = swap_to_quantized(copy.deepcopy(model), {"x": outlier_input(3, 128)})
    counter = CountW4A4()
    with torch.no_grad(), torch._inductor.config.patch(post_grad_custom_post_pass=counter):
        # torch.compile refuses mode= together with options=; a partial carries the options instead
        backend = functools.partial(svdq_backend.svdquant_backend, options=OPTIONS)
        compiled = torch.compile(model, backend=backend, dynamic=True, mode="max-autotune-no-cudagraphs")
        for tokens in (5, 9, 17):
            assert rel_err(compiled(outlier_input(2, tokens, 128)), reference(outlier_input(2, tokens, 128))) < 1e-5
    assert counter.counts == [2]  # one dynamic graph for every token count


def test_unknown_option_and_mode_are_clear_errors():
    with pytest.raises(Exception, match=r"unknown svdquant option\(s\) \['rnak'\]; valid options are \[.*'rank'"):
        torch.compile(Tiny(), backend="svdquant", options={"rnak": 8})(torch.randn(2, 128))
    with pytest.raises(Exception, match="valid modes"):
        svdq_backend.svdquant_backend(None, [], mode="fastest")
    assert svdq_backend._inductor_patches("reduce-overhead")["triton.cudagraphs"] is True


class ReluTimesTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(128, 128)

    def forward(self, x):
        return torch.relu(self.fc(x)) * 2


def test_kernels_write_no_buffer_they_read():
    """Inductor would write relu(fc(x)) * 2 into fc's output buffer (``in_out_ptr``); the backend
    compiles out of place, where Inductor's autotuner times kernels without cloning their buffers."""
    from torch._inductor.utils import run_and_get_code

    model, x = ReluTimesTwo().eval(), outlier_input(4, 128)
    with torch.no_grad():
        _, plain = run_and_get_code(torch.compile(model, backend="inductor"), x)
        torch._dynamo.reset()
        _, ours = run_and_get_code(torch.compile(model, backend="svdquant", options=OPTIONS), x)
    torch._dynamo.reset()
    assert "in_out_ptr" in "".join(plain)
    assert "in_out_ptr" not in "".join(ours)


def test_the_graph_writes_its_outputs_into_the_replays_buffers():
    """With the backend's CUDA graphs on (the default), the compiled graph returns nothing and
    writes its output into a buffer the replay passes in (here its uncaptured path, on CPU), from
    the kernel that computes it; the same values as the graph that returns its output."""
    from torch._inductor.utils import run_and_get_code

    model, x = ReluTimesTwo().eval(), outlier_input(4, 128)
    results = {}
    for cuda_graphs in (True, False):
        with torch.no_grad():
            out, code = run_and_get_code(torch.compile(model, backend="svdquant", options=OPTIONS | {"cuda_graphs": cuda_graphs, "free_weights": False}), x)
        torch._dynamo.reset()
        results[cuda_graphs] = out, "".join(code)
    assert torch.equal(results[True][0], results[False][0])
    assert "return ()" in results[True][1] and "return ()" not in results[False][1]


def test_flux_blocks_write_their_outputs_into_the_replays_buffers(monkeypatch):
    """Both of FLUX's block graphs are rewritten under regional compilation: the double block's into
    a buffer per output, the single block's into one buffer whose rows are its two outputs. The
    forward equals the one with the backend's CUDA graphs off."""
    rewritten = []
    original = svdq_backend.write_outputs_into_buffers
    monkeypatch.setattr(svdq_backend, "write_outputs_into_buffers", lambda gm: rewritten.append(original(gm)) or rewritten[-1])
    model = flux_model()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        model.compile_repeated_blocks(backend="svdquant", fullgraph=True, options=OPTIONS | {"free_weights": False})
        out = model(**flux_inputs())[0]
        torch._dynamo.reset()
        reference.compile_repeated_blocks(backend="svdquant", fullgraph=True, options=OPTIONS | {"cuda_graphs": False})
        ref = reference(**flux_inputs())[0]
    torch._dynamo.reset()
    assert sorted((len(b.buffers), len(b.views)) for b in rewritten) == [(1, 2), (2, 2)]
    assert torch.equal(out, ref)


def test_registered_inductor_pass_rewrites_plain_compile_and_composes():
    class Previous(torch._inductor.custom_graph_pass.CustomGraphPass):
        calls = 0

        def __call__(self, graph):
            Previous.calls += 1

        def uuid(self):
            return "previous-pass"

    model = Tiny().eval()
    reference = swap_to_quantized(copy.deepcopy(model), {"x": outlier_input(3, 128)})
    counter = CountW4A4()
    patches = dict(pre_grad_custom_pass=Previous(), freezing=False, post_grad_custom_post_pass=counter)
    with torch._inductor.config.patch(patches), torch.no_grad():
        ours = svdq_compile.register_inductor_pass(OPTIONS, freeze=True)
        assert ours.previous is not None and "previous-pass" in ours.uuid()
        assert svdq_compile.register_inductor_pass(OPTIONS) is ours  # idempotent
        out = torch.compile(model)(outlier_input(3, 128))
        svdq_compile.unregister_inductor_pass()
        assert isinstance(torch._inductor.config.pre_grad_custom_pass, Previous)
    assert counter.counts == [2] and Previous.calls == 1
    assert rel_err(out, reference(outlier_input(3, 128))) < 1e-5


def test_registered_pass_appends_to_a_list_of_passes():
    with torch._inductor.config.patch(pre_grad_custom_pass=None):
        torch._inductor.config.pre_grad_custom_pass = [len]
        ours = svdq_compile.register_inductor_pass(OPTIONS)
        assert torch._inductor.config.pre_grad_custom_pass == [len, ours]
        svdq_compile.unregister_inductor_pass()
        assert torch._inductor.config.pre_grad_custom_pass == [len]


def test_calibration_enables_smoothing_that_lowers_the_error():
    x = outlier_input(64, 128)
    model = Tiny().eval()
    with torch.no_grad():
        fp = model(x)
        plain = torch.compile(copy.deepcopy(model), backend="svdquant", options=OPTIONS)(x)
        calibrated_model = copy.deepcopy(model)
        with svdq_compile.calibrate(calibrated_model) as stats:
            calibrated_model(x)
        assert set(stats) == {"fc1", "fc2"} and stats["fc1"].sample.shape == (64, 128)
        calibrated = torch.compile(calibrated_model, backend="svdquant", options=OPTIONS)(x)
    assert rel_err(calibrated, fp) < 0.8 * rel_err(plain, fp)


def test_disk_cache_serves_the_same_weight_in_a_new_parameter(tmp_path):
    config = SVDQuantConfig(cache_dir=str(tmp_path))
    weight = nn.Parameter(torch.randn(64, 128, generator=gen(5)))
    first = quantized_weights.quantize_weight(weight, "w", config)
    assert not first.from_cache and len(list(tmp_path.glob("*.safetensors"))) == 1
    again = quantized_weights.quantize_weight(nn.Parameter(weight.detach().clone()), "w", config)
    assert again.from_cache
    for a, b in zip(first.operands(), again.operands()):
        assert torch.equal(a, b)
    changed = weight.detach().clone()
    changed[0, 0] += 1.0
    assert not quantized_weights.quantize_weight(nn.Parameter(changed), "w", config).from_cache


@pytest.mark.parametrize("cache_dir", ["folder", ""], ids=["cache", "no cache"])
def test_the_gemm_tuner_keeps_its_picks_in_the_backends_cache_folder(cache_dir, tmp_path):
    """The folder of the quantized weights is where the tuner's picks persist too; none without it."""
    from svdq_compile.kernels import w4a4_gemm

    folder = str(tmp_path / cache_dir) if cache_dir else ""
    model = nn.Sequential(nn.Linear(128, 64))
    with torch.no_grad():
        torch.compile(model, backend="svdquant", options={"cache_dir": folder})(torch.randn(3, 128))
    assert w4a4_gemm._tuning_folder == (tmp_path / cache_dir if cache_dir else None)


def run_python(script: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1", **env), timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_svdquant_1_rewrites_a_plain_torch_compile():
    out = run_python(
        """
        import torch, svdq_compile
        from svdq_compile.backend import recent_summaries
        model = torch.nn.Sequential(torch.nn.Linear(128, 64))
        with torch.no_grad():
            torch.compile(model)(torch.randn(3, 128))
        print(recent_summaries[-1].rewrites["LinearToW4A4Pass"])
        """,
        SVDQUANT="1",
        SVDQ_CACHE_DIR="",
    )
    assert out.endswith("1")


def test_backend_found_by_name_in_a_fresh_process():
    out = run_python(
        """
        import sys, torch
        assert "svdq_compile" not in sys.modules
        model = torch.nn.Sequential(torch.nn.Linear(128, 64))
        with torch.no_grad():
            out = torch.compile(model, backend="svdquant", options={"cache_dir": ""})(torch.randn(3, 128))
        from svdq_compile.backend import recent_summaries
        print(out.shape, recent_summaries[-1].rewrites["LinearToW4A4Pass"])
        """
    )
    assert out.endswith("torch.Size([3, 64]) 1")
