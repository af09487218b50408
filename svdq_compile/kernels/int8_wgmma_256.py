"""A 256-wide int8 wgmma for the Gluon GEMM, which Triton's lowering refuses.

Hopper has ``wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8`` (``IGMMA.64x256x32.S8.S8``), but
Triton, 3.6 through 3.9, lowers s8 wgmmas only up to N = 224, so a 256-wide int8 tile issues two
128-wide instructions that each read the A tile. Triton's own fp8 loop, with 256-wide e4m3
instructions, ran 10-15% faster than those 128-wide ones, int8 and fp8 alike, on an H200
(KERNEL_NOTES.md, v12-v13). e4m3 and s8 are both 8-bit K-major operands with
32-bit accumulators in the same registers, so the kernel is built with e4m3 operand types over the
int8 bytes and an f32 accumulator, and a PTX-stage hook renames its wgmmas to s8:

    wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 {...}, a, b, p, 1, 1;
    wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {...}, a, b, p;

(the integer form takes no input scales). The accumulator then holds int32 sums, which the kernel
bit-casts before its epilogue. Only PTX carrying ``MARKER`` (left by ``mark_int8_as_e4m3``) is
touched. Triton 3.6 does not key its compile cache by the hook, so ``check_renamed`` verifies each
compiled kernel before it is trusted.

On an H200 the renamed kernel gave the 128-wide kernel's outputs bit for bit and ran 1-6% faster
at the same tile (KERNEL_NOTES.md, v14): the width was a smaller part of the gap to Triton's fp8
loop than v12 read it to be; most of the rest was the epilogue's stores.
"""

from __future__ import annotations

import re
from typing import Any

import triton
import triton.language as tl
from triton import knobs

MARKER = "svdq: int8 operands typed as e4m3"
# accumulators, A descriptor, B descriptor, scale-d; then the two input scales, which s8 lacks
_FP8_WGMMA = re.compile(r"(wgmma\.mma_async\.sync\.aligned\.m64n\d+k32)\.f32\.e4m3\.e4m3(\s+\{[^}]*\},\s*[^,;{]+,\s*[^,;{]+,\s*[^,;{]+),\s*1,\s*1;")
_S8_WGMMA = "m64n256k32.s32.s8.s8"


@triton.jit
def mark_int8_as_e4m3():
    """Leave ``MARKER`` in the kernel's PTX (an asm comment), so that the hook renames this
    kernel's wgmmas and no other kernel's. (The text repeats ``MARKER``: a jit function reads
    no module strings; tests/test_wgmma_build.py fails if the two drift apart.)"""
    tl.inline_asm_elementwise("mov.u32 $0, 0; // svdq: int8 operands typed as e4m3", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


def rename_fp8_wgmmas(ptx: str) -> str:
    """``ptx`` with every e4m3 wgmma turned into the s8 one, if it carries ``MARKER``.

    Example:
        >>> line = "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 {%r1,%r2}, %rd3, %rd4, %p5, 1, 1;"
        >>> rename_fp8_wgmmas(f"// {MARKER}\\n" + line).splitlines()[1]
        'wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {%r1,%r2}, %rd3, %rd4, %p5;'
        >>> rename_fp8_wgmmas(line) == line  # no marker: another kernel
        True
    """
    if MARKER not in ptx:
        return ptx
    return _FP8_WGMMA.sub(r"\1.s32.s8.s8\2;", ptx)


_installed_over: list[Any] = []  # the hook that was set before ours, once ours is installed


def install_ptx_hook() -> None:
    """Add the rename to Triton's PTX stage (``knobs.runtime.add_stages_inspection_hook``),
    keeping any hook set before it; once per process.

    Example:
        >>> install_ptx_hook(); install_ptx_hook()
        >>> knobs.runtime.add_stages_inspection_hook.__name__
        '_add_rename_stage'
    """
    if _installed_over:
        return
    previous = knobs.runtime.add_stages_inspection_hook
    _installed_over.append(previous)

    def _add_rename_stage(*args: Any) -> Any:
        if not args:  # Triton >= 3.7 asks for a cache key: the compiled code depends on the hook
            key, digest = previous() if previous is not None else ("", "")
            return f"{key}-svdq-int8-as-e4m3-1", f"{digest}-svdq-int8-as-e4m3-1"
        if previous is not None:
            previous(*args)
        stages = args[1]
        make_ptx = stages["ptx"]
        stages["ptx"] = lambda src, metadata: rename_fp8_wgmmas(make_ptx(src, metadata))

    knobs.runtime.add_stages_inspection_hook = _add_rename_stage


def check_renamed(kernel: Any) -> None:
    """Raise unless ``kernel`` (a compiled marked kernel) runs s8 wgmmas, not e4m3 ones: a binary
    compiled or cached without the hook would multiply int8 bytes as fp8.

    Example:
        >>> class Compiled: asm = {"ptx": f"// {MARKER}\\n wgmma.mma_async.sync.aligned.{_S8_WGMMA} ..."}
        >>> check_renamed(Compiled())
    """
    ptx = kernel.asm["ptx"]
    if _S8_WGMMA not in ptx or ".e4m3.e4m3" in ptx:
        raise RuntimeError("w4a4_gemm: the 256-wide int8 kernel was compiled without its PTX rename "
                           "(another Triton stages hook replaced svdq_compile's, or a stale Triton cache entry)")
