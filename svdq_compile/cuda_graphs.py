"""Replay the calls of a compiled graph as CUDA graphs: one per set of weights and input shapes.

An uncaptured W4A4 linear costs about 0.2 ms of host time (three Triton launches and their
argument handling) against tens of microseconds of GPU time at 512x512, so a FLUX forward is
bound by Python, not by the GPU (benchmarks/RESULTS.md). Inductor's CUDA graphs
(``mode="reduce-overhead"``) work for a whole compiled model, but not under diffusers' regional
compilation, where one graph serves every block and the blocks hand each other their outputs.

``GraphReplay`` wraps such a graph's callable. A call whose tensors are all on one GPU, outside
autograd and outside another capture, is keyed by the addresses of its parameters and quantized
operands (one key per block: the weights differ) and the shapes of its other tensors. The second
call with those weights and shapes captures the graph (the first ran it eagerly: kernels are tuned
and weights freed by then); later calls replay it.

Activations are handed from block to block without copies. A replay writes its outputs into a set
of output buffers and returns them (aliases, not copies). Where the compiled graph takes the buffers
as arguments (``write_outputs_into_buffers``), the kernels that compute the outputs store into them,
and outputs that view one tensor are returned as views of one buffer; otherwise the capture copies
each output in. A later call that passes such a buffer or view (the next block reading the previous
block's output) is captured reading it in place. Any other
tensor is copied into an input buffer before the replay, once per chain of blocks: a block that
reads its predecessor's output is passed the tensors the chain's first block was (FLUX's timestep
embedding and rotary tables), and an input buffer that holds a tensor unchanged since (its version
counts in-place changes) is not copied into again. A compiled graph that writes into its inputs
runs uncaptured: its replays would write the input buffers, not the caller's tensors.

A set of output buffers is busy while anything but the set holds one of its storages (the returned
alias, a view of it: the storage's use count says so), and a replay writes only a free set: an
output the caller keeps (a U-Net skip connection) is never overwritten; the call writes another
set instead, captured for it once. Two sets serve a chain of blocks, alternately.

All captures share one memory pool for their temporaries: it holds one block's, not one per block.
Captures with the same activation shapes share input buffers and output sets, which live outside
the pool (a graph captured earlier may use pool memory freed since, and its replays would write
there). A capture is dropped when its weights die (the model was deleted), and the buffers and the
pool with the last one.
"""

from __future__ import annotations

import logging
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, fx, nn
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger("svdq_compile")

# Captures per compiled graph, activation shapes (each with its own buffers), and output sets per
# shape; past any, new calls run uncaptured, so sweeping many resolutions, or keeping every
# block's output, does not grow memory without bound.
MAX_GRAPHS = 1024
MAX_SHAPES = 16
MAX_OUTPUT_SETS = 64


@dataclass(frozen=True)
class BufferedOutputs:
    """How a graph rewritten by ``write_outputs_into_buffers`` hands its outputs over: it writes
    ``buffers`` (shape, stride, dtype of each: one per tensor its outputs are or view), and output
    i is ``views[i]``, (buffer, shape, stride, storage offset). Outputs that view one tensor (FLUX's
    single blocks return the text and image rows of one) stay views of one buffer.

    Example:
        >>> split = BufferedOutputs(buffers=(((6, 2), (2, 1), torch.float32),), views=((0, (2, 2), (2, 1), 0), (0, (4, 2), (2, 1), 4)))
        >>> [tuple(t.shape) for t in split.outputs(split.allocate(torch.device("cpu")))]
        [(2, 2), (4, 2)]
    """

    buffers: tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], ...]
    views: tuple[tuple[int, tuple[int, ...], tuple[int, ...], int], ...]

    def allocate(self, device: torch.device) -> list[Tensor]:
        """New buffers on ``device``."""
        return [torch.empty_strided(shape, stride, dtype=dtype, device=device) for shape, stride, dtype in self.buffers]

    def outputs(self, buffers: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The outputs, as views of ``buffers``."""
        return tuple(buffers[b].as_strided(shape, stride, offset) for b, shape, stride, offset in self.views)


class _OutputSet:
    """Output buffers that one replay writes and returns; busy while anything else holds one.

    Example:
        >>> outputs = _OutputSet([torch.zeros(3)])
        >>> kept = outputs.tensors[0].detach(); outputs.busy()
        True
        >>> view = kept[1:]; del kept; outputs.busy()  # a view holds the storage too
        True
        >>> del view; outputs.busy()
        False
    """

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors
        self._storages = [StorageWeakRef(t.untyped_storage()) for t in tensors]
        # The use counts while only this set holds the storages (the tensors and the storages'
        # Python objects count); any alias or view made later adds one.
        self._own = [torch._C._storage_Use_Count(s.cdata) for s in self._storages]

    def busy(self) -> bool:
        return any(torch._C._storage_Use_Count(s.cdata) > own for s, own in zip(self._storages, self._own))


class _InputBuffer:
    """An input buffer that captures read, and which tensor it holds a copy of.

    Example:
        >>> buffer, temb = _InputBuffer(torch.zeros(3)), torch.ones(3)
        >>> buffer.fill(temb, chained=False); buffer.fill(temb, chained=True)  # the second copies nothing
        True
        False
        >>> _ = temb.add_(1); buffer.fill(temb, chained=True)  # changed in place: its version says so
        True
    """

    def __init__(self, like: Tensor) -> None:
        self.tensor = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device)
        self._holds: tuple[weakref.ref, int, int] | None = None  # the tensor copied last, its version and address

    def fill(self, arg: Tensor, chained: bool) -> bool:
        """Copy ``arg`` in unless this call continues a chain of blocks and the buffer already holds
        ``arg`` unchanged; True when it copied. Inference tensors keep no version: always copied.
        The skip is kept within a chain of blocks, where no other code writes the tensors the
        blocks share, so one written without a version change (another CUDA graph's output, say)
        is copied again at the next chain's first block."""
        held = None if arg.is_inference() else (arg._version, arg.data_ptr())
        if chained and held is not None and self._holds is not None and self._holds[0]() is arg and self._holds[1:] == held:
            return False
        self.tensor.copy_(arg)
        self._holds = None if held is None else (weakref.ref(arg), *held)
        return True


@dataclass
class _Buffers:
    """Buffers shared by the captures of one activation signature: one input buffer per activation
    argument (for calls that copy it in), and the output sets."""

    inputs: list[_InputBuffer]
    output_sets: list[_OutputSet] = field(default_factory=list)


@dataclass
class _Capture:
    """One captured call: its graph, where it reads and writes, how to rebuild its outputs."""

    graph: torch.cuda.CUDAGraph
    copied: tuple[tuple[int, _InputBuffer], ...]  # (argument position, input buffer) for each copied argument
    output_set: _OutputSet
    outputs: list[Any]  # the call's outputs with each tensor replaced by its index in output_set
    as_tuple: bool


@dataclass(frozen=True, eq=False)
class _Plan:
    """Where a call's arguments go, by position. Dynamo guards the types of a compiled graph's
    inputs, so a plan is made once per tuple of argument types and serves every call with them:
    the capture key is then a few C-level passes over the arguments, not a Python loop of checks
    per argument (a FLUX block passes about 110; that loop took 0.12-0.16 ms of host time per call
    on the H200 machine's host, as long as the rest of a replay).

    Parameters keep their address and shape (Dynamo guards their shapes), so an address names
    one. The quantized operands are keyed by shape too: Dynamo does not see them, and a replaced
    one (a LoRA of another rank) may reuse an address."""

    parameters: tuple[int, ...]  # read in place, keyed by address
    operands: tuple[int, ...]  # the quantized operands: read in place, keyed by address and shape
    activations: tuple[int, ...]  # other tensors: keyed by layout, copied or read in place
    scalars: tuple[int, ...]  # Python numbers, strings, None: keyed by value


@dataclass(frozen=True)
class _Key:
    """A call's capture key: ``seen`` (weights' addresses, activations' shapes; whether a call was
    seen before), ``in_place`` (which activations are output buffers read in place: these marks
    change as the blocks around a call start replaying), the activations' ``signature``, and the
    call's ``plan``."""

    seen: tuple
    in_place: tuple
    signature: tuple
    plan: _Plan

    @property
    def full(self) -> tuple:
        """What a capture is keyed by: a capture reads exactly these arguments in place."""
        return self.seen, self.in_place


class GraphReplay:
    """Call ``fn`` through CUDA graphs where that is safe; see the module docstring.

    Parameters and the quantized operands (the last ``static_extra`` arguments of a call) keep
    their address from call to call: captures read them in place and are keyed by their address.
    Output buffers of earlier replays are read in place too; every other tensor is copied into an
    input buffer before each replay.

    With ``buffered``, ``fn`` takes the buffers its outputs go to after its arguments, writes them
    and returns nothing (``write_outputs_into_buffers``).

    Example:
        >>> replay = GraphReplay(lambda x, w: [x @ w])
        >>> replay([torch.ones(2, 3), nn.Parameter(torch.ones(3, 4))])[0].shape  # on CPU: a plain call
        torch.Size([2, 4])
        >>> into = GraphReplay(lambda x, w, out: out.copy_(x @ w), BufferedOutputs((((2, 4), (4, 1), torch.float32),), ((0, (2, 4), (4, 1), 0),)))
        >>> into([torch.ones(2, 3), nn.Parameter(torch.ones(3, 4))])[0].sum().item()
        24.0
    """

    def __init__(self, fn: Callable[..., Any], buffered: BufferedOutputs | None = None) -> None:
        self.fn = fn
        self.buffered = buffered
        # calls run uncaptured so far -> the layouts of their output tensors (meta tensors)
        self.seen: dict[tuple, list[Tensor]] = {}
        self.plans: dict[tuple, _Plan | None] = {}  # (static_extra, *argument types) -> their plan
        self.captures: dict[tuple, list[_Capture]] = {}
        self.buffers: dict[tuple, _Buffers] = {}
        self.output_at: dict[int, _OutputSet] = {}  # address of every output buffer -> its set
        self.pool: Any = None
        self.disabled: str | None = None

    def __call__(self, args: Sequence[Any], static_extra: int = 0) -> Any:
        """Run ``fn(*args)``; the last ``static_extra`` args are static too (quantized operands)."""
        key = self._key(args, static_extra)
        if key is None:
            return self._run(args)
        capture = next((c for c in self.captures.get(key.full, ()) if not c.output_set.busy()), None)
        if capture is None:
            if not _on_one_gpu([a for a in args if isinstance(a, Tensor)]):
                return self._run(args)
            if key.seen not in self.seen or sum(map(len, self.captures.values())) >= MAX_GRAPHS:
                if len(self.seen) >= 4 * MAX_GRAPHS:  # keys that never come back (a float argument that changes every call)
                    self.seen.clear()
                if key.seen in self.seen:  # seen, but past MAX_GRAPHS: no more captures
                    return self._run(args)
                out = self._first_call(args, key.plan)
                if self.disabled is None:
                    self.seen[key.seen] = [torch.empty_like(t, device="meta") for t in _tensors_of(out)[0]]
                return out
            capture = self._capture(key, args)
            if capture is None:
                return self._run(args)
        for i, buffer in capture.copied:
            buffer.fill(args[i], chained=bool(key.in_place))
        capture.graph.replay()
        if self.buffered is not None:
            return self.buffered.outputs(capture.output_set.tensors)
        out = [capture.output_set.tensors[o].detach() if isinstance(o, _Index) else o for o in capture.outputs]
        return tuple(out) if capture.as_tuple else out

    def _run(self, args: Sequence[Any]) -> Any:
        """An uncaptured call; with ``buffered``, into new buffers."""
        if self.buffered is None:
            return self.fn(*args)
        buffers = self.buffered.allocate(next(a.device for a in args if isinstance(a, Tensor)))
        self.fn(*args, *buffers)
        return self.buffered.outputs(buffers)

    def _key(self, args: Sequence[Any], static_extra: int) -> _Key | None:
        """The capture key of a call, or None when it must run uncaptured: an argument of a kind a
        capture could freeze, an activation not on a CUDA device, a tensor autograd would track, or
        a call inside a capture of the caller's. Where the weights are is checked once per key, when
        it is first seen (``_on_one_gpu``): a later call with the same weights' addresses passes the
        same tensors (CUDA's unified addressing gives every device's memory and the host's addresses
        of their own), and its activations' device is in the key."""
        if self.disabled is not None:
            return None
        types = (static_extra, *map(type, args))
        plan = self.plans.get(types, _UNPLANNED)
        if plan is _UNPLANNED:
            plan = self.plans[types] = _plan(args, static_extra)
        if plan is None:
            return None
        activations = [args[i] for i in plan.activations]
        if not all(map(_IS_CUDA, activations)) or torch.cuda.is_current_stream_capturing():
            return None
        parameters = [args[i] for i in plan.parameters]
        operands = [args[i] for i in plan.operands]
        if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, [*activations, *parameters, *operands])):
            return None
        signature = tuple((a.shape, a.stride(), a.dtype, a.get_device()) for a in activations)
        in_place = tuple((i, a.data_ptr()) for i, a in zip(plan.activations, activations) if a.data_ptr() in self.output_at)
        seen = (plan, tuple(map(Tensor.data_ptr, parameters)), tuple(map(Tensor.data_ptr, operands)), tuple(map(_SHAPE, operands)), signature,
                tuple(args[i] for i in plan.scalars))
        return _Key(seen, in_place, signature, plan)

    def _first_call(self, args: Sequence[Any], plan: _Plan) -> Any:
        """Run a call seen for the first time uncaptured; disable captures if it wrote into an
        activation (a compiled graph bumps the version of each input it writes)."""
        activations = [args[i] for i in plan.activations if not args[i].is_inference()]
        versions = [a._version for a in activations]
        out = self._run(args)
        if any(a._version != v for a, v in zip(activations, versions)):
            self.disabled = "the compiled graph writes into its input tensors"
            log.warning("svdquant: %s, so its calls run without CUDA graphs (their replays would write copies, not the caller's tensors)", self.disabled)
        return out

    def _capture(self, key: _Key, args: Sequence[Any]) -> _Capture | None:
        activations = key.plan.activations
        buffers = self.buffers.get(key.signature)
        if buffers is None:
            if len(self.buffers) >= MAX_SHAPES:
                return None
            buffers = self.buffers[key.signature] = _Buffers([_InputBuffer(args[i]) for i in activations])
        # A free set of output buffers (the sets this call reads in place are busy: it holds them),
        # or a new one. Made outside the pool: a graph captured earlier may use pool memory freed
        # since for its temporaries, and its replays would overwrite outputs a caller holds.
        output_set = next((s for s in buffers.output_sets if not s.busy()), None)
        if output_set is None:
            if len(buffers.output_sets) >= MAX_OUTPUT_SETS:
                return None
            device = next(a.device for a in args if isinstance(a, Tensor))
            if self.buffered is not None:
                output_set = _OutputSet(self.buffered.allocate(device))
                outputs = self.buffered.outputs(output_set.tensors)  # a view's address is where a later call reads it
            else:
                output_set = _OutputSet([torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device) for m in self.seen[key.seen]])
                outputs = output_set.tensors
            buffers.output_sets.append(output_set)
            self.output_at.update((t.data_ptr(), output_set) for t in outputs)
            del outputs
        read_in_place = {i for i, _ in key.in_place}
        copied = tuple((i, buffer) for i, buffer in zip(activations, buffers.inputs) if i not in read_in_place)
        call_args = list(args)
        for i, buffer in copied:
            buffer.fill(args[i], chained=False)
            call_args[i] = buffer.tensor
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                if self.buffered is not None:  # the kernels store into the output set
                    self.fn(*call_args, *output_set.tensors)
                    out_type, outputs = tuple, []  # __call__ returns the buffered outputs' views
                else:
                    out = self.fn(*call_args)
                    out_type = type(out)
                    flat, outputs = _tensors_of(out)
                    if [(t.shape, t.dtype) for t in flat] != [(b.shape, b.dtype) for b in output_set.tensors]:
                        raise RuntimeError("calls with the same input shapes returned different output shapes")
                    for target, tensor in zip(output_set.tensors, flat):
                        target.copy_(tensor)
                    del out, flat  # the call's own outputs go back to the pool for the next capture
        except Exception as exc:  # an op that cannot be captured: run uncaptured from now on
            self.disabled = f"{type(exc).__name__}: {exc}"
            log.warning("svdquant: CUDA graph capture failed, running uncaptured (options cuda_graphs=False silences this): %s", self.disabled)
            return None
        capture = _Capture(graph, copied, output_set, outputs, issubclass(out_type, tuple))
        self.captures.setdefault(key.full, []).append(capture)
        # Compiled graphs outlive models (Dynamo caches them by code object): when this capture's
        # weights die, so does the capture, and with the last one the buffers and the pool.
        owner = next((a for a in args if isinstance(a, nn.Parameter)), None)
        if owner is not None:
            weakref.finalize(owner, self._release, key.full)
        return capture

    def _release(self, key: tuple) -> None:
        self.captures.pop(key, None)
        if not self.captures:
            self.buffers.clear()
            self.output_at.clear()
            self.seen.clear()
            self.pool = None


def write_outputs_into_buffers(gm: fx.GraphModule) -> BufferedOutputs | None:
    """Rewrite a Dynamo graph so that it writes its outputs into buffers passed after its inputs
    (``copy_`` into new placeholders) and returns nothing; returns where the outputs are then, for
    ``GraphReplay``. Outputs that view one tensor get one buffer for it (``BufferedOutputs``).
    Returns None, leaving the graph as it was, unless every output is, or views, a tensor the graph
    makes (not an input), of static shape, whose elements the outputs cover.

    Why: Inductor then stores each output from the kernel that computes it into the buffer that a
    capture hands on to the next block, where the capture copied it there before (0.9 ms per FLUX
    forward at 1024x1024 on an H200, ``memcpy128``: benchmarks/KERNEL_NOTES.md v19).

    Example:
        >>> gm = fx.symbolic_trace(lambda x: (x + 1,))
        >>> for node in gm.graph.nodes:
        ...     node.meta["example_value"] = torch.empty(2, 3)
        >>> write_outputs_into_buffers(gm).views
        ((0, (2, 3), (3, 1), 0),)
        >>> out = torch.empty(2, 3); _ = gm(torch.zeros(2, 3), out); out.sum().item()
        6.0
    """
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    output = next(iter(graph.find_nodes(op="output")))
    values = output.args[0]
    if not isinstance(values, (tuple, list)) or not values or not placeholders:
        return None
    examples = [v.meta.get("example_value") if isinstance(v, fx.Node) else None for v in values]
    if not all(isinstance(e, Tensor) for e in examples):
        return None
    inputs = {StorageWeakRef(p.meta["example_value"].untyped_storage()) for p in placeholders if isinstance(p.meta.get("example_value"), Tensor)}
    # The node that makes each tensor the graph computes (views have a _base; in-place ops return their input).
    makers: dict[StorageWeakRef, fx.Node] = {}
    for node in graph.nodes:
        made = node.meta.get("example_value")
        if node.op != "placeholder" and isinstance(made, Tensor) and made._base is None:
            makers.setdefault(StorageWeakRef(made.untyped_storage()), node)
    bases: list[fx.Node] = []
    views = []
    for example in examples:
        storage = StorageWeakRef(example.untyped_storage())
        if storage in inputs or storage not in makers:
            return None  # an input, a view of one, or a tensor made outside the graph's nodes
        if makers[storage] not in bases:
            bases.append(makers[storage])
        views.append((bases.index(makers[storage]), tuple(example.shape), tuple(example.stride()), example.storage_offset()))
    made = [base.meta["example_value"] for base in bases]
    if not all(isinstance(d, int) for t in [*made, *examples] for d in (*t.shape, *t.stride(), t.storage_offset())):
        return None  # symbolic sizes: the buffers could not be made before the call
    if sum(e.numel() for e in examples) != sum(t.numel() for t in made) or any(t.storage_offset() for t in made):
        return None  # outputs that leave part of a tensor out (a buffer would hold more than they do)
    last, buffers = placeholders[-1], []
    for i, example in enumerate(made):
        with graph.inserting_after(last):
            last = graph.placeholder(f"svdq_output_{i}")
        last.meta["example_value"] = example
        last._dynamo_source = None  # an input Dynamo did not trace, like the quantized operands
        buffers.append(last)
    with graph.inserting_before(output):
        for buffer, base in zip(buffers, bases):
            graph.call_function(torch.ops.aten.copy_.default, (buffer, base))
    output.args = ((),)
    gm.recompile()
    return BufferedOutputs(tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in made), tuple(views))


def _plan(args: Sequence[Any], static_extra: int) -> _Plan | None:
    """Where the arguments of a call go (``_Plan``), or None when there is no tensor or an argument
    is of a kind a capture could silently freeze. Parameters and the last ``static_extra``
    arguments (the quantized operands) keep their address from call to call: captures read them in
    place.

    Example:
        >>> _plan([torch.ones(2), nn.Parameter(torch.ones(2)), 0.5, torch.ones(1)], static_extra=1)
        _Plan(parameters=(1,), operands=(3,), activations=(0,), scalars=(2,))
        >>> _plan([torch.ones(2), [1, 2]], static_extra=0) is None  # a list: its items could change unseen
        True
    """
    first_operand = len(args) - static_extra
    parameters, operands, activations, scalars = [], [], [], []
    for i, arg in enumerate(args):
        if isinstance(arg, Tensor):
            (operands if i >= first_operand else parameters if isinstance(arg, nn.Parameter) else activations).append(i)
        elif isinstance(arg, (int, float, bool, str, type(None), torch.SymInt)):
            scalars.append(i)
        else:
            return None
    if not (parameters or operands or activations):
        return None
    return _Plan(tuple(parameters), tuple(operands), tuple(activations), tuple(scalars))


def _on_one_gpu(tensors: list[Tensor]) -> bool:
    """Whether all of ``tensors`` are on one CUDA device.

    Example:
        >>> _on_one_gpu([torch.ones(1)])
        False
    """
    return all(map(_IS_CUDA, tensors)) and len(set(map(Tensor.get_device, tensors))) == 1


_UNPLANNED = object()  # GraphReplay.plans' marker for argument types not seen yet (None is "never capture")
_IS_CUDA = operator.attrgetter("is_cuda")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_SHAPE = operator.attrgetter("shape")


def _tensors_of(out: Any) -> tuple[list[Tensor], list[Any]]:
    """The tensors of a compiled call's outputs (a list or tuple), and the outputs with each tensor
    replaced by its index among them."""
    if not isinstance(out, (list, tuple)):
        raise TypeError(f"a compiled graph returns a list or tuple, got {type(out).__name__}")
    items = list(out)
    flat = [o for o in items if isinstance(o, Tensor)]
    index = iter(range(len(flat)))
    return flat, [_Index(next(index)) if isinstance(o, Tensor) else o for o in items]


class _Index(int):
    """Marks an output position that holds a tensor (the position in the output set)."""


__all__ = ["BufferedOutputs", "GraphReplay", "MAX_GRAPHS", "MAX_OUTPUT_SETS", "MAX_SHAPES", "write_outputs_into_buffers"]
