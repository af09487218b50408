"""Replay the calls of a compiled graph as CUDA graphs: one per set of weights and input shapes.

An uncaptured W4A4 linear costs about 0.2 ms of host time (three Triton launches and their
argument handling) against tens of microseconds of GPU time at 512x512, so a FLUX forward is
bound by Python, not by the GPU (benchmarks/RESULTS.md). Inductor's CUDA graphs
(``mode="reduce-overhead"``) work for a whole compiled model, but not under diffusers' regional
compilation, where one graph serves every block and the blocks hand each other their outputs.

``GraphReplay`` wraps such a graph's callable. A call whose tensors are all on one GPU, outside
autograd and outside another capture, is keyed by the addresses of its parameters and quantized
operands (one key per block: the weights differ) and the shapes of its other tensors. The second
call with a key captures the graph (the first ran it eagerly: kernels are tuned and weights
freed by then); later calls copy their activations into the capture's input buffers, replay, and
return copies of its outputs, so a model may keep any block's output (U-Net skip connections).
All captures share one memory pool, and captures with the same activation shapes share input and
output buffers: the pool holds one block's temporaries, not one per block. A capture is dropped
when its weights die (the model was deleted), and the buffers and pool with the last one.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger("svdq_compile")

# Captures per compiled graph, and activation shapes (each with its own input and output buffers);
# past either, new keys run uncaptured, so sweeping many resolutions does not grow memory unbounded.
MAX_GRAPHS = 1024
MAX_SHAPES = 16


@dataclass
class _Buffers:
    """Input and output buffers shared by the captures of one activation signature."""

    inputs: list[Tensor]
    outputs: list[Tensor] | None = None


@dataclass
class _Capture:
    """One captured call: its graph, the buffers it reads and writes, how to rebuild its outputs."""

    graph: torch.cuda.CUDAGraph
    buffers: _Buffers
    copied: tuple[int, ...]  # positions of the arguments copied into buffers.inputs, in order
    outputs: list[Any]  # the call's outputs with each tensor replaced by its index in buffers.outputs
    as_tuple: bool


class GraphReplay:
    """Call ``fn`` through CUDA graphs where that is safe; see the module docstring.

    Parameters and the quantized operands (the last ``static_extra`` arguments of a call) keep
    their address from call to call: captures read them in place and are keyed by their address.
    Every other tensor is copied into a buffer before each replay.

    Example:
        >>> replay = GraphReplay(lambda x, w: [x @ w])
        >>> replay([torch.ones(2, 3), nn.Parameter(torch.ones(3, 4))])[0].shape  # on CPU: a plain call
        torch.Size([2, 4])
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.seen: set[tuple] = set()
        self.captures: dict[tuple, _Capture] = {}
        self.buffers: dict[tuple, _Buffers] = {}
        self.pool: Any = None
        self.disabled: str | None = None

    def __call__(self, args: Sequence[Any], static_extra: int = 0) -> Any:
        """Run ``fn(*args)``; the last ``static_extra`` args are static too (quantized operands)."""
        key = self._key(args, static_extra)
        if key is None:
            return self.fn(*args)
        capture = self.captures.get(key)
        if capture is None:
            if key not in self.seen or len(self.captures) >= MAX_GRAPHS:
                if len(self.seen) >= 4 * MAX_GRAPHS:  # keys that never come back (a float argument that changes every call)
                    self.seen.clear()
                self.seen.add(key)
                return self.fn(*args)
            capture = self._capture(key, args, static_extra)
            if capture is None:
                return self.fn(*args)
        for buffer, i in zip(capture.buffers.inputs, capture.copied):
            buffer.copy_(args[i])
        capture.graph.replay()
        out = [capture.buffers.outputs[o].clone() if isinstance(o, _Index) else o for o in capture.outputs]
        return tuple(out) if capture.as_tuple else out

    def _key(self, args: Sequence[Any], static_extra: int) -> tuple | None:
        """The capture key of a call, or None when it must run uncaptured."""
        if self.disabled is not None:
            return None
        grad = torch.is_grad_enabled()
        device = None
        parts: list[Any] = []
        first_static = len(args) - static_extra
        for i, arg in enumerate(args):
            if isinstance(arg, Tensor):
                if not arg.is_cuda or (device is not None and arg.device != device) or (grad and arg.requires_grad):
                    return None
                device = arg.device
                if _read_in_place(arg, i, first_static):
                    # Shape too: a replaced operand (a LoRA of another rank) may reuse an address.
                    parts.append((arg.data_ptr(), tuple(arg.shape)))
                else:
                    parts.append((tuple(arg.shape), arg.stride(), arg.dtype))
            elif isinstance(arg, (int, float, bool, str, type(None), torch.SymInt)):
                parts.append((type(arg).__name__, arg))
            else:
                return None  # an argument whose value a capture could silently freeze
        if device is None or torch.cuda.is_current_stream_capturing():  # inside a capture of the caller's
            return None
        return tuple(parts)

    def _capture(self, key: tuple, args: Sequence[Any], static_extra: int) -> _Capture | None:
        first_static = len(args) - static_extra
        positions = tuple(i for i, a in enumerate(args) if isinstance(a, Tensor) and not _read_in_place(a, i, first_static))
        copied = [args[i] for i in positions]
        signature = tuple((tuple(t.shape), t.stride(), t.dtype) for t in copied)
        buffers = self.buffers.get(signature)
        if buffers is None:
            if len(self.buffers) >= MAX_SHAPES:
                return None
            buffers = self.buffers[signature] = _Buffers([torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in copied])
        call_args = list(args)
        for buffer, i in zip(buffers.inputs, positions):
            buffer.copy_(args[i])
            call_args[i] = buffer
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*call_args)
                out_type = type(out)
                flat, outputs = _tensors_of(out)
                if buffers.outputs is None:
                    buffers.outputs = [torch.empty_like(t) for t in flat]  # from the pool, kept: shared by later captures
                elif [(t.shape, t.dtype) for t in flat] != [(b.shape, b.dtype) for b in buffers.outputs]:
                    raise RuntimeError("calls with the same input shapes returned different output shapes")
                for buffer, tensor in zip(buffers.outputs, flat):
                    buffer.copy_(tensor)
                del out, flat  # the call's own outputs go back to the pool for the next capture
        except Exception as exc:  # an op that cannot be captured: run uncaptured from now on
            self.disabled = f"{type(exc).__name__}: {exc}"
            log.warning("svdquant: CUDA graph capture failed, running uncaptured (options cuda_graphs=False silences this): %s", self.disabled)
            return None
        capture = self.captures[key] = _Capture(graph, buffers, positions, outputs, issubclass(out_type, tuple))
        # Compiled graphs outlive models (Dynamo caches them by code object): when this capture's
        # weights die, so does the capture, and with the last one the buffers and the pool.
        owner = next((a for a in args if isinstance(a, nn.Parameter)), None)
        if owner is not None:
            weakref.finalize(owner, self._release, key)
        return capture

    def _release(self, key: tuple) -> None:
        self.captures.pop(key, None)
        if not self.captures:
            self.buffers.clear()
            self.seen.clear()
            self.pool = None


def _read_in_place(arg: Tensor, index: int, first_static: int) -> bool:
    """Parameters and the quantized operands keep their address: captures read them in place."""
    return index >= first_static or isinstance(arg, nn.Parameter)


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
    """Marks an output position that holds a tensor (the position in the output buffers)."""


__all__ = ["GraphReplay", "MAX_GRAPHS", "MAX_SHAPES"]
