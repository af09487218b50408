"""Let a W4A4 op read a two-piece concatenated input in place."""

from __future__ import annotations

import torch
from torch import fx

from .base import SVDQPass, is_w4a4, traced_value

_CAT_TARGETS = (torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)


class CatInputFusionPass(SVDQPass):
    """Give a W4A4 op whose input is ``torch.cat([a, b], -1)`` the two pieces instead, so its
    quantize kernel reads them where they are and the concatenation is never written. FLUX's single
    blocks feed ``proj_out`` the attention output next to the MLP activations: a 4608 x 15360 copy
    per block at 1024 x 1024.

    Before::

        h = torch.cat([attn, mlp], dim=2)          # [B, S, 3072 + 12288]
        y = svdq.w4a4_linear(h, W_q, scales, smooth_inv, lora_down, lora_up, b, 64)

    After::

        y = svdq.w4a4_linear(attn, W_q, scales, smooth_inv, lora_down, lora_up, b, 64, x_tail=mlp)

    Only a concatenation of two tensors of one dtype (``cat`` would promote mixed ones) along the
    last dim that nothing else reads is taken.

    Example:
        >>> g = fx.Graph(); a, b = g.placeholder("a"), g.placeholder("b")
        >>> _ = g.output(g.call_function(torch.cat, ([a, b], -1)))
        >>> CatInputFusionPass(provider=None)(g)  # no W4A4 op reads it
        0
    """

    def apply(self, graph: fx.Graph) -> int:
        count = 0
        for op in [n for n in graph.nodes if is_w4a4(n)]:
            cat = op.args[0]
            if op.kwargs.get("x_tail") is not None or len(cat.users) != 1:
                continue
            pieces = _last_dim_pair(cat)
            if pieces is None:
                continue
            op.update_arg(0, pieces[0])
            op.update_kwarg("x_tail", pieces[1])
            count += 1
        return count


def _last_dim_pair(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(a, b)`` when ``node`` is ``cat([a, b], dim)`` with dim the last one and a, b of one dtype
    (known from their traced values), else None."""
    if node.op != "call_function" or node.target not in _CAT_TARGETS or not node.args:
        return None
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    value, *pieces = (traced_value(n) for n in (node, *tensors))
    if not all(isinstance(v, torch.Tensor) for v in (value, *pieces)) or pieces[0].dtype != pieces[1].dtype:
        return None
    if dim not in (-1, value.dim() - 1):
        return None
    return tensors[0], tensors[1]


__all__ = ["CatInputFusionPass"]
