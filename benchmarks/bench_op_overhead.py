"""Host (CPU) time per call of the W4A4 op and of its parts, on CUDA, against a bf16 ``torch.mm``.

    python benchmarks/bench_op_overhead.py [--out DIR] [--forward]

Without a CUDA graph a forward costs the larger of its GPU time and the CPU time of issuing it.
This measures the CPU side: each callable runs in loops at a small M (16 tokens, so the GPU work of
a call is shorter than its CPU work and the launch queue never fills), and the time from the first
call to the last call's return, before synchronizing, is the host time (median of 20 loops of 100).
A cProfile of the whole op says where that time goes. ``--forward`` also times a FLUX transformer
of 2 double + 4 single blocks at 1024 image tokens: host ms per forward with bf16 Inductor, with
``backend="svdquant"`` without CUDA graphs (also with its kernels stubbed out, the backend's own
wrapper, and a cProfile) and with its default block CUDA graphs.
Prints a Markdown table; writes overhead.json and the cProfile listings under --out.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import io
import json
import os
import pstats
import time

import torch
import triton

M, K, N, RANK, GROUP = 16, 3072, 3072, 32, 64


@triton.jit
def _empty_kernel(x_ptr):
    pass


def host_us(fn, loops: int = 20, calls: int = 100) -> float:
    """Median over ``loops`` of the host microseconds per call of ``fn`` (no sync inside a loop)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(per_call)[loops // 2]


def profile_listing(fn, calls: int, lines: int = 30) -> str:
    """cProfile of ``calls`` calls of ``fn``, sorted by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(lines)
    return stream.getvalue()


@torch.library.custom_op("svdq_bench::nothing", mutates_args=())
def _nothing(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(1)


@_nothing.register_kernel("cuda")
def _nothing_cuda(x):
    return x.new_empty(1)


_bench_lib = torch.library.Library("svdq_bench", "FRAGMENT")
_bench_lib.define("w4a4_lib(Tensor x, Tensor weight_q, Tensor weight_scales, Tensor smooth_inv, Tensor lora_down, "
                  "Tensor lora_up, Tensor? bias, int group_size) -> Tensor")


def op_rows(out: str) -> list[tuple[str, float]]:
    from svdq_compile import SVDQuantConfig, ops
    from svdq_compile.numerics import pack_weight_operand
    from svdq_compile.kernels.quantize_act_lowrank_down import quantize_act_lowrank_down
    from svdq_compile.kernels.w4a4_gemm import GemmConfig, w4a4_gemm
    from svdq_compile.quantized_linear import QuantizedLinear

    linear = torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16)
    ql = QuantizedLinear.from_linear(linear, SVDQuantConfig(rank=RANK))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    operands = (ql.weight_operand(), ql.scales, ql.smooth_inv, ql.lora_down, ql.lora_up, linear.bias)
    act_q, act_scales, lora_act = quantize_act_lowrank_down(x, ql.smooth_inv, ql.lora_down, GROUP, True)
    packed = pack_weight_operand(operands[0], GROUP, True)
    _bench_lib.impl("w4a4_lib", ops._w4a4_linear_cuda, "CUDA")
    rows = [
        ("empty Triton kernel launch", lambda: _empty_kernel[(1,)](x)),
        ("torch.mm bf16 (cuBLAS)", lambda: torch.mm(x, linear.weight.T)),
        ("check_w4a4_args", lambda: ops.check_w4a4_args(x, *operands, GROUP)),
        ("quantize_act_lowrank_down (2 launches)", lambda: quantize_act_lowrank_down(x, ql.smooth_inv, ql.lora_down, GROUP, True)),
        ("w4a4_gemm (tuned)", lambda: w4a4_gemm(act_q, act_scales, operands[0], ql.scales, lora_act, ql.lora_up, linear.bias, x.dtype)),
        ("w4a4_gemm, persistent TMA tile", lambda: w4a4_gemm(act_q, act_scales, operands[0], ql.scales, lora_act, ql.lora_up, linear.bias, x.dtype,
                                                            GemmConfig(128, 256, 128, 1, 8, 4, persistent=True))),
        ("quantize then w4a4_gemm", lambda: w4a4_gemm(*quantize_act_lowrank_down(x, ql.smooth_inv, ql.lora_down, GROUP, True)[:2], operands[0], ql.scales,
                                                       lora_act, ql.lora_up, linear.bias, x.dtype)),
        ("CUDA implementation, called directly", lambda: ops._w4a4_linear_cuda(x, *operands, GROUP)),
        ("empty custom op (dispatch only)", lambda: torch.ops.svdq_bench.nothing(x)),
        ("same implementation through Library.impl", lambda: torch.ops.svdq_bench.w4a4_lib(x, *operands, GROUP)),
        ("torch.ops.svdq.w4a4_linear", lambda: torch.ops.svdq.w4a4_linear(x, *operands, GROUP)),
        ("torch.ops.svdq.w4a4_linear, packed weight", lambda: torch.ops.svdq.w4a4_linear(x, packed, *operands[1:], GROUP)),
    ]
    with torch.inference_mode():
        results = [(name, host_us(fn)) for name, fn in rows]
        with open(os.path.join(out, "op_profile.txt"), "w") as f:
            f.write(profile_listing(dict(rows)["torch.ops.svdq.w4a4_linear"], 2000))
    return results


def forward_rows(out: str) -> list[tuple[str, float]]:
    """Host ms per forward of a 2 + 4 block FLUX at 1024 image tokens: bf16 Inductor; svdquant
    without CUDA graphs, also with its kernels replaced by empty outputs (what the rest of the
    forward costs) and the backend's per-call wrapper around the compiled block graph; svdquant
    with its default block CUDA graphs."""
    from bench_e2e import build_flux, flux_inputs

    from svdq_compile import backend
    from svdq_compile.kernels import quantize_act_lowrank_down as quantize_module
    from svdq_compile.kernels import w4a4_gemm as gemm_module

    torch._dynamo.config.cache_size_limit = 64
    inputs = flux_inputs(1024)
    rows = []
    wrapper = {"total": 0.0, "inside": 0.0}
    original_call, original_init = backend._RuntimeCall.__call__, backend._RuntimeCall.__init__

    def timed_init(self, compiled, *args):
        def inner(*a):
            start = time.perf_counter()
            try:
                return compiled(*a)
            finally:
                wrapper["inside"] += time.perf_counter() - start
        original_init(self, inner, *args)

    def timed_call(self, *args):
        start = time.perf_counter()
        try:
            return original_call(self, *args)
        finally:
            wrapper["total"] += time.perf_counter() - start

    backend._RuntimeCall.__init__, backend._RuntimeCall.__call__ = timed_init, timed_call
    configs = {"bf16 Inductor": None, "svdquant without CUDA graphs": {"rank": 32, "cuda_graphs": False},
               "svdquant (default: the backend's block CUDA graphs)": {"rank": 32}}
    for name, options in configs.items():
        model = build_flux(2, 4)
        if options is None:
            model.compile_repeated_blocks(fullgraph=True)
        else:
            model.compile_repeated_blocks(backend="svdquant", fullgraph=True, options=options)
        with torch.inference_mode():
            forward = functools.partial(model, **inputs)
            rows.append((f"FLUX 2+4 blocks, 1024 tokens, {name}: host ms per forward", host_us(forward, loops=10, calls=5) / 1e3))
            if options is not None and not options.get("cuda_graphs", True):
                wrapper.update(total=0.0, inside=0.0)
                calls = 20
                for _ in range(calls):
                    forward()
                torch.cuda.synchronize()
                rows.append(("  backend wrapper outside the compiled graph, ms per forward", (wrapper["total"] - wrapper["inside"]) / calls * 1e3))
                with open(os.path.join(out, "forward_profile.txt"), "w") as f:
                    f.write(profile_listing(forward, 20, lines=60))
                quantize, gemm = quantize_module.quantize_act_lowrank_down, gemm_module.w4a4_gemm
                quantize_module.quantize_act_lowrank_down, gemm_module.w4a4_gemm = _empty_quantize, _empty_gemm
                rows.append(("  same, kernels replaced by empty outputs: host ms per forward", host_us(forward, loops=10, calls=5) / 1e3))
                quantize_module.quantize_act_lowrank_down, gemm_module.w4a4_gemm = quantize, gemm
        del model, forward
        torch.cuda.empty_cache()
    return rows


def _empty_quantize(x2d, smooth_inv, lora_down, group_size, two_level, config=None, x_tail=None):
    """``quantize_act_lowrank_down``'s outputs, unwritten: what the forward costs without the kernel."""
    m, k = x2d.shape[0], smooth_inv.shape[0]
    return x2d.new_empty((m, k), dtype=torch.int8), x2d.new_empty(m, dtype=torch.float32), x2d.new_empty((m, lora_down.shape[0]))


def _empty_gemm(act_q, act_scales, weight_q, weight_scales, lora_act, lora_up, bias, out_dtype, config=None, gelu_start=0, gelu_end=0):
    """``w4a4_gemm``'s output, unwritten."""
    return act_q.new_empty((act_q.shape[0], weight_q.shape[0]), dtype=out_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--forward", action="store_true", help="also time compiled 2+4-block FLUX forwards")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = op_rows(args.out)
    if args.forward:
        rows += forward_rows(args.out)
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "shape": {"M": M, "K": K, "N": N, "rank": RANK}}
    with open(os.path.join(args.out, "overhead.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"{meta['date']} {meta['device']} torch {meta['torch']} triton {meta['triton']}, M={M} K={K} N={N} rank {RANK}\n")
    print("| callable | host time |\n|---|---|")
    for name, value in rows:
        unit = "ms" if "ms" in name else "us"
        print(f"| {name} | {value:.1f} {unit} |")


if __name__ == "__main__":
    main()
