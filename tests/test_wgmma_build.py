"""The Gluon W4A4 kernel built for an H100 (sm_90) on any machine, GPU or not.

Gluon's API moves between Triton releases (the GPU machine has 3.6, CI a newer one), so CI checks
that the kernel still compiles, down to the cubin, and that its main loop still keeps one wgmma in
flight, which is why it exists (KERNEL_NOTES.md, v11). Its numbers are checked on a GPU:
tests/test_kernels_gpu.py::test_w4a4_gemm_wgmma.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Runs in a fresh interpreter: a kernel module imported under TRITON_INTERPRET (as the CPU tests
# do) holds interpreter functions that the Gluon compiler cannot call.
BUILD = r"""
import json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from svdq_compile.kernels import int8_wgmma_256, w4a4_gemm as gk, w4a4_gemm_wgmma as wg

int8_wgmma_256.install_ptx_hook()
# One binary per tile shape and instruction width: a persistent config differs only in its grid.
configs = {(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, c.n256): c for c in gk._candidate_configs(4096, True, 64, wgmma=True) if c.wgmma}
results = {}
for i, cfg in enumerate(configs.values()):
    for operand in ("i8", "fp8e4nv")[: 2 if i == 0 or cfg.n256 else 1]:  # fp8 once per width: the same loop
        int8_as_e4m3 = cfg.n256 and operand == "i8"
        typed = "fp8e4nv" if int8_as_e4m3 else operand
        name = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}{' n256' if cfg.n256 else ''} {operand}"
        # The first build is checked in full; two more only for their shared memory: the widest
        # low-rank chunk (64), and an fp32 output (stored from the accumulator layout).
        for block_r, out in ((32, torch.bfloat16), (64, torch.bfloat16), (32, torch.float32)):
            (a_shared, w_shared), layouts = wg.wgmma_layouts(cfg, block_r, torch.bfloat16, torch.int8 if typed == "i8" else torch.float8_e4m3fn, out)
            signature = {"a_desc": f"tensordesc<{typed}[{cfg.block_m}, {cfg.block_k}],{a_shared!r}>",
                         "w_desc": f"tensordesc<{typed}[{cfg.block_n}, {cfg.block_k}],{w_shared!r}>"}
            signature.update(sa_ptr="*fp32", sw_ptr="*fp32", la_ptr="*bf16", lu_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16" if out == torch.bfloat16 else "*fp32",
                             M="i32", N="i32", K="i32", R="i32", gelu_start="i32", gelu_end="i32", num_programs="i32")
            constexprs = dict(ACC_DTYPE=gl.int32 if typed == "i8" else gl.float32, HAS_BIAS=True, GELU=True, BLOCK_R=block_r,
                              GROUP_M=cfg.group_m, STAGES=cfg.num_stages, INT8_AS_E4M3=int8_as_e4m3, **layouts)
            signature.update(dict.fromkeys(constexprs, "constexpr"))
            kernel = triton.compile(GluonASTSource(wg._w4a4_gemm_wgmma_kernel, signature, constexprs),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
            if name not in results:
                if int8_as_e4m3:
                    int8_wgmma_256.check_renamed(kernel)
                results[name] = {
                    "waits": [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", kernel.asm["ttgir"])],
                    "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k\d+\.\w+\.\w+\.\w+)", kernel.asm["ptx"]))),
                    "cubin_bytes": len(kernel.asm["cubin"]),
                    "shared": [],
                }
            results[name]["shared"].append(kernel.metadata.shared)
            if operand != "i8":
                break  # the fp8 build shares the int8 one's buffers
print(json.dumps(results))
"""


def test_wgmma_kernel_builds_for_sm90_keeping_one_wgmma_in_flight():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    # three 128-wide tile shapes with int8, one with fp8; the 256-wide one with both
    assert len(results) == 6, results
    for name, built in results.items():
        # In the K loop: wait until only the newest wgmma is pending; after it: until none is.
        assert built["waits"] == [1, 0], (name, built)
        width = 256 if " n256 " in name else 128
        operand_types = "s32.s8.s8" if name.endswith("i8") else "f32.e4m3.e4m3"
        main_loop = [shape for shape in built["wgmma"] if shape.endswith(("s32.s8.s8", "f32.e4m3.e4m3"))]
        # int8 at N = 256 is built as e4m3 and renamed in the PTX (kernels/int8_wgmma_256.py)
        assert main_loop == [f"m64n{width}k32.{operand_types}"], (name, built)
        assert f"m64n{width}k16.f32.bf16.bf16" in built["wgmma"], (name, built)  # the low-rank dot
        assert built["cubin_bytes"] > 0
        # An H100's (and H200's) most shared memory per block: 227 KiB. The four-stage configs
        # fit only because lora_up's chunk reuses a stage (w4a4_gemm, LU_IN_STAGE).
        assert 0 < max(built["shared"]) <= 227 * 1024, (name, built["shared"])


E4M3_WGMMA = "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 {%r10,%r11}, %rd1, %rd2, %p3, 1, 1;"
BF16_WGMMA = "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%r20,%r21}, {%r1,%r2}, %rd4, %p5, 1, 1, 0;"


def test_int8_wgmma_rename_touches_only_the_marked_kernels_8_bit_wgmmas():
    """The PTX rename turns e4m3 wgmmas into s8 ones (without the input scales s8 lacks) in a
    kernel carrying the marker, and leaves the low-rank bf16 wgmma and unmarked kernels alone."""
    from svdq_compile.kernels.int8_wgmma_256 import MARKER, rename_fp8_wgmmas

    marked = f"\t// begin inline asm\n\tmov.u32 %r1, 0; // {MARKER}\n" + "\n".join([E4M3_WGMMA, BF16_WGMMA, E4M3_WGMMA.replace("%p3", "%p7")])
    lines = rename_fp8_wgmmas(marked).splitlines()
    assert lines[2] == "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {%r10,%r11}, %rd1, %rd2, %p3;"
    assert lines[3] == BF16_WGMMA
    assert lines[4] == "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {%r10,%r11}, %rd1, %rd2, %p7;"
    assert rename_fp8_wgmmas(E4M3_WGMMA + "\n" + BF16_WGMMA) == E4M3_WGMMA + "\n" + BF16_WGMMA


def test_int8_wgmma_hook_keeps_an_earlier_hook_and_keys_the_cache(monkeypatch):
    """Installed over another stages hook, ours runs that one too and wraps the PTX stage it left;
    asked for a cache key (Triton >= 3.7), it extends that hook's key."""
    from triton import knobs

    from svdq_compile.kernels import int8_wgmma_256

    calls = []

    def earlier(*args):
        if not args:
            return "earlier-key", "earlier-hash"
        calls.append(args[4])
        stages = args[1]
        make_ptx = stages["ptx"]
        stages["ptx"] = lambda src, metadata: make_ptx(src, metadata) + "\n// earlier"

    monkeypatch.setattr(int8_wgmma_256, "_installed_over", [])
    monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", earlier)
    int8_wgmma_256.install_ptx_hook()
    hook = knobs.runtime.add_stages_inspection_hook
    stages = {"ptx": lambda src, metadata: src}
    hook(None, stages, None, None, 90)
    assert calls == [90]
    ptx = stages["ptx"](f"// {int8_wgmma_256.MARKER}\n{E4M3_WGMMA}", {})
    assert ".s32.s8.s8" in ptx and ptx.endswith("// earlier")
    key, digest = hook()
    assert key.startswith("earlier-key") and key != "earlier-key" and digest.startswith("earlier-hash")
