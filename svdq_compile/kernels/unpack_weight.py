"""Expand a packed 4-bit weight operand to the 8-bit operand the W4A4 GEMM reads.

``unpack_weight(packed, k, group_size, two_level)`` returns [N, K] equal to
``numerics.unpack_weight_operand`` bit for bit: two's-complement nibbles (element 2j in the low
nibble), times the group's multiplier in the two-level format (int8), or times 2 to the group's
exponent nibble for a packed "int4_pow2" operand (float8_e4m3fn, which holds those values exactly).

Why a separate pass instead of unpacking in the GEMM's main loop: on Hopper the int8 tensor-core
loop runs at ~1000-1170 TOPS on int8 operands but 340-620 TOPS when it unpacks nibbles itself
(REFERENCE.md section 2), and our own unpacking GEMMs reached at most 81% of the speed of
expanding first (KERNEL_NOTES.md v15, v16). Expanding one layer's weight just before its GEMM
into a short-lived buffer costs one read of the packed bytes and one 8-bit write (about 1.5 bytes
per weight), while the weights rest in memory at 4 bits. Small M is the exception: there the GEMM
waits on reading the weight, not on its tensor cores, and ``w4a4_gemm`` expands a packed
"int4_2level" weight's tiles itself (``expand_int4_tile``; ``ops.gemm_weight_operand`` chooses).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..numerics import packed_pow2, packed_weight_columns, unpack_weight_operand


@triton.jit
def signed_nibbles(byte):
    """The two int4 values of each packed byte, sign-extended to int32: ``(low, high)``, the
    elements 2j and 2j + 1 of a row whose byte j this is.

    Example (in a kernel): ``low, high = signed_nibbles(tl.load(byte_ptrs))``
    """
    byte = byte.to(tl.int32)
    return ((byte & 0xF) ^ 8) - 8, ((byte >> 4) ^ 8) - 8


@triton.jit
def expand_int4_tile(byte, mult, GROUP: tl.constexpr):
    """Packed bytes [BN, BK / 2] (element 2j in the low nibble of byte j) times each group's
    multiplier [BN, BK / GROUP]: the int32 values ``q * m`` [BN, BK], value by value. For the tiles
    a kernel keeps in registers (the small-M GEMM on packed weights, the "int4_pow2" expansion).

    Example (in a kernel): ``w = expand_int4_tile(tl.load(nibble_ptrs), tl.load(mult_ptrs), 64).to(tl.int8)``
    """
    BLOCK_N: tl.constexpr = byte.shape[0]
    BLOCK_K: tl.constexpr = 2 * byte.shape[1]
    low, high = signed_nibbles(byte)
    values = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
    return tl.reshape(tl.reshape(values, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * mult[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _unpack_weight_kernel(
    packed_ptr, out_ptr, N, K, PACKED_COLS,
    GROUP: tl.constexpr, TWO_LEVEL: tl.constexpr, POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None] * PACKED_COLS
    byte = tl.load(packed_ptr + rows + offs_b[None, :], mask=mask_n[:, None] & (offs_b < K // 2)[None, :], other=0)
    offs_g = tl.program_id(1) * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)
    mask_g = mask_n[:, None] & (offs_g < K // GROUP)[None, :]
    if POW2:
        # group g's exponent: nibble g % 2 of byte g // 2
        exponent = tl.load(packed_ptr + rows + K // 2 + offs_g[None, :] // 2, mask=mask_g, other=0).to(tl.int32)
        values = expand_int4_tile(byte, 1 << ((exponent >> (4 * (offs_g % 2))[None, :]) & 0xF), GROUP)
        # through fp32, where q * 2^e is exact, to e4m3, which holds it exactly too
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], values.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Four int8 values per 32-bit word, byte-parallel: two packed bytes [b0, b1] spread to one
        # nibble per byte, [lo b0, hi b0, lo b1, hi b1] (the output order), in offset binary q + 8
        # (0..15). One multiply-add per word then gives (q + 8) m + 128 - 8 m = q m + 128 in every
        # byte: at most 240 for multipliers m in 1..16 (split_2level's range), so no carry crosses
        # bytes; flipping bit 7 makes it the signed byte q m. out_ptr is the int8 output viewed as
        # int32 words. 12-19% faster than value by value at FLUX's weights (KERNEL_NOTES.md v16).
        pairs = tl.split(tl.reshape(byte, (BLOCK_N, BLOCK_K // 4, 2)))
        spread = pairs[0].to(tl.uint32) | (pairs[1].to(tl.uint32) << 16)
        nibbles = ((spread | (spread << 4)) & 0x0F0F0F0F) ^ 0x08080808
        if TWO_LEVEL:
            mult = tl.load(packed_ptr + rows + K // 2 + offs_g[None, :], mask=mask_g, other=0).to(tl.uint32)
            mult = tl.reshape(tl.broadcast_to(mult[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP // 4)), (BLOCK_N, BLOCK_K // 4))
        else:
            mult = 1
        words = (nibbles * mult + (128 - 8 * mult) * 0x01010101) ^ 0x80808080
        offs_w = tl.program_id(1) * (BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)
        mask = mask_n[:, None] & (offs_w < K // 4)[None, :]
        tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * (K // 4) + offs_w[None, :], words.to(tl.int32, bitcast=True), mask=mask)


def unpack_weight(packed: Tensor, k: int, group_size: int, two_level: bool) -> Tensor:
    """The 8-bit [N, K] GEMM operand of a ``pack_weight_operand`` weight, in one launch: int8, or
    float8_e4m3fn for a packed "int4_pow2" operand (``numerics.packed_pow2``, by its width).

    Args:
        packed: uint8 [N, numerics.packed_weight_columns(k, group_size, two_level[, pow2])].
        k: in_features K (a multiple of group_size).
        group_size: power of two in 16..256.
        two_level: the two-level formats ("int4_2level", "int4_pow2"), else float groups ("int4").

    Example:
        >>> from svdq_compile.numerics import pack_weight_operand
        >>> w = torch.randint(-8, 8, (3, 128), dtype=torch.int8)
        >>> torch.equal(unpack_weight(pack_weight_operand(w, 64, False), 128, 64, False), w)
        True
    """
    n = packed.shape[0]
    pow2 = two_level and packed.dim() == 2 and packed_pow2(packed.shape[1], k, group_size)
    columns = packed_weight_columns(k, group_size, two_level, pow2)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != columns:
        raise ValueError(f"unpack_weight: packed must be uint8 [N, {columns}] for K = {k}, "
                         f"group_size = {group_size}, two_level = {two_level}; got {packed.dtype} {tuple(packed.shape)}")
    if group_size not in (16, 32, 64, 128, 256) or k % group_size:
        raise ValueError(f"unpack_weight: group_size must be a power of two in 16..256 dividing K = {k}, got {group_size}")
    out = torch.empty((n, k), dtype=torch.float8_e4m3fn if pow2 else torch.int8, device=packed.device)
    if n == 0 or k == 0:
        return out
    # 16 x 512 was among the fastest word-parallel shapes at FLUX's weights on an H200
    # (KERNEL_NOTES.md v16); the int4_pow2 path keeps the 16 x 256 it was measured with.
    block_k = max(256 if pow2 else 512, group_size)
    block_n = 16
    _unpack_weight_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        packed.contiguous(), out if pow2 else out.view(torch.int32), n, k, packed.shape[1],
        GROUP=group_size, TWO_LEVEL=two_level, POW2=pow2, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


def unpack_weight_reference(packed: Tensor, k: int, group_size: int, two_level: bool) -> Tensor:
    """What ``unpack_weight`` computes, in plain PyTorch (``numerics.unpack_weight_operand``).

    Example:
        >>> packed = torch.cat((torch.full((1, 32), 0xF3, dtype=torch.uint8), torch.tensor([[16]], dtype=torch.uint8)), 1)
        >>> unpack_weight_reference(packed, 64, 64, True)[0, :2].tolist()  # nibbles 3 and -1, times 16
        [48, -16]
    """
    return unpack_weight_operand(packed, k, group_size, two_level)
