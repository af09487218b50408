"""An independent spelling of the W4A4 formula for tests: int64 dots, groups as explicit loops."""

import torch

from svdq_compile.numerics import quantize_activations


def w4a4_by_hand(x, weight_q, weight_scales, smooth_inv, lora_down, lora_up, bias, group_size):
    """What ``svdq::w4a4_linear`` must return, computed without sharing the reference's code path."""
    k = x.shape[-1]
    n = weight_q.shape[0]
    x2 = x.reshape(-1, k)
    two_level = weight_scales.dim() == 1
    a_q, a_s = quantize_activations(x2.float() * smooth_inv, group_size, two_level=two_level, fp8=weight_q.dtype == torch.float8_e4m3fn)
    a_q, weight_q = a_q.float().long(), weight_q.float().long()  # int8 or fp8 operands hold small integers
    if two_level:
        main = (a_q @ weight_q.T).float() * a_s[:, None] * weight_scales[None, :]
    else:
        main = torch.zeros(x2.shape[0], n)
        for g in range(k // group_size):
            cols = slice(g * group_size, (g + 1) * group_size)
            dot = (a_q[:, cols] @ weight_q[:, cols].T).float()
            main += dot * a_s[:, g, None] * weight_scales[None, :, g].float()
    lowrank = (x2.float() @ lora_down.float().T).to(x.dtype).float() @ lora_up.float().T
    out = main + lowrank + (bias.float() if bias is not None else 0.0)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
