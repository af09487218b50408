"""The ``svdquant`` torch.compile backend and the equivalent Inductor custom pass.

Backend (``torch.compile(model, backend="svdquant", options={...})``, found by name through the
``torch_dynamo_backends`` entry point):

1. Dynamo hands over the FX graph with every parameter as a graph input (``example_inputs`` are the
   real tensors). Each linear whose weight is such an input and fits (not skipped by
   ``config.skip``, ``K % group_size == 0``, not tiny, not a LoRA factor) is rewritten into
   ``svdq.w4a4_linear`` by the passes in ``svdq_compile.passes`` (LoRA adapters fold into the
   low-rank branch).
2. The quantized tensors of a layer are NOT baked into the graph: they become five extra graph
   inputs, looked up at every call from the weight Parameter actually passed in (a registry keyed by
   parameter identity, ``svdq_compile.quantized_weights``). This is what makes ``compile_repeated_blocks`` correct (one compiled graph
   serves every block, each with its own weights), keeps quantized weights out of Inductor's
   FX-graph cache key (inputs are hashed by shape/dtype only), and lets a recompile (another
   resolution, batch, ``dynamic=True``) reuse them. A weight seen for the first time is quantized
   once: at compile time for the weights of the traced call, at its first call for other blocks
   sharing the graph; the disk cache (``svdq_compile.cache``) serves repeated processes.
3. The rewritten graph goes to Inductor's ``compile_fx`` with ``mode``'s Inductor options. On CUDA
   its calls replay as CUDA graphs, one per block and input shapes (``svdq_compile.cuda_graphs``,
   ``options={"cuda_graphs": False}`` turns it off), so launching the kernels costs no host time.
4. After the first call that used a quantized weight, its 16-bit storage is released with
   ``untyped_storage().resize_(0)``: shape and strides stay, so Dynamo's guards still pass and
   recompiles still trace, but the memory is gone. A weight that any compiled graph still reads in
   16-bit is never freed. Eager forward calls afterwards fail in PyTorch with
   ``setStorage: ... out of bounds for storage of size 0``; ``copy.deepcopy`` of the weight (or of
   its model) and ``.to()`` / ``.cpu()`` / ``.half()`` of the compiled module or its ancestors
   raise an error saying what to do; other reads of a freed weight (``.clone()`` of the tensor
   itself, a state_dict written to disk) are unchecked and crash or read garbage, as for FSDP's
   freed storages; ``options={"free_weights": False}`` keeps the weights (docs/backend.md).

``SVDQUANT=0`` in the environment (read at each compile) makes the backend plain Inductor.

Inductor pass (``register_inductor_pass()``): the same passes as a ``pre_grad_custom_pass`` with a
uuid, composed with any pass already registered. Inside Inductor the weights are real tensors only
under freezing (``torch._inductor.config.freezing = True`` before compiling, under ``no_grad``),
where they are ``get_attr`` constants specialised per module; the quantized tensors then become
frozen constants too (hashed by metadata in the cache key). Without freezing the weights are shared
graph inputs and the pass leaves the graph unchanged (it says so once). ``SVDQUANT=1`` at
``import svdq_compile`` calls ``register_inductor_pass(freeze=True)`` so a plain
``torch.compile(model)`` is rewritten. See docs/backend.md.
"""

from __future__ import annotations

import collections
import fnmatch
import functools
import hashlib
import logging
import os
import re
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import cache
from .config import SVDQuantConfig
from .cuda_graphs import GraphReplay, write_outputs_into_buffers
from .kernels.w4a4_gemm import use_tuning_cache
from .passes.base import QuantizedNodes, linear_parts, shared_input_groups
from .passes.pass_manager import SVDQPassManager
from .quantized_weights import (OPERAND_FIELDS, QuantizedGroup, QuantizedWeight, config_key, group_entry, has_entry, quantize_group,
                                quantize_weight, weight_entry, weights_quantized)
from .summary import CompileSummary

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # torch without custom pass classes: the pass is still a callable
    CustomGraphPass = object  # type: ignore[misc,assignment]

log = logging.getLogger("svdq_compile")

# Below this many output features a W4A4 GEMM saves nothing worth its activation quantization.
MIN_OUT_FEATURES = 16
# How Dynamo spells module attribute lookups in a source; not part of the module's name.
_CONTAINER_ATTRS = {"__dict__", "_modules", "_parameters", "_buffers"}
# Parameters that some compiled graph reads in 16-bit: never freed.
_READ_IN_16BIT: WeakIdKeyDictionary = WeakIdKeyDictionary()
# The summaries of the latest compiles, newest last (for inspection in notebooks and tests).
recent_summaries: collections.deque[CompileSummary] = collections.deque(maxlen=64)


def skip_reason(name: str, weight: Any, config: SVDQuantConfig) -> str | None:
    """Why the linear ``name`` with this weight stays 16-bit, or None when it is quantized.

    Example:
        >>> skip_reason("proj_out", nn.Parameter(torch.zeros(64, 64)), SVDQuantConfig())
        "skip glob 'proj_out'"
        >>> skip_reason("blocks.0.ff", nn.Parameter(torch.zeros(64, 100)), SVDQuantConfig())
        'in_features 100 is not a multiple of group_size 64'
    """
    for glob in config.skip:
        if fnmatch.fnmatchcase(name, glob):
            return f"skip glob {glob!r}"
    if re.search(r"(^|\.)lora_(A|B)(\.|$)", name):
        return "LoRA factor (runs in its base layer's low-rank branch or as 16-bit)"
    if not isinstance(weight, nn.Parameter):
        return "weight is not a module parameter"
    if weight.dim() != 2 or not weight.is_floating_point():
        return f"weight is {weight.dtype} {tuple(weight.shape)}, not a 2-D float matrix"
    n, k = weight.shape
    if k % config.group_size:
        return f"in_features {k} is not a multiple of group_size {config.group_size}"
    if n < MIN_OUT_FEATURES:
        return f"out_features {n} < {MIN_OUT_FEATURES}: too small to gain"
    if weight.requires_grad and torch.is_grad_enabled():
        return "gradients are enabled (svdquant is for inference: use torch.no_grad())"
    return None


def weight_name(source_name: str) -> str:
    """Module name of a parameter from its Dynamo source, peft's ``base_layer`` dropped.

    Example:
        >>> weight_name("L['self']._modules['blocks']._modules['0']._modules['fc']._modules['base_layer']._parameters['weight']")
        'blocks.0.fc'
        >>> weight_name("L['self'].__dict__['_modules']['norm_out']._modules['linear']._parameters['weight']")
        'norm_out.linear'
    """
    path = re.sub(r"^[LG]\['[^']*'\]", "", source_name)
    tokens = [a or b or c for a, b, c in re.findall(r"\.(\w+)|\['([^']*)'\]|\[(\d+)\]", path)]
    name = ".".join(t for t in tokens if t not in _CONTAINER_ATTRS)
    name = re.sub(r"\.weight$", "", name)
    return re.sub(r"(^|\.)base_layer$", "", name)


def _repeated_block_prefix() -> str:
    """``"ClassName."`` when Dynamo is tracing one of diffusers' repeated blocks, else ``""``.

    Under ``compile_repeated_blocks`` the graph's root is a block, so names are relative to it; the
    class-name prefix keeps root-anchored skip globs (``proj_out``) from matching inside a block
    (FLUX's single blocks have their own ``proj_out``) while ``*.attn2.to_k`` still matches.
    """
    try:
        tx = torch._dynamo.symbolic_convert.InstructionTranslator.current_tx()
        root = tx.f_locals.get("self")
    except Exception:  # private API: without it names stay relative to the compiled module
        return ""
    if not isinstance(root, nn.Module) or "diffusers" not in sys.modules:
        return ""
    from diffusers import ModelMixin

    pending, blocks = [ModelMixin], set()
    while pending:
        cls = pending.pop()
        blocks.update(getattr(cls, "_repeated_blocks", ()) or ())
        pending.extend(cls.__subclasses__())
    name = type(root).__name__
    return f"{name}." if name in blocks else ""


@dataclass
class _Layer:
    """The weights one op reads the quantized operands of: one linear's, or a shared-input group's."""

    input_indices: tuple[int, ...]  # positions of the 16-bit weights among the graph's inputs
    names: tuple[str, ...]


class _Provider:
    """Shared logic of the backend's and the Inductor pass's weight providers.

    With ``fuse_shared_input``, the quantizable weights of linears that read one input are
    quantized together whichever pass asks first (a linear with LoRA adapters is asked about by
    the LoRA pass, its siblings by the shared-input pass), so a layer's quantization does not
    depend on whether an adapter sits on it or one of its siblings.
    """

    def __init__(self, config: SVDQuantConfig, summary: CompileSummary) -> None:
        self.config = config
        self.config_id = config_key(config)
        self.summary = summary
        self.decided: dict[fx.Node, QuantizedNodes | None] = {}
        self.progress = None
        self.new: set[int] = set()  # ids of the weights this compile quantized (the others were reused)
        # weight node -> the weight nodes of every quantized linear reading the same input, its own included
        self.sharing: dict[fx.Node, list[fx.Node]] = {}
        # The GEMM tuner keeps its picks beside the quantized weights: a second process skips both.
        use_tuning_cache(cache.cache_dir(config))

    def find_shared_inputs(self, graph: fx.Graph) -> None:
        """Record which weights are quantized together; call on the graph before any pass runs."""
        if not self.config.fuse_shared_input:
            return
        for linears in shared_input_groups(graph, self.quantizes):
            weights = [linear_parts(node)[1] for node in linears]
            self.sharing.update(dict.fromkeys(weights, weights))

    def quantizes(self, weight: fx.Node) -> bool:
        found = self.tensor_and_name(weight)
        return found is not None and skip_reason(found[1], found[0], self.config) is None

    def quantized_nodes(self, graph: fx.Graph, weight: fx.Node) -> QuantizedNodes | None:
        if weight not in self.decided:
            self.decided[weight] = self._decide(graph, weight)
        return self.decided[weight]

    def _decide(self, graph: fx.Graph, weight: fx.Node) -> QuantizedNodes | None:
        found = self.tensor_and_name(weight)
        if found is None:
            return None
        tensor, name = found
        reason = skip_reason(name, tensor, self.config)
        if reason is not None:
            self.summary.skipped(name, reason)
            return None
        if weight in self.sharing:
            self._quantize_together(self.sharing[weight])
        entry = self._tracking_new([tensor], lambda: quantize_weight(tensor, name, self.config))
        self.summary.quantized(name, tensor, entry, id(tensor) in self.new)
        return self.make_nodes(graph, [weight], [name], entry)

    def joint_quantized_nodes(self, graph: fx.Graph, weights: list[fx.Node]) -> QuantizedNodes | None:
        if weights[0] in self.sharing:  # the op's linears are those of one input, maybe without some (LoRA, skips)
            self._quantize_together(self.sharing[weights[0]])
        group = self._quantize_together(weights)
        if group is None:
            return None
        tensors, names = zip(*(self.tensor_and_name(w) for w in weights))
        for name, tensor, member in zip(names, tensors, group.members):
            self.summary.quantized(name, tensor, member, id(tensor) in self.new)
        return self.make_nodes(graph, weights, list(names), group.joint)

    def _quantize_together(self, weights: list[fx.Node]) -> QuantizedGroup | None:
        tensors, names = zip(*(self.tensor_and_name(w) for w in weights))
        return self._tracking_new(list(tensors), lambda: quantize_group(tensors, names, self.config))

    def _tracking_new(self, tensors: list[Tensor], quantize: Callable[[], Any]) -> Any:
        """``quantize()``, remembering which of ``tensors`` it quantized (summary, progress bar)."""
        missing = [t for t in tensors if not has_entry(t, self.config_id)]
        result = quantize()
        for tensor in missing:
            if has_entry(tensor, self.config_id):
                self.new.add(id(tensor))
                if self.progress is not None:
                    self.progress.update(1)
        return result

    def count_candidates(self, graph: fx.Graph) -> int:
        """Weights the passes will ask about that still need quantizing (for the progress bar)."""
        weights = {parts[1] for node in graph.nodes if (parts := linear_parts(node)) is not None}
        return sum(1 for w in weights if self.quantizes(w) and not has_entry(self.tensor_and_name(w)[0], self.config_id))

    def tensor_and_name(self, weight: fx.Node) -> tuple[Tensor, str] | None:
        raise NotImplementedError

    def make_nodes(self, graph: fx.Graph, weights: list[fx.Node], names: list[str], entry: QuantizedWeight) -> QuantizedNodes:
        """Nodes carrying ``entry``'s operands, for the op whose output rows are ``weights``' rows."""
        raise NotImplementedError


class _BackendProvider(_Provider):
    """Weights are graph inputs; quantized operands are appended as extra graph inputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], config: SVDQuantConfig, summary: CompileSummary) -> None:
        super().__init__(config, summary)
        self.placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.index = {node: i for i, node in enumerate(self.placeholders)}
        self.example_inputs = list(example_inputs)
        self.prefix = _repeated_block_prefix()
        self.layers: list[_Layer] = []
        self.extra_inputs: list[Tensor] = []
        self.find_shared_inputs(gm.graph)

    def tensor_and_name(self, weight: fx.Node) -> tuple[Tensor, str] | None:
        if weight not in self.index:
            return None
        grapharg = weight.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None and grapharg.source is not None else str(weight.target)
        source = source() if callable(source) else source
        return self.example_inputs[self.index[weight]], self.prefix + weight_name(source)

    def make_nodes(self, graph: fx.Graph, weights: list[fx.Node], names: list[str], entry: QuantizedWeight) -> QuantizedNodes:
        last = list(graph.find_nodes(op="placeholder"))[-1]
        nodes = []
        for field_name, tensor in zip(OPERAND_FIELDS, entry.operands()):
            with graph.inserting_after(last):
                last = graph.placeholder(f"svdq_{len(self.layers)}_{field_name}")
            last.meta["example_value"] = tensor
            # No user-code source (like DDP's split graphs), but static: cudagraphs must not copy
            # the weights into their own buffers on every call, just as for parameters.
            last._dynamo_source = None
            last.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
            nodes.append(last)
            self.extra_inputs.append(tensor)
        self.layers.append(_Layer(tuple(self.index[w] for w in weights), tuple(names)))
        return QuantizedNodes(*nodes, entry.group_size)

    def shared_input_sets(self) -> list[_Layer]:
        """The weights quantized together, as graph input positions (for the other blocks of a regional graph)."""
        distinct = {id(weights): weights for weights in self.sharing.values()}.values()
        return [_Layer(tuple(self.index[w] for w in weights), tuple(self.tensor_and_name(w)[1] for w in weights)) for weights in distinct]


class _RuntimeCall:
    """Calls the compiled graph with the quantized operands of the weights passed in this call."""

    def __init__(self, compiled: Callable, layers: list[_Layer], shared_sets: list[_Layer], config: SVDQuantConfig,
                 weight_layouts: list[tuple[torch.dtype, tuple[int, ...]]], replay: GraphReplay | None = None) -> None:
        self.compiled = compiled
        self.replay = replay
        self.layers = layers
        # Each layer's weight operand as compiled (dtype, shape), and the entries found to match it.
        self.weight_layouts = weight_layouts
        self.checked: weakref.WeakValueDictionary[int, QuantizedWeight] = weakref.WeakValueDictionary()  # by id: entries compare by value
        # A set that is one layer's weights is quantized together by that layer's lookup anyway.
        self.shared_sets = [s for s in shared_sets if s.input_indices not in {layer.input_indices for layer in layers}]
        self.config = config
        self.config_id = config_key(config)
        self.announced = False

    def __call__(self, *args: Any) -> Any:
        known = weights_quantized()
        for shared in self.shared_sets:  # weights seen for the first time are quantized together, as at compile time
            weights = [args[i] for i in shared.input_indices]
            if any(not has_entry(w, self.config_id) for w in weights):
                group_entry(weights, shared.names, self.config, self.config_id)
        operands = [self._operands(args, layer) for layer in self.layers]
        for layer, layout, (entry, _) in zip(self.layers, self.weight_layouts, operands):
            if self.checked.get(id(entry)) is not entry:
                self._check_layout(layer, layout, entry)
        if not self.announced and weights_quantized() > known:
            self.announced = True  # regional compilation: the other blocks' weights arrive at their first call
            log.info("svdquant: quantized the weights of a module that shares a compiled graph, at its first call; the others follow")
        extra = [t for entry, _ in operands for t in entry.operands()]
        out = self.replay([*args, *extra], len(extra)) if self.replay is not None else self.compiled(*args, *extra)
        if self.config.free_weights:
            freed_now = False
            for layer, (_, members) in zip(self.layers, operands):
                for index, member in zip(layer.input_indices, members):
                    if not member.freed:
                        member.freed = _free(args[index], member.name)
                        freed_now = freed_now or member.freed
            if freed_now:
                _refuse_moves_of_freed_weights(_calling_module())
        return out

    def _check_layout(self, layer: _Layer, layout: tuple[torch.dtype, tuple[int, ...]], entry: QuantizedWeight) -> None:
        """Refuse an entry whose weight operand is not laid out as the graph was compiled for (Dynamo
        does not guard on the operands the backend adds, so it may serve this graph to another model
        of the same class whose weights were loaded packed while these were not, or the reverse)."""
        found = (entry.weight_q.dtype, tuple(entry.weight_q.shape))
        if found != layout:
            raise RuntimeError(
                f"svdquant: the quantized weight of {', '.join(layer.names)} is {found[0]} {list(found[1])}, but this compiled graph was "
                f"made for {layout[0]} {list(layout[1])}: another model of this class, compiled with the same options, holds its "
                "quantized weights in another layout (e.g. one loaded with load_quantized(..., packed_weights=True) and one without); "
                "load both the same way, or call torch._dynamo.reset() before compiling this one"
            )
        self.checked[id(entry)] = entry

    def _operands(self, args: tuple, layer: _Layer) -> tuple[QuantizedWeight, tuple[QuantizedWeight, ...]]:
        """The op operands of ``layer`` for the weights in ``args``, and the entries of its weights."""
        if len(layer.input_indices) == 1:
            entry = weight_entry(args[layer.input_indices[0]], layer.names[0], self.config, self.config_id)
            return entry, (entry,)
        group = group_entry([args[i] for i in layer.input_indices], layer.names, self.config, self.config_id)
        if group is None:
            raise RuntimeError(
                f"svdquant: {', '.join(layer.names)} read the same input and run as one op in this compiled graph, but these weights were "
                "quantized separately (by a compile with other options, or loaded so from a checkpoint); compile with "
                "options={'fuse_shared_input': False}"
            )
        return group.joint, group.members


def _free(weight: Tensor, name: str) -> bool:
    """Release the storage of a 16-bit weight nothing reads any more; True when it is gone."""
    if weight in _READ_IN_16BIT:
        return False
    weight.untyped_storage().resize_(0)
    # Copying a tensor without storage reads a null pointer (a segfault on CPU): make deepcopy of
    # the weight (and so of its model or pipeline) an error that says what to do. copy.deepcopy
    # finds __deepcopy__ on the instance first.
    weight.__deepcopy__ = functools.partial(_refuse_copy, name)
    return True


def _calling_module() -> nn.Module | None:
    """The module whose compiled forward is running: the innermost module call on the Python stack
    (the compiled block under regional compilation, else the compiled model), unwrapped from
    torch.compile's ``OptimizedModule``."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self") if frame.f_code.co_name in ("_wrapped_call_impl", "_call_impl") else None
        if isinstance(candidate, nn.Module):
            return getattr(candidate, "_orig_mod", candidate)
        frame = frame.f_back
    return None


def _refuse_moves_of_freed_weights(module: nn.Module | None) -> None:
    """Make ``module.to()`` (and ``.cpu()``, ``.half()``, ... anything through ``Module._apply``, also
    from an ancestor) an error when it would convert a freed weight, which reads a null pointer (a
    segfault on CPU, an illegal address on CUDA). Conversions that change nothing still pass."""
    if module is not None and "_apply" not in vars(module):
        module._apply = functools.partial(_guarded_apply, weakref.ref(module))


def _guarded_apply(module_ref: weakref.ref, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> nn.Module:
    module = module_ref()
    for name, param in module.named_parameters():
        if param.numel() and param.untyped_storage().nbytes() == 0:
            probe = fn(torch.empty(0, dtype=param.dtype, device=param.device))
            if probe.dtype != param.dtype or probe.device != param.device:
                raise RuntimeError(
                    f"svdquant freed the 16-bit weight {name!r} of this compiled {type(module).__name__} after quantizing it, so it "
                    f"cannot be converted to {probe.dtype} on {probe.device}: move or cast the model before compiling it, "
                    "or compile with options={'free_weights': False}"
                )
    return type(module)._apply(module, fn, *args, **kwargs)


def _refuse_copy(name: str, memo: dict) -> None:
    raise RuntimeError(
        f"svdquant freed the 16-bit weight of {name!r} after quantizing it, so the compiled model cannot be copied: "
        "copy the model before compiling it, save it with svdq_compile.save_quantized, or compile with options={'free_weights': False}"
    )


def _inductor_patches(mode: str | None) -> dict[str, Any]:
    """Inductor config the backend compiles with: what ``torch.compile(mode=...)`` applies (a clear
    error on a typo), and kernels that write no buffer they read.

    Why out of place: Inductor's autotuner times a kernel together with clones of the buffers it
    writes in place, so between such a kernel's configs it picks by noise. FLUX's q/k RMS norm and
    RoPE kernel ran at 80 us or 103 us per launch from one compile to the next, about 1 ms per
    forward (benchmarks/KERNEL_NOTES.md, v20); out of place, the timings are the kernel's own.

    Example:
        >>> _inductor_patches("reduce-overhead")
        {'triton.cudagraphs': True, 'inplace_buffers': False}
    """
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if mode is not None and mode not in modes:
        raise ValueError(f"svdquant: unknown mode {mode!r}; valid modes are {sorted(modes)}")
    return (dict(modes[mode]) if mode else {}) | {"inplace_buffers": False}


class _ConfigInCacheKey(CustomGraphPass):  # type: ignore[misc]
    """A post-grad pass that changes nothing but puts the svdquant config into Inductor's FX-graph
    cache key (through its uuid), and runs the pass that was registered before it, if any.

    Two configs can give the same graph code over quantized operands that differ only in sizes the
    cache does not check: the backend's extra inputs carry no guards, so a packed int4_2level
    weight ([N, K/2 + K/G] uint8) and a packed int4_pow2 one ([N, K/2 + K/2G]) got each other's
    compiled graph.

    Example:
        >>> len(_ConfigInCacheKey(SVDQuantConfig(), None).uuid())
        64
    """

    def __init__(self, config: SVDQuantConfig, previous: Callable | list[Callable] | None) -> None:
        self.key = repr((config_key(config), config.packed_weights))
        # The config slot holds a pass, or in newer torch a list of them.
        self.previous = [] if previous is None else list(previous) if isinstance(previous, (list, tuple)) else [previous]

    def __call__(self, graph: fx.Graph) -> None:
        for custom_pass in self.previous:
            custom_pass(graph)

    def uuid(self) -> str | None:
        keys = [getattr(p, "uuid", lambda: None)() for p in self.previous]
        if None in keys:  # a pass Inductor cannot key: it bypasses its cache, and so must this one
            return None
        return hashlib.sha256(repr((self.key, keys)).encode()).hexdigest()


def _mark_16bit_reads(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Remember every parameter the compiled graph still reads, and refuse already-freed ones."""
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if isinstance(value, nn.Parameter) and node.users:
            if value.untyped_storage().nbytes() == 0 and value.numel():
                raise RuntimeError(
                    f"svdquant: graph input {node.name} reads a 16-bit weight that an earlier svdquant compile freed; "
                    "compile every graph that uses it with backend='svdquant' and the same options, or pass options={'free_weights': False}"
                )
            _READ_IN_16BIT[value] = True


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite: Dynamo reads its own graph's placeholders after the backend returns."""
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, node_map))
    for old, new in node_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    return copy


def svdquant_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None, options: dict[str, Any] | None = None) -> Callable:
    """torch.compile backend: rewrite linears (and their LoRAs) to W4A4 SVDQuant, then Inductor.

    ``options`` are ``SVDQuantConfig`` fields (an unknown key raises a ValueError listing the valid
    ones); ``mode`` is forwarded to Inductor like ``torch.compile(mode=...)`` does. torch.compile
    takes ``mode`` or ``options``, not both, so ``options`` may carry ``"mode"`` too (e.g.
    ``{"rank": 16, "mode": "reduce-overhead"}`` for CUDA graphs). Returns the compiled callable.
    ``SVDQUANT=0`` in the environment skips the rewrite (plain Inductor).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> with torch.no_grad():
        ...     y = torch.compile(model, backend="svdquant", options={"rank": 8, "cache_dir": ""})(torch.randn(4, 64))
        >>> y.shape
        torch.Size([4, 64])
    """
    from torch._inductor.compile_fx import compile_fx

    from .checkpoint import checkpoint_config  # the checkpoint module builds on this one's registry

    options = dict(options or {})
    if "mode" in options:
        if mode is not None:
            raise ValueError(f"svdquant: mode given twice ({mode!r} and options['mode'] = {options['mode']!r}); give it once")
        mode = options.pop("mode")
    config = checkpoint_config(SVDQuantConfig.from_options(options))
    patches = _inductor_patches(mode) | {"post_grad_custom_pre_pass": _ConfigInCacheKey(config, torch._inductor.config.post_grad_custom_pre_pass)}
    if os.environ.get("SVDQUANT", "").strip() == "0":
        log.info("svdquant: SVDQUANT=0, compiling with plain Inductor (no rewrite)")
        return compile_fx(gm, example_inputs, config_patches=patches)
    gm = _copy_graph_module(gm)
    summary = CompileSummary()
    provider = _BackendProvider(gm, example_inputs, config, summary)
    with summary.progress(provider.count_candidates(gm.graph)) as provider.progress:
        summary.rewrites = SVDQPassManager(config, provider)(gm.graph)
    gm.recompile()
    _mark_16bit_reads(gm, example_inputs)
    # Our CUDA graphs (Inductor's, mode="reduce-overhead", replace them) hand each output on in a
    # buffer; for inference the graph writes its outputs there itself. (A graph compiled with grad
    # enabled is differentiated through its outputs, which must stay its own.)
    replayed = bool(provider.layers) and config.cuda_graphs and not patches.get("triton.cudagraphs")
    buffered = write_outputs_into_buffers(gm) if replayed and not torch.is_grad_enabled() else None
    buffers = [] if buffered is None else buffered.allocate(next(t.device for t in example_inputs if isinstance(t, Tensor)))
    start = time.perf_counter()
    compiled = compile_fx(gm, [*example_inputs, *provider.extra_inputs, *buffers], config_patches=patches)
    summary.compile_seconds = time.perf_counter() - start
    summary.report(free_weights=config.free_weights)
    recent_summaries.append(summary)
    if not provider.layers:
        return compiled
    replay = GraphReplay(compiled, buffered) if replayed else None
    weight_layouts = [(t.dtype, tuple(t.shape)) for t in provider.extra_inputs[:: len(OPERAND_FIELDS)]]
    return _RuntimeCall(compiled, provider.layers, provider.shared_input_sets(), config, weight_layouts, replay)


# ---------------------------------------------------------------------------------------------
# Inductor custom pass


class _FrozenProvider(_Provider):
    """Weights are ``get_attr`` constants (Inductor freezing); operands are attached as constants."""

    def __init__(self, gm: fx.GraphModule, config: SVDQuantConfig, summary: CompileSummary) -> None:
        super().__init__(config, summary)
        self.gm = gm
        self.fqn = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
        self.count = 0
        self.find_shared_inputs(gm.graph)

    def tensor_and_name(self, weight: fx.Node) -> tuple[Tensor, str] | None:
        if weight.op != "get_attr":
            return None
        tensor = self.gm
        for part in str(weight.target).split("."):
            tensor = getattr(tensor, part)
        return tensor, weight_name(self.fqn.get(weight.target, str(weight.target)))

    def make_nodes(self, graph: fx.Graph, weights: list[fx.Node], names: list[str], entry: QuantizedWeight) -> QuantizedNodes:
        nodes = []
        for field_name, tensor in zip(OPERAND_FIELDS, entry.operands()):
            attr = f"_svdq_{self.count}_{field_name}"
            # A buffer, so AOT autograd lifts it like the weights it replaces: under freezing it
            # becomes a frozen parameter, hashed by metadata (not value) in the FX-graph cache key.
            self.gm.register_buffer(attr, tensor)
            if hasattr(self.gm, "_param_name_to_source"):  # AOT autograd maps each lifted buffer to a source
                from torch._dynamo.source import ConstantSource

                self.gm._param_name_to_source[attr] = ConstantSource(attr)
            with graph.inserting_after(weights[0]):
                nodes.append(graph.get_attr(attr))
        self.count += 1
        return QuantizedNodes(*nodes, entry.group_size)


class SVDQuantInductorPass(CustomGraphPass):  # type: ignore[misc]
    """The svdquant rewrite as an Inductor ``pre_grad_custom_pass``, run before ``previous``.

    Example:
        >>> p = SVDQuantInductorPass(SVDQuantConfig(rank=8))
        >>> len(p.uuid())
        64
    """

    def __init__(self, config: SVDQuantConfig | None = None, previous: Callable | None = None) -> None:
        self.config = config or SVDQuantConfig()
        self.previous = previous
        self._warned = False

    def __call__(self, graph: fx.Graph) -> None:
        if os.environ.get("SVDQUANT", "").strip() != "0":
            gm = graph.owning_module
            summary = CompileSummary()
            provider = _FrozenProvider(gm, self.config, summary)
            has_param_inputs = any(n.meta.get("grapharg") is not None and isinstance(getattr(n.meta["grapharg"], "example", None), nn.Parameter) for n in graph.find_nodes(op="placeholder"))
            summary.rewrites = SVDQPassManager(self.config, provider)(graph)
            if not any(summary.rewrites.values()) and has_param_inputs and not self._warned:
                self._warned = True
                log.warning("svdquant Inductor pass: weights are graph inputs, not frozen constants; nothing rewritten. "
                            "Set torch._inductor.config.freezing = True (under torch.no_grad()) or use backend='svdquant'.")
            if summary.layers:
                summary.report(free_weights=False)
                recent_summaries.append(summary)
        if self.previous is not None:
            self.previous(graph)

    def uuid(self) -> str | None:
        previous = self.previous
        if previous is not None and not hasattr(previous, "uuid"):
            return None  # an opaque previous pass: let Inductor bypass its cache rather than lie
        tail = previous.uuid() if previous is not None else ""
        if previous is not None and tail is None:
            return None
        return SVDQPassManager.uuid(self.config) + (f"+{tail}" if tail else "")


def register_inductor_pass(options: dict[str, Any] | None = None, freeze: bool = False) -> SVDQuantInductorPass:
    """Register the svdquant rewrite as Inductor's pre-grad custom pass (one call, idempotent).

    Composes with a pass already registered: a list (newer torch) gets ours appended, a single
    callable (torch 2.11/2.12) is wrapped and still runs after ours; nothing is overwritten. The
    rewrite sees weights only under Inductor freezing; ``freeze=True`` sets
    ``torch._inductor.config.freezing`` (it must be set before ``torch.compile`` traces, and applies
    under ``torch.no_grad()`` only). Returns the registered pass.

    Example:
        >>> import torch._inductor.config as inductor_config
        >>> p = register_inductor_pass({"rank": 16})
        >>> p is register_inductor_pass({"rank": 16})
        True
        >>> unregister_inductor_pass()
    """
    from torch._inductor import config as inductor_config

    config = SVDQuantConfig.from_options(options)
    if freeze:
        inductor_config.freezing = True
    if hasattr(inductor_config, "pre_grad_pass_timing"):
        # "late" (torch >= 2.13's default for passes with a uuid) runs pre-grad passes after AOT
        # autograd has collected the module's parameters, too late to add the quantized tensors
        # as buffers; "early" is what torch 2.11/2.12 always do.
        inductor_config.pre_grad_pass_timing = "early"
    current = inductor_config.pre_grad_custom_pass
    existing = [p for p in (current if isinstance(current, (list, tuple)) else [current]) if isinstance(p, SVDQuantInductorPass)]
    if existing:
        existing[0].config = config
        return existing[0]
    if isinstance(current, (list, tuple)):
        ours = SVDQuantInductorPass(config)
        inductor_config.pre_grad_custom_pass = [*current, ours]
    else:
        ours = SVDQuantInductorPass(config, previous=current)
        inductor_config.pre_grad_custom_pass = ours
    return ours


def unregister_inductor_pass() -> None:
    """Remove the svdquant pass registered by ``register_inductor_pass``, keeping any other pass."""
    from torch._inductor import config as inductor_config

    current = inductor_config.pre_grad_custom_pass
    if isinstance(current, (list, tuple)):
        inductor_config.pre_grad_custom_pass = [p for p in current if not isinstance(p, SVDQuantInductorPass)]
    elif isinstance(current, SVDQuantInductorPass):
        inductor_config.pre_grad_custom_pass = current.previous


__all__ = ["svdquant_backend", "register_inductor_pass", "unregister_inductor_pass", "SVDQuantInductorPass", "skip_reason", "weight_name"]
