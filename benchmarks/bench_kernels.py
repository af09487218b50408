"""W4A4 kernels vs cuBLAS and torch baselines at FLUX linear shapes, on one GPU in one run.

    python benchmarks/bench_kernels.py [--out DIR] [--quick] [--shapes MxNxK ...] [--sweep gemm]

Every path computes one linear layer ``[M, K] -> [M, N]`` in bf16 (rank-32 low-rank branch and bias
where the path has them). Times are CUDA-graph replays (median of 25, after warm-up), so Python
launch overhead is excluded for every path alike, as under torch.compile with CUDA graphs; each
graph cycles through enough copies of the inputs and weights that even the smallest (4-bit)
weights of one cycle exceed 3x L2, so no path reads its operands from L2 left by the previous
call. TOPS counts the main product only: 2 * M * N * K per call.

Paths:
* bf16: ``F.linear(x, W, b)`` (cuBLAS).
* fp8 rowwise: ``torch._scaled_mm`` e4m3 with row/column scales, bias, bf16 out; the activation
  quantization is not included (the GEMM alone, as a ceiling).
* int4 wo: ``torch._weight_int4pack_mm`` (4-bit weights, bf16 activations, group 64), plus bias.
* svdq unfused: quantize kernel (no low-rank part), ``torch._int_mm``, eager rescale, two cuBLAS
  low-rank matmuls, add, bias.
* svdq fused: ``quantize_act_lowrank_down`` + ``w4a4_gemm``, two-level scales, int8 weights in memory.
* svdq pow2: the same in the "int4_pow2" format (power-of-two multipliers, fp8 operands and tensor cores).
* svdq packed: the same with 4-bit packed weights in memory, as the op runs them
  (``ops.gemm_weight_operand``): expanded in the GEMM's K loop up to ``PACKED_GEMM_MAX_M`` tokens,
  by ``unpack_weight`` first above.
* gemm only: ``w4a4_gemm`` alone (two-level, low-rank epilogue and bias), on pre-quantized input;
  gemm only pow2: the same with fp8 operands.
* groups fused: the fused path with float group scales ("int4" format).
And ``quantize_act_lowrank_down`` alone, as a fraction of the measured device copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from svdq_compile import numerics  # noqa: E402
from svdq_compile.kernels import w4a4_gemm as gemm_module  # noqa: E402
from svdq_compile.kernels.quantize_act_lowrank_down import quantize_act_lowrank_down  # noqa: E402
from svdq_compile.ops import gemm_weight_operand  # noqa: E402
from svdq_compile.kernels.w4a4_gemm import w4a4_gemm, w4a4_gemm_reference  # noqa: E402

M_VALUES = [1, 77, 256, 4096, 4608]
NK_VALUES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]
RANK = 32
GROUP = 64
PATHS = ["bf16", "fp8 rowwise", "int4 wo", "svdq unfused", "svdq fused", "svdq pow2", "svdq packed", "gemm only", "gemm only pow2", "groups fused"]


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def time_rotating(make_call, copies: int) -> float:
    """Median ms per call, from CUDA-graph replays of calls cycling through ``copies`` input sets."""
    calls = [make_call(i) for i in range(copies)]
    for call in calls:  # compile, tune, allocate workspaces outside the graph
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in calls:
        call()
    end.record()
    torch.cuda.synchronize()
    per_call = max(start.elapsed_time(end) / copies, 1e-3)
    # At least one full cycle, at least ~2 ms of work per replay, at most 4000 calls in the graph.
    cycles = max(1, min(math.ceil(2.0 / (per_call * copies)), 4000 // copies))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(cycles):
            for call in calls:
                call()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(25):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (cycles * copies))
    del graph
    return sorted(times)[len(times) // 2]


def build_layer(n: int, k: int, gen: torch.Generator) -> dict:
    """One quantized layer in every format the paths need (random weights, rank-32 factors)."""
    w = torch.randn(n, k, generator=gen, device="cuda") / k**0.5
    layer = {"w_bf16": w.bfloat16(), "bias": torch.randn(n, generator=gen, device="cuda").bfloat16()}
    q, s1, mult = numerics.quantize_weight(w, GROUP, True, torch.bfloat16)
    layer["wq2"], layer["ws2"] = numerics.expand_2level(q, mult, GROUP), s1
    q, s1, mult = numerics.quantize_weight(w, GROUP, True, torch.bfloat16, pow2=True)
    layer["wq_pow2"], layer["ws_pow2"] = numerics.expand_2level(q, mult, GROUP, fp8=True), s1
    qg, sg, _ = numerics.quantize_weight(w, GROUP, False, torch.bfloat16)
    layer["wqg"], layer["wsg"] = qg, sg
    layer["wq2_packed"] = numerics.pack_weight_operand(layer["wq2"], GROUP, True)
    layer["lora_down"] = (torch.randn(RANK, k, generator=gen, device="cuda") / k**0.5).bfloat16()
    layer["lora_up"] = (torch.randn(n, RANK, generator=gen, device="cuda") / 8).bfloat16()
    layer["smooth_inv"] = torch.ones(k, device="cuda")
    amax = w.abs().amax(1, keepdim=True)
    layer["w_fp8"] = (w / (amax / 448)).to(torch.float8_e4m3fn)
    layer["w_fp8_scale"] = (amax / 448).float().T.contiguous()  # [1, N]
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen, device="cuda")
    layer["w_int4"] = torch._convert_weight_to_int4pack(packed, 8)
    layer["w_int4_sz"] = torch.rand(k // GROUP, n, 2, generator=gen, device="cuda").bfloat16()
    return layer


def make_paths(m: int, layer: dict, x: torch.Tensor) -> dict:
    """Closures for every path on one (layer, input) set."""
    pre_q, pre_s, pre_la = quantize_act_lowrank_down(x, layer["smooth_inv"], layer["lora_down"], GROUP, True)
    pre_q8, pre_s8, _ = quantize_act_lowrank_down(x, layer["smooth_inv"], layer["lora_down"], GROUP, True, fp8=True)
    x_fp8_scale = (x.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12)
    x_fp8 = (x.float() / x_fp8_scale).to(torch.float8_e4m3fn)
    no_lora = layer["lora_down"][:0]
    pad_rows = max(0, 17 - m)  # torch._int_mm needs more than 16 rows

    def unfused():
        a_q, a_s, _ = quantize_act_lowrank_down(x, layer["smooth_inv"], no_lora, GROUP, True)
        acc = torch._int_mm(F.pad(a_q, (0, 0, 0, pad_rows)) if pad_rows else a_q, layer["wq2"].T)[:m]
        low = (x @ layer["lora_down"].T) @ layer["lora_up"].T
        return (acc.float() * a_s[:, None] * layer["ws2"][None, :] + low + layer["bias"]).bfloat16()

    def fused(two_level: bool, packed: bool = False, pow2: bool = False):
        def run():
            a_q, a_s, la = quantize_act_lowrank_down(x, layer["smooth_inv"], layer["lora_down"], GROUP, two_level, fp8=pow2)
            wq, ws = (layer["wq2"], layer["ws2"]) if two_level else (layer["wqg"], layer["wsg"])
            if pow2:
                wq, ws = layer["wq_pow2"], layer["ws_pow2"]
            if packed:
                wq = gemm_weight_operand(layer["wq2_packed"], m, x.shape[1], GROUP, True)
            return w4a4_gemm(a_q, a_s, wq, ws, la, layer["lora_up"], layer["bias"], torch.bfloat16)
        return run

    return {
        "bf16": lambda: F.linear(x, layer["w_bf16"], layer["bias"]),
        "fp8 rowwise": lambda: torch._scaled_mm(x_fp8, layer["w_fp8"].T, scale_a=x_fp8_scale, scale_b=layer["w_fp8_scale"],
                                                bias=layer["bias"], out_dtype=torch.bfloat16, use_fast_accum=True),
        "int4 wo": lambda: torch._weight_int4pack_mm(x, layer["w_int4"], GROUP, layer["w_int4_sz"]) + layer["bias"],
        "svdq unfused": unfused,
        "svdq fused": fused(True),
        "svdq pow2": fused(True, pow2=True),
        "svdq packed": fused(True, packed=True),
        "gemm only": lambda: w4a4_gemm(pre_q, pre_s, layer["wq2"], layer["ws2"], pre_la, layer["lora_up"], layer["bias"], torch.bfloat16),
        "gemm only pow2": lambda: w4a4_gemm(pre_q8, pre_s8, layer["wq_pow2"], layer["ws_pow2"], pre_la, layer["lora_up"], layer["bias"], torch.bfloat16),
        "groups fused": fused(False),
        "quantize": lambda: quantize_act_lowrank_down(x, layer["smooth_inv"], layer["lora_down"], GROUP, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON, log and PNG")
    parser.add_argument("--quick", action="store_true", help="two shapes only (a smoke test)")
    parser.add_argument("--sweep", choices=["quantize", "gemm", "fusions", "all"],
                        help="first time launch configs one by one (quantize, gemm), or the GELU and cat folds against their unfolded form (fusions)")
    parser.add_argument("--shapes", nargs="+", metavar="MxNxK", help="GEMM shapes of the table and the gemm sweep (default: FLUX's)")
    args = parser.parse_args()
    chosen = [tuple(map(int, shape.split("x"))) for shape in args.shapes or []]
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    bandwidth = copy_bandwidth()
    meta = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "copy_bandwidth_TBps": bandwidth / 1e12, "rank": RANK, "group": GROUP,
    }
    print(json.dumps(meta), flush=True)
    if args.sweep in ("quantize", "all"):
        sweep_quantize(gen, bandwidth, l2_bytes)
    if args.sweep in ("gemm", "all"):
        sweep_configs(gen, chosen or SWEEP_SHAPES)
    if args.sweep in ("fusions", "all"):
        sweep_fusions(gen, l2_bytes)
    shapes = [(m, n, k) for (n, k) in NK_VALUES for m in M_VALUES]
    if args.quick:
        shapes = [(77, 3072, 3072), (4096, 12288, 3072)]
    shapes = chosen or shapes
    rows = []
    for n, k in dict.fromkeys((n, k) for _, n, k in shapes):
        layers = None
        for m in [m for m, n2, k2 in shapes if (n2, k2) == (n, k)]:
            if layers is None:
                layer = build_layer(n, k, gen)
                # Enough copies that the smallest weights (4-bit, N * K / 2 bytes) of one cycle fill 3x L2.
                copies = max(1, min(32, math.ceil(3 * l2_bytes / (n * k // 2))))
                layers = [layer] + [build_layer(n, k, gen) for _ in range(copies - 1)]
            xs = [(torch.randn(m, k, generator=gen, device="cuda") * 3).bfloat16() for _ in layers]
            paths = [make_paths(m, layer, x) for layer, x in zip(layers, xs)]
            row = {"M": m, "N": n, "K": k}
            for name in PATHS + ["quantize"]:
                try:
                    row[name] = time_rotating(lambda i, name=name: paths[i][name], len(paths))
                except Exception as exc:  # a baseline torch lacks on this build: report, go on
                    print(f"  {name} at {m}x{n}x{k} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    row[name] = float("nan")
            q_bytes = m * k * 2 + m * k + m * 4 + m * RANK * 2 + RANK * k * 2
            row["quantize_pct_copy_bw"] = 100 * q_bytes / (row["quantize"] * 1e-3) / bandwidth
            rows.append(row)
            flops = 2 * m * n * k
            print(f"{m}x{n}x{k}: " + ", ".join(f"{p} {flops / (row[p] * 1e-3) / 1e12:.0f}" for p in PATHS)
                  + f" TOPS; quantize {row['quantize'] * 1e3:.1f} us = {row['quantize_pct_copy_bw']:.0f}% copy bw", flush=True)
        del layers
        torch.cuda.empty_cache()
    meta["configs"] = {str(key): vars(cfg) for key, cfg in gemm_module.tuned_configs().items()}
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print_table(meta, rows)
    plot(rows, os.path.join(args.out, "bench_kernels.png"))


SWEEP_SHAPES = [(4096, 12288, 3072), (4608, 3072, 3072), (4096, 3072, 12288), (4608, 21504, 3072), (4608, 3072, 15360), (512, 3072, 3072), (256, 3072, 15360), (77, 12288, 3072), (1, 3072, 15360)]
SWEEP_EXTRA = [
    gemm_module.GemmConfig(128, 256, 128, 1, 8, 4, group_m=16),
    gemm_module.GemmConfig(256, 128, 128, 1, 8, 4),
    gemm_module.GemmConfig(128, 256, 64, 1, 8, 5),
    gemm_module.GemmConfig(64, 256, 128, 1, 4, 4),
    gemm_module.GemmConfig(16, 128, 256, 4, 4, 4),
    gemm_module.GemmConfig(32, 64, 256, 4, 4, 5),
    gemm_module.GemmConfig(64, 64, 256, 2, 4, 4),
    gemm_module.GemmConfig(128, 256, 128, 1, 8, 3, persistent=True),
    gemm_module.GemmConfig(128, 256, 128, 1, 8, 4, persistent=True),
    gemm_module.GemmConfig(256, 128, 128, 1, 8, 3, persistent=True),
    gemm_module.GemmConfig(128, 128, 128, 1, 8, 4, persistent=True),
    gemm_module.GemmConfig(128, 256, 64, 1, 8, 5, persistent=True),
    gemm_module.GemmConfig(128, 128, 128, 1, 4, 4, persistent=True),
    gemm_module.GemmConfig(128, 256, 64, 1, 8, 6, wgmma=True),
    gemm_module.GemmConfig(256, 128, 64, 1, 8, 6, wgmma=True),
    gemm_module.GemmConfig(256, 128, 64, 1, 8, 6, persistent=True, wgmma=True),
    gemm_module.GemmConfig(128, 128, 128, 1, 8, 4, wgmma=True),
]


def sweep_configs(gen: torch.Generator, shapes: list[tuple[int, int, int]]) -> None:
    """TOPS of w4a4_gemm (two-level, rank 32, bias) for every candidate and some extra tile configs,
    with int8 and with fp8 ("int4_pow2") operands."""
    for m, n, k in shapes:
        layer = build_layer(n, k, gen)
        x = (torch.randn(m, k, generator=gen, device="cuda") * 3).bfloat16()
        results = []
        for pow2, wq, ws in ((False, layer["wq2"], layer["ws2"]), (True, layer["wq_pow2"], layer["ws_pow2"])):
            a_q, a_s, la = quantize_act_lowrank_down(x, layer["smooth_inv"], layer["lora_down"], GROUP, True, fp8=pow2)
            expected = w4a4_gemm_reference(a_q, a_s, wq, ws, la, layer["lora_up"], layer["bias"], torch.bfloat16).float()
            for cfg in gemm_module._candidate_configs(m, True, GROUP, wgmma=gemm_module._wgmma_runs(x.device, torch.bfloat16)) + SWEEP_EXTRA:
                call = lambda cfg=cfg: w4a4_gemm(a_q, a_s, wq, ws, la, layer["lora_up"], layer["bias"], torch.bfloat16, config=cfg)
                try:
                    error = ((call().float() - expected).norm() / expected.norm()).item()
                    ms = do_bench(call, warmup=10, rep=50, return_mode="median")
                except Exception as exc:
                    results.append(f"{a_q.dtype} {cfg}: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                verdict = "" if error < 1e-2 else f"  WRONG (relative error {error:.3g})"
                results.append(f"{2 * m * n * k / (ms * 1e-3) / 1e12:7.0f} TOPS {ms * 1e3:8.1f} us  {a_q.dtype} {cfg}{verdict}")
        print(f"sweep {m}x{n}x{k}:\n  " + "\n  ".join(results), flush=True)
        del layer


def sweep_fusions(gen: torch.Generator, l2_bytes: int) -> None:
    """What the GELU and cat passes change, at FLUX's shapes (median us of CUDA-graph replays):

    * GELU (tanh): the GEMM alone; the GEMM then ``F.gelu`` on its GELU columns (one elementwise
      kernel, as Inductor runs it); the GEMM with GELU in its epilogue.
    * proj_out's input: ``torch.cat`` of the attention output and the MLP piece, then the quantize
      launches; the quantize launches reading both pieces in place.
    """
    gelu_shapes = [(4096, 12288, 3072, (0, 12288)), (512, 12288, 3072, (0, 12288)), (4608, 21504, 3072, (0, 12288))]
    for m, n, k, (start, end) in gelu_shapes:
        layer = build_layer(n, k, gen)
        xs = [(torch.randn(m, k, generator=gen, device="cuda") * 3).bfloat16() for _ in range(4)]
        pre = [quantize_act_lowrank_down(x, layer["smooth_inv"], layer["lora_down"], GROUP, True) for x in xs]

        def gemm(i, gelu=(0, 0)):
            a_q, a_s, la = pre[i]
            return w4a4_gemm(a_q, a_s, layer["wq2"], layer["ws2"], la, layer["lora_up"], layer["bias"], torch.bfloat16,
                             gelu_start=gelu[0], gelu_end=gelu[1])

        def gemm_then_gelu(i):
            y = gemm(i)
            y[:, start:end] = F.gelu(y[:, start:end], approximate="tanh")
            return y

        times = {name: time_rotating(lambda i, f=f: (lambda: f(i)), len(xs)) * 1e3
                 for name, f in (("gemm", gemm), ("gemm + gelu kernel", gemm_then_gelu), ("gelu epilogue", lambda i: gemm(i, (start, end))))}
        print(f"fusions GELU {m}x{n}x{k} cols {start}:{end}: " + ", ".join(f"{name} {us:.1f} us" for name, us in times.items()), flush=True)
        del layer
    m, k_head, k_tail = 4608, 3072, 12288
    k = k_head + k_tail
    smooth, down = torch.ones(k, device="cuda"), (torch.randn(RANK, k, generator=gen, device="cuda") / k**0.5).bfloat16()
    copies = max(2, min(16, math.ceil(3 * l2_bytes / (m * k * 2))))
    heads = [(torch.randn(m, k_head, generator=gen, device="cuda") * 3).bfloat16() for _ in range(copies)]
    fused_outputs = [(torch.randn(m, 21504, generator=gen, device="cuda") * 3).bfloat16() for _ in range(copies)]
    tails = [out[:, :k_tail] for out in fused_outputs]  # the MLP columns of the joint q/k/v/MLP output
    cat_us = time_rotating(lambda i: (lambda: quantize_act_lowrank_down(torch.cat((heads[i], tails[i]), 1), smooth, down, GROUP, True)), copies) * 1e3
    pieces_us = time_rotating(lambda i: (lambda: quantize_act_lowrank_down(heads[i], smooth, down, GROUP, True, x_tail=tails[i])), copies) * 1e3
    print(f"fusions cat {m}x({k_head}+{k_tail}): cat + quantize {cat_us:.1f} us, two-piece quantize {pieces_us:.1f} us", flush=True)


QUANTIZE_SWEEP = [(8, 512, 4, 3, 0), (4, 512, 4, 3, 0), (16, 256, 4, 4, 0), (8, 1024, 8, 3, 0), (4, 1024, 4, 3, 0), (2, 1024, 4, 3, 0), (16, 512, 8, 3, 0)]


def sweep_quantize(gen: torch.Generator, bandwidth: float, l2_bytes: int) -> None:
    """% of copy bandwidth of the quantize kernel per launch shape: rank 32 and 0, both formats, and
    rank 256 (a LoRA-heavy layer)."""
    from svdq_compile.kernels.quantize_act_lowrank_down import QuantizeConfig

    for m, k in ((77, 3072), (256, 15360), (4096, 3072), (4608, 15360)):
        xs = [(torch.randn(m, k, generator=gen, device="cuda") * 3).bfloat16() for _ in range(max(1, min(32, math.ceil(3 * l2_bytes / (m * k * 2)))))]
        down = (torch.randn(256, k, generator=gen, device="cuda") / k**0.5).bfloat16()
        ones = torch.ones(k, device="cuda")
        results = []
        for rank, two_level in ((RANK, True), (0, True), (RANK, False), (256, True)):
            for cfg in QUANTIZE_SWEEP:
                q_bytes = m * k * 3 + m * 4 + m * rank * 2 + rank * k * 2
                try:
                    ms = time_rotating(lambda i: lambda: quantize_act_lowrank_down(xs[i], ones, down[:rank], GROUP, two_level, QuantizeConfig(*cfg)), len(xs))
                except Exception as exc:
                    results.append(f"rank {rank} 2level {two_level} {cfg}: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                results.append(f"{100 * q_bytes / (ms * 1e-3) / bandwidth:5.1f}% {ms * 1e3:7.1f} us rank {rank} 2level {two_level} {cfg}")
        print(f"quantize sweep {m}x{k}:\n  " + "\n  ".join(results), flush=True)


def print_table(meta: dict, rows: list[dict]) -> None:
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
          f"copy bandwidth {meta['copy_bandwidth_TBps']:.2f} TB/s; rank {RANK}, group {GROUP}, bf16 in/out")
    print("TOPS (x bf16)\n")
    print("| M | N | K | " + " | ".join(PATHS) + " | quantize us (% copy bw) |")
    print("|" + "---|" * (len(PATHS) + 4))
    for row in rows:
        flops = 2 * row["M"] * row["N"] * row["K"]
        cells = [f"{flops / (row[p] * 1e-3) / 1e12:.0f} ({row['bf16'] / row[p]:.2f}x)" for p in PATHS]
        print(f"| {row['M']} | {row['N']} | {row['K']} | " + " | ".join(cells)
              + f" | {row['quantize'] * 1e3:.1f} ({row['quantize_pct_copy_bw']:.0f}%) |")


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    labels = [f"{r['M']}x{r['N']}x{r['K']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.6), 5))
    width = 0.8 / len(PATHS)
    for i, name in enumerate(PATHS):
        ax.bar([j + i * width for j in range(len(rows))], [r["bf16"] / r[name] for r in rows], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 for j in range(len(rows))], labels, rotation=75, fontsize=7)
    ax.set_ylabel("speed-up over cuBLAS bf16")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
