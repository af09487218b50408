"""Apply a GELU that follows a W4A4 op in the op's GEMM epilogue."""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.nn import functional as F

from .base import SVDQPass, cast_dtype, is_w4a4, traced_value

_GELU_TARGETS = (F.gelu, torch._C._nn.gelu, torch.ops.aten.gelu.default)
_SPLIT_TARGETS = (torch.split, torch.functional.split, torch.Tensor.split)


class GeluEpilogueFusionPass(SVDQPass):
    """Fold ``gelu(y, approximate="tanh")`` into the W4A4 op that makes ``y``, so the GEMM writes
    the activated output and no elementwise kernel reads and writes it again. ``y`` is the op's
    whole output (an MLP's up projection) or one piece of a fused op's output split along the
    features (FLUX's single blocks: the MLP input and q, k, v share one op, and only the MLP piece
    goes through GELU); either way GELU is ``y``'s only reader, and an op takes one GELU range.

    Before::

        y = svdq.w4a4_linear(x, W_q, scales, smooth_inv, lora_down, lora_up, b, 64)
        mlp, q, k, v = torch.split(y, [Nmlp, Nq, Nk, Nv], -1)
        h = torch._C._nn.gelu(mlp, approximate="tanh")

    After::

        y = svdq.w4a4_linear(x, W_q, scales, smooth_inv, lora_down, lora_up, b, 64, gelu_start=0, gelu_end=Nmlp)
        mlp, q, k, v = torch.split(y, [Nmlp, Nq, Nk, Nv], -1)
        h = mlp

    A cast to the dtype ``y`` already has (peft casts a LoRA layer's result back to its dtype) may
    sit between ``y`` and GELU; it stays, as the identity. The exact (erf) GELU is left alone: the
    epilogue computes the tanh approximation only.

    Example:
        >>> g = fx.Graph(); x = g.placeholder("x")
        >>> _ = g.output(g.call_function(F.gelu, (x,), {"approximate": "tanh"}))
        >>> GeluEpilogueFusionPass(provider=None)(g)  # x is no W4A4 output: nothing to fold
        0
    """

    def apply(self, graph: fx.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            if not _is_gelu_tanh(node):
                continue
            source = node.args[0]
            single = isinstance(source, fx.Node) and len(source.users) == 1
            found = _w4a4_columns(_through_noop_cast(source)) if single else None
            if found is None or found[0].kwargs.get("gelu_end", 0) > 0:
                continue  # not a W4A4 output, or its op already applies GELU to other columns
            op, start, end = found
            op.update_kwarg("gelu_start", start)
            op.update_kwarg("gelu_end", end)
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            count += 1
        return count


def _is_gelu_tanh(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _GELU_TARGETS or len(node.args) != 1:
        return False
    return node.kwargs.get("approximate", "none") == "tanh"


def _through_noop_cast(node: fx.Node) -> fx.Node:
    """``y`` when ``node`` is ``y.to(dtype)`` with ``y`` (read by nothing else) already of that
    dtype, else ``node``."""
    dtype = cast_dtype(node)
    source = node.args[0] if dtype is not None else None
    value = traced_value(source)
    if isinstance(value, torch.Tensor) and value.dtype == dtype and len(source.users) == 1:
        return source
    return node


def _w4a4_columns(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """``(op, first column, end column)`` when ``node`` is a W4A4 op's whole output (its width known
    from the traced value) or a piece of that output split along the last dim (the split being the
    output's only reader); else None."""
    if is_w4a4(node):
        value = traced_value(node)
        width = value.shape[-1] if isinstance(value, torch.Tensor) and value.dim() else None
        return (node, 0, width) if isinstance(width, int) else None
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    split, index = node.args
    if not isinstance(split, fx.Node) or split.op != "call_function" or split.target not in _SPLIT_TARGETS or not is_w4a4(split.args[0]) or len(split.args[0].users) != 1:
        return None
    sizes = split.args[1] if len(split.args) > 1 else split.kwargs.get("split_size_or_sections")
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if dim != -1 or not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) for s in sizes):
        return None
    start = sum(sizes[:index])
    return split.args[0], start, start + sizes[index]


__all__ = ["GeluEpilogueFusionPass"]
