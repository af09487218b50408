"""End-to-end speed and memory of a FLUX-sized transformer: bf16, fp8, int4 weight-only, svdquant.

    python benchmarks/bench_e2e.py [--blocks 19 38] [--tokens 4096 1024] [--out DIR]

Builds diffusers' FluxTransformer2DModel with FLUX.1's sizes and random bf16 weights, batch 1, 512
text tokens, and measures each configuration in a fresh subprocess, one after another (so compile
time is cold, memory is the configuration's own, and the disk cache is the only thing carried over):

* bf16 eager; bf16 Inductor;
* fp8 dynamic rowwise (torch._scaled_mm, e4m3, per-token x per-channel scales), Inductor;
* int4 weight-only (torch._weight_int4pack_mm, group 64), Inductor;
* svdquant (backend="svdquant", rank 32), cold and again with a warm cache; svdquant + a rank-32 LoRA;
  svdquant with 4-bit packed weights in memory (``packed_weights=True``); svdquant in the
  "int4_pow2" format (power-of-two group multipliers, fp8 operands and tensor cores), also with
  packed weights;
* bf16 Inductor and svdquant with the compiled forward captured as one CUDA graph
  (``torch.cuda.graph``; static shapes), which takes the per-call CPU work (Python, kernel
  launches, guards) out of the forward. (``mode="reduce-overhead"`` with regional compilation
  fails in diffusers' FLUX blocks for bf16 Inductor too: cudagraph trees report that a block's
  replay overwrote an output the model still reads.) The svdquant rows without "+ CUDA graph" use
  the backend's defaults, which replay each block's calls as CUDA graphs (``cuda_graphs``).

Compiled configurations use diffusers' regional compilation (``compile_repeated_blocks``), what
users take for fast cold starts, except the "whole model" ones: ``torch.compile(model,
fullgraph=True)``, one graph for the whole forward (for svdquant: one CUDA graph per forward
instead of one per block). Per configuration: median forward latency (CUDA events, warmed up),
the time per forward of 28 forwards back to back (a pipeline's steps: each forward's host work at
its start overlaps the previous one's kernels), peak memory, weight memory, compile time (first
call, quantization included; for svdquant the part spent quantizing or loading the weights is in
the results file), and for the quantized ones the median and max per-layer relative output error
against bf16 on real inputs of the first double and single block (per layer, not end to end: deep
random networks amplify any error).
Prints a Markdown table and writes results.json and e2e.png under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

CONFIGS = ["bf16 eager", "bf16 inductor", "fp8 rowwise", "int4 weight-only", "svdquant", "svdquant warm", "svdquant + LoRA",
           "svdquant packed", "svdquant pow2", "svdquant pow2 packed", "bf16 inductor + CUDA graph", "svdquant + CUDA graph", "svdquant + LoRA + CUDA graph",
           "bf16 inductor whole model", "svdquant whole model"]
TEXT_TOKENS = 512
GROUP = 64


def build_flux(double: int, single: int) -> nn.Module:
    """FluxTransformer2DModel with FLUX.1's widths, random bf16 weights, on the GPU."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: a 12B model in fp32 would not fit twice
    try:
        with torch.device("cuda"):
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
            )
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def flux_inputs(image_tokens: int, device: str = "cuda") -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    side = int(image_tokens**0.5)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    img_ids = torch.stack((torch.zeros_like(rows), rows, cols), -1).reshape(-1, 3)
    return dict(
        hidden_states=torch.randn(1, image_tokens, 64, generator=g, device=device, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, generator=g, device=device, dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, 768, generator=g, device=device, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        img_ids=img_ids.to(device),
        txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device),
        guidance=torch.tensor([3.5], device=device, dtype=torch.bfloat16),
        return_dict=False,
    )


class Fp8RowwiseLinear(nn.Module):
    """Dynamic fp8 e4m3: per-token activation scales, per-channel weight scales, torch._scaled_mm."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.float()
        scale = (w.abs().amax(1, keepdim=True) / 448).clamp_min(1e-12)
        self.weight = (w / scale).to(torch.float8_e4m3fn)
        self.weight_scale = scale.T.contiguous()  # [1, N]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        scale = (x2.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12)
        xq = (x2.float() / scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(xq, self.weight.T, scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype, use_fast_accum=True)
        return out.reshape(*x.shape[:-1], -1)


class Int4WeightOnlyLinear(nn.Module):
    """Symmetric int4 weights in groups of 64, bf16 activations, torch._weight_int4pack_mm."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.float()
        n, k = w.shape
        scale = (w.unflatten(1, (k // GROUP, GROUP)).abs().amax(-1) / 7).clamp_min(1e-12)  # [N, K/G]
        q = (torch.round(w.unflatten(1, (k // GROUP, GROUP)) / scale[..., None]).clamp(-8, 7) + 8).flatten(1).to(torch.int32)
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # the kernel reads (q - 8) * scale + zero
        self.weight = torch._convert_weight_to_int4pack(packed, 8)
        self.scales_and_zeros = torch.stack((scale, torch.zeros_like(scale)), -1).transpose(0, 1).contiguous().bfloat16()
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.weight, GROUP, self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], -1)
        return out + self.bias if self.bias is not None else out


def swap_block_linears(model: nn.Module, make: type) -> None:
    """Replace the nn.Linear modules inside the transformer blocks (where the compute is)."""
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for block in blocks:
            for name, module in list(block.named_modules()):
                for child_name, child in list(module.named_children()):
                    if isinstance(child, nn.Linear) and child.in_features % GROUP == 0:
                        setattr(module, child_name, make(child))
    torch.cuda.empty_cache()


def add_lora(model: nn.Module, rank: int) -> None:
    """A rank-``rank`` peft LoRA on the attention projections with non-zero random factors,
    prepared for compiling as docs/backend.md advises (strengths as tensors: no recompile later)."""
    from peft import LoraConfig

    from svdq_compile.lora import prepare_lora_layers

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    model.to(torch.bfloat16)
    prepare_lora_layers(model)


def weight_bytes(model: nn.Module, quantized: list[torch.Tensor] | None = None) -> int:
    """Bytes of the weights a forward reads: live parameters/buffers plus quantized operands, each
    storage counted once (joint quantizations' members are views of one storage)."""
    tensors = list(model.parameters()) + list(model.buffers()) + list(quantized or [])
    for module in model.modules():  # module-swap baselines keep their tensors as plain attributes
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(nbytes for ptr, nbytes in storages.items() if ptr)


def sample_layers(model: nn.Module) -> dict[str, nn.Linear]:
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.net.0.proj",
             "transformer_blocks.0.ff.net.2", "transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.proj_mlp",
             "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_k"]
    modules = dict(model.named_modules())
    return {n: modules[n] for n in names if n in modules}


def capture_inputs(model: nn.Module, layers: dict[str, nn.Linear], inputs: dict) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # None: keep the output
            seen.setdefault(name, args[0].detach().clone())
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen


def layer_errors(layers: dict[str, nn.Linear], inputs: dict[str, torch.Tensor], make) -> list[float]:
    """Relative output error of each sampled layer, quantized by ``make``, on its real input."""
    errors = []
    with torch.no_grad():
        for name, linear in layers.items():
            x = inputs[name]
            ref = linear(x).float()
            out = make(linear)(x).float()
            errors.append(((out - ref).norm() / ref.norm()).item())
    return errors


def _median_ms(run, repeats: int) -> float:
    """Median ms of ``repeats`` calls of ``run()``, CUDA-event timed; each starts after the GPU has
    finished the one before."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_forward(forward, iters: int) -> float:
    """Median ms of ``iters`` calls of ``forward()``, CUDA-event timed, after warm-up."""
    with torch.no_grad():
        for _ in range(3):
            forward()
        return _median_ms(forward, iters)


def time_steps(forward, steps: int = 28, repeats: int = 3) -> float:
    """ms per forward of ``steps`` forwards run back to back, as a pipeline's denoising steps run
    (nothing waits for the GPU between them); the median of ``repeats`` runs. The host's work at
    each forward's start (diffusers' code before the first block, the first block's call) then
    overlaps the previous forward's kernels; ``time_forward``'s calls each wait for it."""

    def run_steps() -> None:
        for _ in range(steps):
            forward()

    with torch.no_grad():
        forward()
        torch.cuda.synchronize()
        return _median_ms(run_steps, repeats) / steps


def graphed_forward(model: nn.Module, inputs: dict):
    """The compiled forward captured as one CUDA graph (static inputs): its replay, which runs the
    same kernels with no Python, launch or guard work per call."""
    with torch.no_grad():
        for _ in range(2):  # tune kernels, free weights, allocate outside the capture
            model(**inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(**inputs)
    return graph.replay


def run_config(name: str, args: argparse.Namespace) -> dict:
    """Measure one configuration in this process."""
    from svdq_compile import QuantizedLinear, SVDQuantConfig

    torch._dynamo.config.cache_size_limit = 64
    model = build_flux(*args.blocks)
    result: dict = {"config": name}
    layers = sample_layers(model)
    svdq_options = {"rank": 32, "cache_dir": args.cache_dir}
    quantizers = {
        "fp8 rowwise": Fp8RowwiseLinear,
        "int4 weight-only": Int4WeightOnlyLinear,
        "svdquant": lambda lin: QuantizedLinear.from_linear(lin, SVDQuantConfig(rank=32)),
        "svdquant pow2": lambda lin: QuantizedLinear.from_linear(lin, SVDQuantConfig(rank=32, format="int4_pow2")),
    }
    quantizer = quantizers.get(name)  # per-layer errors once per method, not again for warm / LoRA runs
    if quantizer is not None:
        inputs = capture_inputs(model, layers, flux_inputs(args.tokens[0]))
        errors = layer_errors(layers, inputs, quantizer)
        result["layer_error_median"] = sorted(errors)[len(errors) // 2]
        result["layer_error_max"] = max(errors)
        del inputs
    if name.startswith("svdquant + LoRA"):
        add_lora(model, 32)
    if name in ("fp8 rowwise", "int4 weight-only"):
        swap_block_linears(model, quantizers[name])
    if name == "bf16 inductor whole model":
        model = torch.compile(model, fullgraph=True)
    elif name == "svdquant whole model":
        model = torch.compile(model, backend="svdquant", fullgraph=True, options=svdq_options)
    elif name in ("bf16 inductor", "bf16 inductor + CUDA graph", "fp8 rowwise", "int4 weight-only"):
        model.compile_repeated_blocks(fullgraph=True)
    elif name == "svdquant packed":
        model.compile_repeated_blocks(backend="svdquant", fullgraph=True, options=svdq_options | {"packed_weights": True})
    elif name == "svdquant pow2":
        model.compile_repeated_blocks(backend="svdquant", fullgraph=True, options=svdq_options | {"format": "int4_pow2"})
    elif name == "svdquant pow2 packed":
        model.compile_repeated_blocks(backend="svdquant", fullgraph=True, options=svdq_options | {"format": "int4_pow2", "packed_weights": True})
    elif name.startswith("svdquant"):
        model.compile_repeated_blocks(backend="svdquant", fullgraph=True, options=svdq_options)
    torch.cuda.synchronize()
    for tokens in args.tokens:
        inputs = flux_inputs(tokens)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        torch.cuda.synchronize()
        first_call = time.perf_counter() - start
        weights = weight_bytes(model, _svdq_operands())
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward = graphed_forward(model, inputs) if name.endswith("+ CUDA graph") else lambda: model(**inputs)
        ms = time_forward(forward, args.iters)
        activations = torch.cuda.max_memory_allocated() - before
        result[tokens] = {"ms": ms, "steps_ms": time_steps(forward), "first_call_s": first_call, "weight_gib": weights / 2**30,
                          "peak_gib": (weights + activations) / 2**30}
        if args.profile and tokens == args.tokens[0] and not name.endswith("+ CUDA graph"):
            result |= profile_forward(model, inputs)
        del forward
        torch.cuda.empty_cache()
    if name.startswith("svdquant"):
        # The tuner's picks, so that a change in the GEMMs' time between runs can be traced to them
        # (picks flipped between runs at FLUX's largest shape: KERNEL_NOTES.md, v20).
        from svdq_compile.kernels.w4a4_gemm import tuned_configs

        result["gemm_configs"] = {str(key): str(cfg) for key, cfg in tuned_configs().items()}
        # How much of the first calls went to quantizing the weights or loading them from the disk
        # cache; the rest is compiling, GEMM tuning and CUDA-graph captures (run 33's warm starts).
        from svdq_compile import quantized_weights

        entries = quantized_weights.live_entries()
        result["quantize_s"] = sum(entry.seconds for entry in entries)
        result["quantized_from_disk_cache"] = f"{sum(entry.from_cache for entry in entries)} of {len(entries)}"
    return result


# Kernel-name fragments of each share of the forward's GPU time, matched in this order. The W4A4
# GEMM's share includes its GEMV form and, with packed weights, their expansion before the GEMM.
SHARES = (
    ("W4A4 GEMM", ("w4a4_gemm", "w4a4_gemv", "unpack_weight")),
    ("activation quantize", ("_quantize_kernel", "_row_max_lowrank_kernel", "quantize_act")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("other GEMMs", ("gemm", "xmma", "cutlass", "nvjet", "scaled_mm", "int4", "sm90", "matmul")),
)


def share_of(kernel: str) -> str:
    """The share of GPU time a kernel counts in, by its name.

    Inductor's own kernels (``triton_poi_fused_...``, ``triton_red_fused_...``) are named after the
    ops they fuse, so they would match the fragments of their neighbours: those that feed a
    ``torch._scaled_mm`` or take a row's ``amax`` are the fp8 baseline's activation quantization
    (fused with its producer, a norm, a GELU or a cat, which counts with it), and the rest are
    everything else (norms, RoPE, residual adds), also where an attention op lends them its name.

    Example:
        >>> share_of("triton_poi_fused__scaled_mm__to_copy_clamp_min_div_gelu_5"), share_of("_w4a4_gemm_kernel")
        ('activation quantize', 'W4A4 GEMM')
    """
    key = kernel.lower()
    if key.startswith("triton_"):
        return "activation quantize" if "_scaled_mm" in key or "abs_amax" in key else "everything else"
    return next((name for name, parts in SHARES if any(p in key for p in parts)), "everything else")


def idle_before(kernels: list[tuple[float, float, str]], forwards: int) -> tuple[float, list]:
    """Idle GPU time per forward (ms) from the kernels' ``(start, end, name)`` in microseconds, and
    the 10 kernel names that most often find the GPU idle before they start: ``(name, ms per
    forward, launches per forward)``. A kernel's wait runs from the latest end of the kernels
    before it (they may overlap) to its start; the first one waits for nothing.

    Example:
        >>> idle_before([(0.0, 5.0, "a"), (7.0, 9.0, "b"), (9.5, 12.0, "a")], forwards=1)
        (0.0025, [('b', 0.002, 1), ('a', 0.0005, 2)])
    """
    waits: dict[str, float] = {}
    launches: dict[str, int] = {}
    busy_until = None
    for start, end, name in sorted(kernels):
        if busy_until is not None:
            waits[name] = waits.get(name, 0.0) + max(0.0, start - busy_until)
        launches[name] = launches.get(name, 0) + 1
        busy_until = end if busy_until is None else max(busy_until, end)
    top = sorted(waits, key=lambda n: -waits[n])[:10]
    return round(sum(waits.values()) / forwards / 1e3, 4), [(n[:90], round(waits[n] / forwards / 1e3, 4), launches[n] // forwards) for n in top]


def profile_forward(model: nn.Module, inputs: dict, forwards: int = 3) -> dict:
    """Over profiled forwards: the share of GPU kernel time per kind of kernel (``time_shares``), GPU
    ms per forward (``gpu_ms``), the 15 kernels that take the most time (``top_kernels``: name, ms
    per forward, calls per forward), and the GPU's idle time per forward with the kernels it waits
    before (``idle_ms``, ``idle_before``: see ``idle_before``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(forwards):
            model(**inputs)
        torch.cuda.synchronize()
    totals = {name: 0.0 for name, _ in SHARES} | {"everything else": 0.0}
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if not us or event.key.startswith(("ProfilerStep", "aten::", "Torch-Compiled", "CompiledFunction")):
            continue
        totals[share_of(event.key)] += us
        kernels.append((event.key[:90], round(us / forwards / 1e3, 3), event.count // forwards))
    total = sum(totals.values()) or 1.0
    idle_ms, waits = idle_before([(e.time_range.start, e.time_range.end, e.key) for e in prof.events() if e.device_type == DeviceType.CUDA], forwards)
    return {
        "time_shares": {name: round(us / total, 3) for name, us in totals.items()},
        "gpu_ms": round(total / forwards / 1e3, 2),
        "top_kernels": sorted(kernels, key=lambda k: -k[1])[:15],
        "idle_ms": idle_ms,
        "idle_before": waits,
    }


def _svdq_operands() -> list[torch.Tensor]:
    """The quantized operand tensors the svdquant backend holds for live weights."""
    if "svdq_compile.quantized_weights" not in sys.modules:
        return []
    from svdq_compile import quantized_weights

    return [t for q in quantized_weights.live_entries() for e in [q, *(g.joint for g in q.groups)] for t in e.operands()]


def plot(rows: list[dict], tokens: int, path: str, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    shown = [r for r in rows if tokens in r][::-1]  # first config on top
    if not shown:
        print("no configuration ran: no plot")
        return
    names = [r["config"] for r in shown]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    wall = [r[tokens]["ms"] for r in shown]
    axes[0].barh(names, wall, color="tab:blue", label="wall (CUDA events)")
    # GPU kernel time (profiled at the first token count, the one plotted): where it is far below
    # the wall time, the forward waits on the CPU (Python, launches), which a CUDA graph removes.
    gpu = [r.get("gpu_ms") for r in shown]
    axes[0].scatter([g for g in gpu if g], [n for n, g in zip(names, gpu) if g], color="black", marker="|", s=300, label="GPU kernel time", zorder=3)
    steps = [r[tokens].get("steps_ms") for r in shown]
    axes[0].scatter([s for s in steps if s], [n for n, s in zip(names, steps) if s], color="tab:red", marker="D", s=30,
                    label="per step, 28 back to back", zorder=4)
    for y, ms in enumerate(wall):
        axes[0].text(ms, y, f" {ms:.0f}", va="center", fontsize=8)
    # A log scale only where the rows span more than 10x (int4 weight-only takes seconds).
    log_scale = max(wall) > 10 * min(wall)
    if log_scale:
        axes[0].set_xscale("log")
    else:
        axes[0].set_xlim(0, 1.4 * max(wall))  # room for the value labels and the legend
    axes[0].set_xlabel(f"forward latency (ms{', log scale' if log_scale else ''}, lower is better)")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].barh(names, [r[tokens]["peak_gib"] for r in shown], color="tab:orange", label="peak")
    axes[1].barh(names, [r[tokens]["weight_gib"] for r in shown], color="tab:green", label="weights")
    axes[1].set_xlabel("memory (GiB)")
    axes[1].legend()
    fig.suptitle(f"FLUX-sized transformer, {tokens} image + {TEXT_TOKENS} text tokens, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict], tokens: int) -> str:
    """The Markdown table of ``rows`` at ``tokens`` image tokens; speed-ups against bf16 Inductor's
    row, weights against bf16 eager's, where those rows are there.

    Example:
        >>> row = lambda name, ms, steps: {"config": name, 1024: {"ms": ms, "steps_ms": steps, "weight_gib": 11.4, "peak_gib": 12.0, "first_call_s": 9.0}}
        >>> print(table([row("bf16 inductor", 30.0, 28.0), row("svdquant", 25.0, 21.0)], 1024).splitlines()[-1])
        | svdquant | 25.0 | 1.20x | 21.0 (1.33x) | 11.40 | 12.00 | 9.0 | - |
    """
    bf16_inductor = next((r[tokens] for r in rows if r["config"] == "bf16 inductor" and tokens in r), {})
    base, base_steps = bf16_inductor.get("ms"), bf16_inductor.get("steps_ms")
    bf16_w = next((r[tokens]["weight_gib"] for r in rows if r["config"] == "bf16 eager" and tokens in r), None)
    lines = [f"### {tokens} image tokens + {TEXT_TOKENS} text tokens",
             "| config | ms | speed-up vs bf16 Inductor | ms per step, 28 back to back (speed-up) | weights GiB (x bf16) | peak GiB | first call s | layer err median / max |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if tokens not in r:
            lines.append(f"| {r['config']} | " + (f"failed: {r['error'][:80]}" if "error" in r else "not run at this size") + " | | | | | | |")
            continue
        m = r[tokens]
        speed = f"{base / m['ms']:.2f}x" if base else "-"
        steps = m.get("steps_ms")  # results files of earlier runs have none
        steps = "-" if steps is None else f"{steps:.1f}" + (f" ({base_steps / steps:.2f}x)" if base_steps else "")
        wrel = f" ({m['weight_gib'] / bf16_w:.2f}x)" if bf16_w else ""
        err = f"{r['layer_error_median']:.4f} / {r['layer_error_max']:.4f}" if "layer_error_median" in r else "-"
        lines.append(f"| {r['config']} | {m['ms']:.1f} | {speed} | {steps} | {m['weight_gib']:.2f}{wrel} | {m['peak_gib']:.2f} | {m['first_call_s']:.1f} | {err} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs=2, default=[19, 38], metavar=("DOUBLE", "SINGLE"), help="transformer depth (FLUX.1: 19 38)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 1024], help="image tokens (4096 = 1024x1024, 1024 = 512x512)")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--config-timeout", type=float, default=400, help="seconds per configuration's process")
    parser.add_argument("--profile", action="store_true", help="also report each kind of kernel's share of GPU time, and the GPU's idle time before each kernel")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--cache-dir", default=None, help="svdquant disk cache (default: a fresh folder under --out)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="print the table and plot of earlier runs' e2e_results.json files together (a configuration in several: the last file's that measured it)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one configuration in this process, print JSON
    args = parser.parse_args()
    if args.merge:
        runs = [json.load(open(path)) for path in args.merge]
        report(merged_rows(runs), [run["meta"] for run in runs], args.tokens, args.out)
        return
    args.cache_dir = args.cache_dir or os.path.join(args.out, "svdq_cache")
    if args.one:
        print("RESULT " + json.dumps(run_config(args.one, args)))
        return
    os.makedirs(args.out, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "blocks": args.blocks, "command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:])}
    rows = []
    for name in args.configs:
        cmd = [sys.executable, __file__, "--one", name, "--blocks", *map(str, args.blocks), "--tokens", *map(str, args.tokens),
               "--iters", str(args.iters), "--out", args.out, "--cache-dir", args.cache_dir] + (["--profile"] if args.profile else [])
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.config_timeout)
        except subprocess.TimeoutExpired as exc:
            text = [t.decode(errors="replace") if isinstance(t, bytes) else (t or "") for t in (exc.stdout, exc.stderr)]
            proc = subprocess.CompletedProcess(cmd, -9, text[0], text[1] + f"\ntimed out after {args.config_timeout:.0f} s")
        with open(os.path.join(args.out, "e2e_log.txt"), "a") as log:
            log.write(f"==== {name}\n{proc.stdout[-20000:]}\n{proc.stderr[-20000:]}\n")
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if found:
            row = {k if not k.isdigit() else int(k): v for k, v in json.loads(found[-1][7:]).items()}
        else:
            row = {"config": name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        row["process_s"] = time.perf_counter() - start
        rows.append(row)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        # after every configuration, so that a run cut off by a time limit keeps the rows it finished
        with open(os.path.join(args.out, "e2e_results.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    report(rows, [meta], args.tokens, args.out)


def merged_rows(runs: list[dict]) -> list[dict]:
    """The rows of several runs' results files, one per configuration in ``CONFIGS``' order: of a
    configuration measured in several runs, the last run's that measured it (a failed row only
    where no run measured it).

    Example:
        >>> runs = [{"rows": [{"config": "svdquant", "4096": {"ms": 98.0}}]}, {"rows": [{"config": "svdquant", "error": "timed out"}]}]
        >>> merged_rows(runs)
        [{'config': 'svdquant', 4096: {'ms': 98.0}}]
    """
    rows = [row for run in runs for row in run["rows"]]
    latest = {row["config"]: row for row in sorted(rows, key=lambda row: "error" not in row)}  # stable: runs' order kept
    merged = [{k if not k.isdigit() else int(k): v for k, v in row.items()} for row in latest.values()]
    return sorted(merged, key=lambda r: CONFIGS.index(r["config"]) if r["config"] in CONFIGS else len(CONFIGS))


def report(rows: list[dict], metas: list[dict], tokens_list: list[int], out: str) -> None:
    """Print the Markdown tables (and shares of GPU time) and write e2e.png."""
    os.makedirs(out, exist_ok=True)
    plot(rows, tokens_list[0], os.path.join(out, "e2e.png"), metas[0]["device"])
    for meta in metas:
        print(json.dumps(meta))
    for tokens in tokens_list:
        print(table(rows, tokens))
    shares = [(r["config"], r["time_shares"]) for r in rows if "time_shares" in r]
    if shares:
        names = list(shares[0][1])
        print(f"\n### Share of GPU time, {tokens_list[0]} image tokens\n| config | GPU ms per forward | " + " | ".join(names) + " |\n|" + " --- |" * (len(names) + 2))
        for r in rows:
            if "time_shares" in r:
                print(f"| {r['config']} | {r.get('gpu_ms', '-')} | " + " | ".join(f"{r['time_shares'][n]:.0%}" for n in names) + " |")
    for r in rows:
        if r.get("idle_before"):
            print(f"\n### GPU idle before each kernel, {r['config']}: {r['idle_ms']} ms per forward\n| kernel | idle ms per forward | launches | us per launch |\n| --- | --- | --- | --- |")
            for name, ms, launches in r["idle_before"]:
                print(f"| {name} | {ms} | {launches} | {1e3 * ms / max(launches, 1):.1f} |")


if __name__ == "__main__":
    main()
