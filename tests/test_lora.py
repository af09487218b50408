"""LoRA on a model compiled with backend="svdquant": load, stack, re-weight, disable, hotswap, fuse, unload.

Every operation is applied to two pipelines: one whose tiny FLUX transformer is compiled with
backend="svdquant" (fp32, 16-bit weights freed after the first call, the default) and an
uncompiled fp32 "mirror" with the same LoRA configuration. The pipelines are ``MiniPipe``: diffusers'
``FluxLoraLoaderMixin`` (FluxPipeline's LoRA API: ``load_lora_weights``, ``set_adapters(...,
adapter_weights=...)``, ``disable_lora`` / ``enable_lora``, ``enable_lora_hotswap`` + ``load_lora_weights(...,
hotswap=True)``, ``fuse_lora`` / ``unfuse_lora``, ``unload_lora_weights``, ``delete_adapters``) over just
a transformer, without text encoders or a scheduler. The two small tests at the end call peft's
layer API directly. LoRAs are written with peft (``get_peft_model_state_dict``) and saved as
safetensors in diffusers' format.

What is compared is the LoRA's effect, ``out(LoRA config) - out(no LoRA)``, quantized against fp32:
the quantized model's base output differs from fp32 by the 4-bit error (about 3% on this model), and
a LoRA delta computed through 4-bit layers carries that error too (``DELTA_TOL``, justified there).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers.loaders import FluxLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from torch import nn
from test_backend import OPTIONS, flux_inputs, flux_model, rel_err, swap_to_quantized

from svdq_compile import backend as svdq_backend
from svdq_compile.lora import MAX_FUSED_RANK, TensorScaling, prepare_lora_layers

# Relative error of a quantized LoRA delta against the fp32 one. Measured on this model: 0.09-0.11
# (the LoRA's effect flows through the later 4-bit layers, each with ~3-7% output error). The
# mistakes this suite must catch are above it: a stale strength or adapter (the previous
# configuration's delta) is off by 0.35 to 2.4 (asserted where it happens), a dropped LoRA by 1.0.
DELTA_TOL = 0.2

TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_mlp"]


pytestmark = pytest.mark.usefixtures("inductor_in_process")


def write_peft_lora(path, base: nn.Module, targets: list[str], rank: int, seed: int) -> str:
    """Train-free peft LoRA on ``targets`` with random factors, saved as diffusers-format safetensors.

    Factor entries have std ``0.4 * (4 / rank) ** 0.25``, so ``B @ A`` has the same size at every rank.
    """
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), copy.deepcopy(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4 * (4 / rank) ** 0.25)
    state = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(path))
    return str(path)


class MiniPipe(FluxLoraLoaderMixin):
    """FluxPipeline's LoRA methods over a transformer alone (no text encoder LoRAs)."""

    _lora_loadable_modules = ["transformer", "text_encoder"]

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self.text_encoder = None
        self.hf_device_map = None

    @property
    def components(self) -> dict:
        return {"transformer": self.transformer, "text_encoder": None}


class LoraPair:
    """The svdquant-compiled model and its fp32 mirror, driven through the same LoRA calls."""

    def __init__(self, tmp) -> None:
        base = flux_model()
        self.files = {
            "a": write_peft_lora(tmp / "a.safetensors", base, TARGETS, rank=4, seed=1),
            "b": write_peft_lora(tmp / "b.safetensors", base, TARGETS[1:], rank=8, seed=2),
            "c": write_peft_lora(tmp / "c.safetensors", base, TARGETS, rank=16, seed=3),  # hotswap for "a"
            "d": write_peft_lora(tmp / "d.safetensors", base, TARGETS, rank=8, seed=4),  # hotswap, smaller rank
            "late": write_peft_lora(tmp / "late.safetensors", base, TARGETS[:1], rank=4, seed=5),
        }
        with torch.no_grad():
            self.fp_base = base(**flux_inputs())[0]
            self.q_base = swap_to_quantized(copy.deepcopy(base), flux_inputs())(**flux_inputs())[0]
        self.model, self.mirror = base, copy.deepcopy(base)
        self.pipes = (MiniPipe(self.model), MiniPipe(self.mirror))
        # hotswap must be enabled before the first adapter is loaded (diffusers' rule); target_rank
        # pads "a" to 16 so a LoRA of rank <= 16 can replace it in place
        self.both(lambda p: p.enable_lora_hotswap(target_rank=16))
        self.load("a")
        self.load("b")
        self.both(lambda p: p.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0]))
        prepare_lora_layers(self.model)  # documented: saves the one recompile the pass would cause
        # in place (diffusers' recommended pipe.transformer.compile(...)): the pipeline's LoRA methods
        # look for ModelMixin instances and skip a torch.compile wrapper (OptimizedModule)
        self.model.compile(backend="svdquant", fullgraph=True, options=OPTIONS)
        self.compiled = self.model
        start = len(svdq_backend.recent_summaries)
        self.check()
        self.first_summaries = list(svdq_backend.recent_summaries)[start:]

    def both(self, op) -> None:
        """``op(pipe)`` on the quantized pipeline and on the fp32 mirror."""
        for pipe in self.pipes:
            op(pipe)

    def load(self, key: str, adapter_name: str | None = None, hotswap: bool = False) -> None:
        self.both(lambda p: p.load_lora_weights(self.files[key], adapter_name=adapter_name or key, hotswap=hotswap))

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.compiled(**flux_inputs())[0], self.mirror(**flux_inputs())[0]

    def check(self, lora_active: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Compiled vs mirror: the LoRA deltas agree within DELTA_TOL (or both models are at base)."""
        out, fp = self.outputs()
        q_delta, fp_delta = out - self.q_base, fp - self.fp_base
        if lora_active:
            assert rel_err(fp_delta, self.fp_base) > 0.3  # the LoRA moves the output a lot
            assert rel_err(q_delta, fp_delta) < DELTA_TOL, rel_err(q_delta, fp_delta)
        else:
            assert rel_err(fp, self.fp_base) < 1e-5 and rel_err(out, self.q_base) < 1e-4
        return q_delta, fp_delta


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> LoraPair:
    return LoraPair(tmp_path_factory.mktemp("loras"))


def no_recompile():
    return torch._dynamo.config.patch(error_on_recompile=True)


def test_loaded_before_compile_two_adapters_fused_into_one_op(pair):
    (summary,) = pair.first_summaries
    # "a" and "b" both on TARGETS[1:], "a" alone on TARGETS[0]: three fused layers, every adapter in them
    assert summary.rewrites["LoraLinearFusionPass"] == len(TARGETS)
    assert all(isinstance(m.scaling, TensorScaling) for m in pair.model.modules() if hasattr(m, "lora_A"))


def test_set_adapters_weights_change_without_recompile(pair):
    previous_q, previous_fp = pair.check()
    for weights in ([0.5, 1.5], [-0.8, 0.3]):
        pair.both(lambda p: p.set_adapters(["a", "b"], adapter_weights=weights))
        with no_recompile():
            q_delta, fp_delta = pair.check()
        # not stale: the previous strengths' delta is far from the new one
        assert rel_err(previous_q, fp_delta) > DELTA_TOL
        previous_q = q_delta
    pair.both(lambda p: p.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0]))


def test_one_adapter_active_then_both_again(pair):
    pair.both(lambda p: p.set_adapters(["b"], adapter_weights=[0.7]))
    pair.check()  # another set of active adapters is another graph (one recompile)
    pair.both(lambda p: p.set_adapters(["a", "b"], adapter_weights=[0.9, 1.1]))
    with no_recompile():  # back to the first graph, with the new strengths
        pair.check()


def test_disable_then_enable_lora(pair):
    pair.both(lambda p: p.disable_lora())
    pair.check(lora_active=False)
    pair.both(lambda p: p.enable_lora())
    with no_recompile():
        pair.check()


def test_hotswap_same_and_smaller_rank_without_recompile(pair):
    before, _ = pair.check()
    with no_recompile():
        pair.load("c", adapter_name="a", hotswap=True)  # rank 16 = target rank
        q_delta, fp_delta = pair.check()
        assert rel_err(before, fp_delta) > DELTA_TOL  # the old adapter's weights are gone
        pair.load("d", adapter_name="a", hotswap=True)  # rank 8 < 16
        pair.check()


def test_lora_loaded_after_compile(pair):
    pair.load("late")
    pair.both(lambda p: p.set_adapters(["a", "b", "late"], adapter_weights=[1.0, 0.5, 1.0]))
    pair.check()
    pair.both(lambda p: p.set_adapters(["a", "b", "late"], adapter_weights=[0.2, 0.5, -1.0]))
    with no_recompile():
        pair.check()
    pair.both(lambda p: p.delete_adapters("late"))
    pair.both(lambda p: p.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0]))


def test_fuse_lora_on_freed_weights_then_unfuse(pair):
    unfused_q, _ = pair.check()
    assert pair.model.transformer_blocks[0].attn.to_q.base_layer.weight.untyped_storage().nbytes() == 0  # freed
    pair.both(lambda p: p.fuse_lora(lora_scale=0.6))
    fused_q, fused_fp = pair.check()
    assert rel_err(unfused_q, fused_fp) > DELTA_TOL  # fuse's lora_scale took effect
    pair.both(lambda p: p.unfuse_lora())
    pair.both(lambda p: p.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0]))  # unfuse leaves peft's scales at 0.6
    with no_recompile():  # the unfused graph again, with the quantized factors restored
        again, _ = pair.check()
    assert rel_err(again, unfused_q) < 1e-4


def test_fuse_then_unload_keeps_the_fused_lora(pair):
    pair.both(lambda p: p.fuse_lora(lora_scale=0.8))
    pair.both(lambda p: p.unload_lora_weights())
    pair.check()


def test_unload_without_fuse_restores_base(tmp_path):
    # own model: the shared one has a fused LoRA by now
    pair = LoraPair(tmp_path)
    pair.both(lambda p: p.unload_lora_weights())
    pair.check(lora_active=False)


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(128, 128)
        self.skipme = nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skipme(torch.relu(self.fc(x)))


def lora_model(adapters: dict[str, tuple[int, list[str]]]) -> nn.Module:
    torch.manual_seed(0)
    model = TwoLinears().eval()
    for name, (rank, targets) in adapters.items():
        model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False), model, adapter_name=name)
    for module in model.modules():
        if hasattr(module, "set_adapter"):
            module.set_adapter(list(adapters))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(4)  # peft's non-default init is small; make the LoRA matter
    return model


def test_adapters_that_do_not_fit_run_16bit_with_a_logged_reason(caplog):
    # fc: SVD rank 32 + "small" 8 fits, + "big" 240 would exceed MAX_FUSED_RANK; skipme is a skipped layer
    model = lora_model({"small": (8, ["fc"]), "big": (240, ["fc", "skipme"])})
    fp = copy.deepcopy(model)
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="svdquant", fullgraph=True, options=OPTIONS | {"skip": ["skipme"]})
    start = len(svdq_backend.recent_summaries)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="svdq_compile"):
        out, ref = compiled(x), fp(x)
    assert 32 + 8 + 240 > MAX_FUSED_RANK
    assert "big" in caplog.text and f"> {MAX_FUSED_RANK}" in caplog.text
    (summary,) = list(svdq_backend.recent_summaries)[start:]
    assert summary.rewrites["LoraLinearFusionPass"] == 1  # "small" fused into fc's op
    assert ("skipme", "skip glob 'skipme'") in summary.skips
    # only fc's base weight is 4-bit: the output is the fp one within one layer's quantization error
    assert 1e-4 < rel_err(out, ref) < 0.05


def test_float_strengths_are_converted_with_one_recompile_then_none(caplog):
    model = lora_model({"s": (8, ["fc"])})
    fp = copy.deepcopy(model)
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(model, backend="svdquant", fullgraph=True, options=OPTIONS)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="svdq_compile"):
        previous, previous_fp = compiled(x), fp(x)  # compiles with the float strength baked in, then converts it
        assert "recompiles once" in caplog.text and isinstance(model.fc.scaling, TensorScaling)
        compiled(x)  # the one recompile
        for scale in (0.25, 2.0):
            for m in (model, fp):
                m.fc.set_scale("s", scale)
            with no_recompile():
                out, ref = compiled(x), fp(x)
            assert rel_err(ref - previous_fp, ref) > 0.1  # the strength matters
            assert rel_err(out - previous, ref - previous_fp) < DELTA_TOL
            previous, previous_fp = out, ref


def test_unfuse_of_a_lora_fused_before_compiling():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(7))
    for free in (True, False):
        model = lora_model({"s": (8, ["fc"])})
        plain = copy.deepcopy(model)
        model.fc.merge()  # fused into the 16-bit weight, which the compile then quantizes
        compiled = torch.compile(model, backend="svdquant", fullgraph=True, options=OPTIONS | {"free_weights": free})
        with torch.no_grad():
            fused = compiled(x)
            assert rel_err(fused, plain(x)) < 0.15  # the fused LoRA is in the quantized weight
            if free:
                with pytest.raises(RuntimeError, match="cannot unfuse"):
                    model.fc.unmerge()
                continue
            model.fc.unmerge()
            unfused = compiled(x)  # the unmerged weight is quantized again, not the fused one reused
            # two 4-bit layers: ~0.1 from the fp output; a reused (stale) fused weight would add the LoRA twice
            no_lora = plain.skipme(torch.relu(plain.fc.base_layer(x)))
            assert rel_err(unfused, plain(x)) < 0.15 < rel_err(plain(x), no_lora)
