"""The svdquant backend on a FLUX-shaped transformer (random bf16 weights) on one GPU.

For each setting: bf16 Inductor vs backend="svdquant" on the same model. It reports compile time
(first call: for svdquant this includes quantizing every linear), time spent quantizing, weight
memory before and after (``torch.cuda.memory_allocated``; svdquant frees the 16-bit weights of
quantized layers after the first call), forward latency (median of CUDA-event timings), and the
output's relative difference from bf16. A deep random-weight stack amplifies quantization error
(see REFERENCE.md), so that last number is a sanity check, not a quality figure.

Settings (4096 image + 512 text tokens, batch 1, i.e. a 1024x1024 FLUX image):
  * "regional 19+38": the full FLUX depth with diffusers' compile_repeated_blocks, the cold-start
    path users take.
  * "full graph 4+8": 4 double + 8 single blocks, torch.compile(fullgraph=True); runs only if at
    most half of --budget is used by then.

Usage: PYTHONPATH=. python benchmarks/bench_backend_gpu.py --out $OUT [--budget 420]
(the backend is passed as a callable, so no installed entry point is needed)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import time
from pathlib import Path

import torch

IMG_TOKENS, TXT_TOKENS = 4096, 512


def build(double: int, single: int) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # create weights in bf16 directly: 12B fp32 would not fit
    try:
        with torch.device("cuda"):
            model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def inputs() -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    side = int(IMG_TOKENS**0.5)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(IMG_TOKENS, 1), grid.float()], 1).cuda()
    bf16 = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    return dict(
        hidden_states=torch.randn(1, IMG_TOKENS, 64, **bf16),
        encoder_hidden_states=torch.randn(1, TXT_TOKENS, 4096, **bf16),
        pooled_projections=torch.randn(1, 768, **bf16),
        timestep=torch.tensor([0.5], device="cuda", dtype=torch.bfloat16),
        guidance=torch.tensor([3.5], device="cuda", dtype=torch.bfloat16),
        img_ids=img_ids,
        txt_ids=torch.zeros(TXT_TOKENS, 3, device="cuda"),
        return_dict=False,
    )


def latency_ms(fn, runs: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def first_call(fn) -> tuple[torch.Tensor, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def measure(name: str, double: int, single: int, regional: bool) -> dict:
    from svdq_compile import backend as svdq_backend

    model = build(double, single)
    gc.collect()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    x = inputs()
    row = {"setting": name, "double": double, "single": single, "regional": regional, "weights_bf16_gib": round(weights_gib, 2)}
    with torch.no_grad():
        if regional:
            model.compile_repeated_blocks(fullgraph=True)
            run = lambda: model(**x)[0]  # noqa: E731
        else:
            compiled = torch.compile(model, fullgraph=True)
            run = lambda: compiled(**x)[0]  # noqa: E731
        ref, row["bf16_compile_s"] = first_call(run)
        row["bf16_ms"] = round(latency_ms(run), 2)
        torch._dynamo.reset()
        for block in model.modules():  # undo regional compilation (Module.compile wraps _call_impl)
            if getattr(block, "_compiled_call_impl", None) is not None:
                block._compiled_call_impl = None

        options = {"cache_dir": ""}  # cold: every layer quantized in this process
        start_summaries = len(svdq_backend.recent_summaries)
        if regional:
            model.compile_repeated_blocks(backend=svdq_backend.svdquant_backend, fullgraph=True, options=options)
            run = lambda: model(**x)[0]  # noqa: E731
        else:
            compiled = torch.compile(model, backend=svdq_backend.svdquant_backend, fullgraph=True, options=options)
            run = lambda: compiled(**x)[0]  # noqa: E731
        out, row["svdq_first_call_s"] = first_call(run)
        summaries = list(svdq_backend.recent_summaries)[start_summaries:]
        entries = [e for p in model.parameters() for e in svdq_backend.quantized_entries(p).values()]
        row["layers_quantized"] = len(entries)
        row["quantize_s"] = round(sum(e.seconds for e in entries), 1)
        row["inductor_compile_s"] = round(sum(s.compile_seconds for s in summaries), 1)
        gc.collect()
        torch.cuda.empty_cache()
        row["weights_after_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        row["quantized_operands_gib"] = round(sum(e.nbytes() for e in entries) / 2**30, 2)
        row["svdq_ms"] = round(latency_ms(run), 2)
        row["rel_diff_vs_bf16"] = round((torch.linalg.vector_norm((out - ref).float()) / torch.linalg.vector_norm(ref.float())).item(), 4)
        row["bf16_compile_s"] = round(row["bf16_compile_s"], 1)
        row["svdq_first_call_s"] = round(row["svdq_first_call_s"], 1)
    del model, x, ref, out, run
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return row


def layer_check() -> dict:
    """One FLUX-sized linear on CUDA through the backend vs QuantizedLinear (Triton kernels)."""
    from svdq_compile import QuantizedLinear, SVDQuantConfig
    from svdq_compile.backend import svdquant_backend

    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 12288, device="cuda", dtype=torch.bfloat16)
    lin2 = torch.nn.Linear(3072, 12288, device="cuda", dtype=torch.bfloat16)
    lin2.load_state_dict(lin.state_dict())  # before compiling: the backend frees lin's weight after its first call
    x = torch.randn(2, 512, 3072, device="cuda", dtype=torch.bfloat16)
    x[..., :8] *= 20
    with torch.no_grad():
        ref = QuantizedLinear.from_linear(lin, SVDQuantConfig(cache_dir=""))(x).float()
        fp = lin(x).float()
        out = torch.compile(lin, backend=svdquant_backend, options={"cache_dir": ""})(x).float()
    err = lambda a, b: (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()  # noqa: E731
    result = {"backend_vs_quantizedlinear": err(out, ref), "backend_vs_bf16": err(out, fp)}
    # mode="reduce-overhead": CUDA graphs over the op, weights freed after the first call
    backend = functools.partial(svdquant_backend, options={"cache_dir": ""})
    compiled = torch.compile(lin2, backend=backend, mode="reduce-overhead")
    with torch.no_grad():
        outs = [compiled(x).float().clone() for _ in range(4)]
    result["reduce_overhead_vs_quantizedlinear"] = max(err(o, ref) for o in outs)
    result["reduce_overhead_weight_freed"] = lin2.weight.untyped_storage().nbytes() == 0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_backend_out")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; the second setting runs only if at most half are used")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    try:
        results["layer_check"] = layer_check()
    except Exception as exc:  # report it and still measure
        results["layer_check"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    settings = [("regional 19+38", 19, 38, True), ("full graph 4+8", 4, 8, False)]
    for i, (name, double, single, regional) in enumerate(settings):
        if i and time.perf_counter() - start > args.budget * 0.5:
            results["rows"].append({"setting": name, "skipped": f"not enough time left ({time.perf_counter() - start:.0f} s used)"})
            continue
        try:
            results["rows"].append(measure(name, double, single, regional))
        except Exception as exc:  # keep what was measured so far
            results["rows"].append({"setting": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        (out / "bench_backend_gpu.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["layer_check"]))
    cols = ["setting", "weights_bf16_gib", "weights_after_gib", "quantized_operands_gib", "layers_quantized", "quantize_s", "inductor_compile_s", "svdq_first_call_s", "bf16_compile_s", "bf16_ms", "svdq_ms", "rel_diff_vs_bf16"]
    print(" | ".join(cols))
    for row in results["rows"]:
        print(" | ".join(str(row.get(c, row.get("error", row.get("skipped", "")))) for c in cols))


if __name__ == "__main__":
    main()
