"""Fuse a linear and its peft / diffusers LoRA adapters into one W4A4 op."""

from __future__ import annotations

import logging
import numbers
import operator

import torch
from torch import fx
from torch.nn import functional as F

from ..lora import MAX_FUSED_RANK, prepare_lora_layers
from .base import SVDQPass, cast_dtype, copy_meta, emit_w4a4, hoist_before, is_add, is_mul, is_w4a4, linear_parts, traced_value

log = logging.getLogger("svdq_compile")

_DROPOUT_TARGETS = (F.dropout, torch.dropout, torch.nn.functional.dropout)


class LoraLinearFusionPass(SVDQPass):
    """Fold LoRA adapters (as peft traces them, one or several) into the low-rank branch of the
    base linear's W4A4 op; the base weight is quantized once, the adapters stay 16-bit.

    Before (two adapters; ``dropout`` is absent when peft's ``lora_dropout`` is 0)::

        y0 = linear(x, W, b)
        d1 = dropout(x, p, False);  a1 = linear(d1, A1);  b1 = linear(a1, B1);  y1 = y0 + b1 * s1
        d2 = dropout(x, p, False);  a2 = linear(d2, A2);  b2 = linear(a2, B2);  y  = y1 + b2 * s2

    After::

        down = concat_lowrank([lora_down, A1.type_as(lora_down), A2.type_as(lora_down)], 0)
        up   = concat_lowrank([lora_up, (B1 * s1).type_as(lora_up), (B2 * s2).type_as(lora_up)], 1)
        y = svdq.w4a4_linear(x, W_q, scales, smooth_inv, down, up, b, 64)

    A linear that ``SharedInputFusionPass`` ran in a group (q/k/v reading one x) is a piece of the
    group's op; its adapters go into that op, their up factors at the member's rows (``place_rows``,
    zeros at the other members' rows), so the group stays one op with one quantization of x::

        y = svdq.w4a4_linear(x, W_qkv, ..., lora_down, lora_up, b, 64);  q, k, v = split(y, [Nq, Nk, Nv])
        q1 = q + linear(linear(dropout(x), Aq), Bq) * sq

    becomes::

        down = concat_lowrank([lora_down, Aq.type_as(lora_down)], 0)
        up   = concat_lowrank([lora_up, place_rows((Bq * sq).type_as(lora_up), 0, Nq + Nk + Nv)], 1)
        y = svdq.w4a4_linear(x, W_qkv, ..., down, up, b, 64);  q1, k, v = split(y, [Nq, Nk, Nv])

    Adapters in another dtype than the model (peft's fp32 adapters on a bf16 model trace as
    ``d = dropout(x.to(float32))``) are matched too; the fused branch then runs in x's dtype.

    ``A`` is appended without the smoothing factor: ``lora_down`` already has ``1/lambda`` folded
    in, so the whole low-rank branch reads the raw ``x``, exactly what the adapter reads. The
    adapters are ordinary graph inputs, so changing their values (``set_adapters`` strength,
    another LoRA of the same rank) needs no recompile and no re-quantization. A dropout in
    training mode (or anything else between ``x`` and ``A``) is not matched: that LoRA stays a
    16-bit branch and ``LinearToW4A4Pass`` still quantizes the base linear. So do the adapters past
    ``MAX_FUSED_RANK`` total rank (SVD rank + adapter ranks, in adapter order), with a logged reason.

    The pass prepares the compiled module's peft LoRA layers
    (``svdq_compile.lora.prepare_lora_layers``): strengths become in-place tensors, because a Python
    float is a graph constant that Dynamo guards on (every change would recompile), and ``merge``
    (``fuse_lora``) appends to the quantized low-rank factors instead of the 16-bit weight.

    Example:
        >>> import operator
        >>> g = fx.Graph(); x, w, a, b = (g.placeholder(n) for n in "xwab")
        >>> y = g.call_function(F.linear, (x, w))
        >>> lora = g.call_function(F.linear, (g.call_function(F.linear, (x, a)), b))
        >>> _ = g.output(g.call_function(operator.add, (y, g.call_function(operator.mul, (lora, 0.5)))))
        >>> adapters, adds = _adapters_after(y, x)  # what the pass matches: [(A, B, scale)], their adds
        >>> adapters == [(a, b, 0.5)], adds[-1].target is operator.add
        (True, True)
    """

    def apply(self, graph: fx.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            if is_w4a4(node):  # made by SharedInputFusionPass
                count += _fold_into_group(graph, node)
                continue
            parts = linear_parts(node)
            if parts is None or node.graph is not graph:
                continue
            x, weight, bias = parts
            adapters, adds = _adapters_after(node, x)
            if not adapters:
                continue
            quant = self.provider.quantized_nodes(graph, weight)
            if quant is None:
                continue
            fitting = _fitting_adapters(quant.lora_down, adapters, _source_name(weight))
            if not fitting:
                continue
            adapters, last = adapters[:fitting], adds[fitting - 1]
            with graph.inserting_before(last):
                fused = emit_w4a4(graph, x, quant, bias, *_with_adapters(graph, quant.lora_down, quant.lora_up, adapters))
            copy_meta(last, fused)
            last.replace_all_uses_with(fused)
            count += 1
        _prepare_traced_module()  # also when no adapter is in the graph: a fused or disabled LoRA can be unfused or enabled later
        return count


def _group_members(op: fx.Node) -> tuple[int, list[tuple[fx.Node, int, list[tuple[fx.Node, fx.Node, object]], list[fx.Node]]]]:
    """For a shared-input op (``torch.split`` of its output into members): its output rows, and
    ``(member output, first row, adapters, their adds)`` of each member with LoRA adapters added
    onto its output, in row order."""
    if len(op.users) != 1:
        return 0, []
    (split,) = op.users
    if split.op != "call_function" or split.target is not torch.split or not isinstance(split.args[1], (list, tuple)):
        return 0, []
    offsets = [sum(split.args[1][:i]) for i in range(len(split.args[1]))]
    members = []
    for piece in split.users:
        if piece.target is operator.getitem and isinstance(piece.args[1], int):
            adapters, adds = _adapters_after(piece, op.args[0])
            if adapters:
                members.append((piece, offsets[piece.args[1]], adapters, adds))
    return sum(split.args[1]), sorted(members, key=lambda member: member[1])


def _fold_into_group(graph: fx.Graph, op: fx.Node) -> int:
    """Append the adapters of a shared-input ``op``'s members to its low-rank factors (up factors at
    their member's rows) and take their adds out; returns how many members' adapters were folded."""
    rows, members = _group_members(op)
    if not members:
        return 0
    lora_down, lora_up = op.args[4], op.args[5]
    fitting = _fitting_adapters(lora_down, [a for _, _, adapters, _ in members for a in adapters], _source_name(op.args[1]))
    folded = []  # (member output, its row offset, its adapters that fit, the add of the last one)
    for piece, offset, adapters, adds in members:
        take = min(fitting, len(adapters))
        if take:
            folded.append((piece, offset, adapters[:take], adds[take - 1]))
        fitting -= take
    if not folded:
        return 0
    inputs = [n for _, _, adapters, _ in folded for a, b, s in adapters for n in (a, b, s) if isinstance(n, fx.Node)]
    if not hoist_before(op, inputs):
        log.info("svdquant: LoRA adapters %s stay a 16-bit branch: a factor or strength of theirs is computed after their shared-input op",
                 [_source_name(b) for _, _, adapters, _ in folded for _, b, _ in adapters])
        return 0
    with graph.inserting_before(op):
        down, up = _with_adapters(graph, lora_down, lora_up, [a for _, _, adapters, _ in folded for a in adapters],
                                  [(offset, rows) for _, offset, adapters, _ in folded for _ in adapters])
    op.update_arg(4, down)
    op.update_arg(5, up)
    for piece, _, _, last in folded:
        last.replace_all_uses_with(piece)
    return len(folded)


def _with_adapters(graph: fx.Graph, lora_down: fx.Node, lora_up: fx.Node, adapters: list[tuple[fx.Node, fx.Node, object]],
                   placements: list[tuple[int, int]] | None = None) -> tuple[fx.Node, fx.Node]:
    """Nodes of the low-rank factors with the adapters appended: ``concat_lowrank([lora_down, A...], 0)``
    and ``concat_lowrank([lora_up, s * B...], 1)`` (an opaque op, not torch.cat: see
    ops.concat_lowrank), each A and s * B in the dtype of the factor it joins. ``placements``:
    per adapter, its member's first row and the op's rows, where ``place_rows`` puts its s * B."""
    downs = [graph.call_method("type_as", (a, lora_down)) for a, _, _ in adapters]
    ups = [graph.call_method("type_as", (_scaled(graph, b, s), lora_up)) for _, b, s in adapters]
    if placements is not None:
        ups = [graph.call_function(torch.ops.svdq.place_rows.default, (up, first, rows)) for up, (first, rows) in zip(ups, placements)]
    return (graph.call_function(torch.ops.svdq.concat_lowrank.default, ([lora_down, *downs], 0)),
            graph.call_function(torch.ops.svdq.concat_lowrank.default, ([lora_up, *ups], 1)))


def _fitting_adapters(lora_down: fx.Node, adapters: list[tuple[fx.Node, fx.Node, object]], name: str) -> int:
    """How many of ``adapters``, in order, the op's low-rank branch can take; logs those left out."""
    fitting = _fitting_prefix(_rank(lora_down), [_rank(a) for a, _, _ in adapters])
    if fitting < len(adapters):
        log.info("svdquant: %s: LoRA adapters %s stay a 16-bit branch: total low-rank rank %d > %d (the fused maximum)",
                 name, [_source_name(b) for _, b, _ in adapters[fitting:]], _rank(lora_down) + sum(_rank(a) for a, _, _ in adapters), MAX_FUSED_RANK)
    return fitting


# Modules whose LoRA layers get prepared once Dynamo has finished compiling them: Dynamo builds
# its guards after the backend returns, from the values then in the module, so a float strength
# must still be a float until that is done.
_PENDING: list[torch.nn.Module] = []


def _prepare_traced_module() -> None:
    """Queue ``prepare_lora_layers`` for the module Dynamo is compiling (the one owning the adapters)."""
    try:
        root = torch._dynamo.symbolic_convert.InstructionTranslator.current_tx().f_locals.get("self")
        handler = torch._dynamo.callback_handler
    except Exception:  # private API, or not under Dynamo (Inductor's pass, a hand-made graph)
        return
    if not isinstance(root, torch.nn.Module):
        return
    if not _PENDING and _prepare_pending not in handler.end_callbacks:
        handler.register_end_callback(_prepare_pending)
    _PENDING.append(root)


def _prepare_pending(_args: object = None) -> None:
    """Dynamo's end-of-compile callback: prepare the queued modules' LoRA layers."""
    while _PENDING:
        if converted := prepare_lora_layers(_PENDING.pop()):
            log.info("svdquant: LoRA strengths of %d layers were Python floats, which the graph bakes in (each change would recompile); "
                     "they are in-place tensors now, so a graph that read them recompiles once at its next call. Calling "
                     "svdq_compile.lora.prepare_lora_layers(model) after loading LoRAs and before compiling avoids that.", converted)


def _rank(factor: fx.Node) -> int:
    """Rows of a low-rank down factor ([R, K]) from its traced example value (0 when the graph
    carries no values, as in hand-built graphs: the rank limit then cannot apply)."""
    value = traced_value(factor)
    return int(value.shape[0]) if isinstance(value, torch.Tensor) else 0


def _fitting_prefix(base_rank: int, adapter_ranks: list[int]) -> int:
    """How many adapters, in order, fit on top of ``base_rank`` within ``MAX_FUSED_RANK``.

    Example:
        >>> _fitting_prefix(32, [64, 128, 64])
        2
    """
    total, count = base_rank, 0
    for rank in adapter_ranks:
        if total + rank > MAX_FUSED_RANK:
            break
        total, count = total + rank, count + 1
    return count


def _source_name(node: fx.Node) -> str:
    """The user-code name of a graph input (Dynamo's source), else the node's name."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return name or node.name


def _scaled(graph: fx.Graph, b: fx.Node, scale: object) -> fx.Node:
    return b if isinstance(scale, numbers.Number) and scale == 1 else graph.call_function(torch.mul, (b, scale))


def _adapters_after(base: fx.Node, x: fx.Node) -> tuple[list[tuple[fx.Node, fx.Node, object]], list[fx.Node]]:
    """The ``(A, B, scale)`` adapters added onto ``base`` one after another, and the add of each."""
    adapters, adds = [], []
    current = base
    while len(current.users) == 1:
        (add,) = current.users
        if not is_add(add):
            break
        other = add.args[1] if add.args[0] is current else add.args[0]
        adapter = _match_adapter(other, x) if isinstance(other, fx.Node) else None
        if adapter is None:
            break
        adapters.append(adapter)
        adds.append(add)
        current = add
    return adapters, adds


def _match_adapter(node: fx.Node, x: fx.Node) -> tuple[fx.Node, fx.Node, object] | None:
    """Match ``linear(linear(dropout?(x), A), B) * scale`` (every step used once) -> (A, B, scale)."""
    if len(node.users) != 1:
        return None
    scale: object = 1.0
    if is_mul(node):
        lhs, rhs = node.args
        up, scale = (lhs, rhs) if isinstance(lhs, fx.Node) and linear_parts(lhs) else (rhs, lhs)
        if not isinstance(up, fx.Node) or len(up.users) != 1:
            return None
        scale_value = scale.meta.get("example_value") if isinstance(scale, fx.Node) else scale
        if isinstance(scale_value, torch.Tensor) and scale_value.numel() != 1:
            return None  # a per-channel product is not a LoRA scale (under dynamic=True a float scale is a SymFloat input)
    else:
        up = node
    up_parts = linear_parts(up)
    if up_parts is None or up_parts[2] is not None:
        return None
    hidden, b_weight, _ = up_parts
    if len(hidden.users) != 1:
        return None
    down_parts = linear_parts(hidden)
    if down_parts is None or down_parts[2] is not None:
        return None
    source, a_weight, _ = down_parts
    if _is_eval_dropout(source) and len(source.users) == 1:
        source = source.args[0]
    if source is not x and not _is_cast_of(source, x):
        return None
    return a_weight, b_weight, scale


def _is_cast_of(node: fx.Node, x: fx.Node) -> bool:
    """``x.to(dtype)``: peft casts the input to the adapter's dtype (fp32 adapters on a bf16 model)."""
    return cast_dtype(node) is not None and node.args[0] is x


def _is_eval_dropout(node: fx.Node) -> bool:
    """A dropout that is the identity (inference): ``training`` False or ``p`` 0."""
    if node.op != "call_function" or node.target not in _DROPOUT_TARGETS:
        return False
    names = ("input", "p", "training", "inplace")
    args = dict(zip(names, node.args)) | dict(node.kwargs)
    return args.get("training", True) is False or args.get("p", 0.5) == 0


__all__ = ["LoraLinearFusionPass"]
