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
from svdq_compile.kernels import w4a4_gemm as gk

# One binary per tile shape: a persistent config differs only in its grid.
configs = {(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages): c for c in gk._candidate_configs(4096, True, 64, wgmma=True) if c.wgmma}
results = {}
for i, cfg in enumerate(configs.values()):
    for operand in ("i8", "fp8e4nv")[: 2 if i == 0 else 1]:  # fp8 once: the same loop
        (a_shared, w_shared), layouts = gk._wgmma_layouts(cfg, 32, torch.bfloat16, torch.int8 if operand == "i8" else torch.float8_e4m3fn)
        signature = {"a_desc": f"tensordesc<{operand}[{cfg.block_m}, {cfg.block_k}],{a_shared!r}>",
                     "w_desc": f"tensordesc<{operand}[{cfg.block_n}, {cfg.block_k}],{w_shared!r}>"}
        signature.update(sa_ptr="*fp32", sw_ptr="*fp32", la_ptr="*bf16", lu_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16",
                         M="i32", N="i32", K="i32", R="i32", gelu_start="i32", gelu_end="i32", num_programs="i32")
        constexprs = dict(ACC_DTYPE=gl.int32 if operand == "i8" else gl.float32, HAS_BIAS=True, GELU=True, BLOCK_R=32,
                          GROUP_M=cfg.group_m, STAGES=cfg.num_stages, **layouts)
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        kernel = triton.compile(GluonASTSource(gk._w4a4_gemm_wgmma_kernel, signature, constexprs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
        results[f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} {operand}"] = {
            "waits": [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", kernel.asm["ttgir"])],
            "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k\d+\.\w+\.\w+\.\w+)", kernel.asm["ptx"]))),
            "cubin_bytes": len(kernel.asm["cubin"]),
        }
print(json.dumps(results))
"""


def test_wgmma_kernel_builds_for_sm90_keeping_one_wgmma_in_flight():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 4, results  # three tile shapes with int8, one with fp8
    for name, built in results.items():
        # In the K loop: wait until only the newest wgmma is pending; after it: until none is.
        assert built["waits"] == [1, 0], (name, built)
        operand_types = "s32.s8.s8" if name.endswith("i8") else "f32.e4m3.e4m3"
        assert any(shape.endswith(operand_types) for shape in built["wgmma"]), (name, built)
        assert any(shape.endswith("f32.bf16.bf16") for shape in built["wgmma"]), (name, built)  # the low-rank dot
        assert built["cubin_bytes"] > 0
