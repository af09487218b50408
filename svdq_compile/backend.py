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
   parameter identity). This is what makes ``compile_repeated_blocks`` correct (one compiled graph
   serves every block, each with its own weights), keeps quantized weights out of Inductor's
   FX-graph cache key (inputs are hashed by shape/dtype only), and lets a recompile (another
   resolution, batch, ``dynamic=True``) reuse them. A weight seen for the first time is quantized
   once: at compile time for the weights of the traced call, at its first call for other blocks
   sharing the graph; the disk cache (``svdq_compile.cache``) serves repeated processes.
3. The rewritten graph goes to Inductor's ``compile_fx`` with ``mode``'s Inductor options.
4. After the first call that used a quantized weight, its 16-bit storage is released with
   ``untyped_storage().resize_(0)``: shape and strides stay, so Dynamo's guards still pass and
   recompiles still trace, but the memory is gone. A weight that any compiled graph still reads in
   16-bit is never freed. Eager forward calls afterwards fail in PyTorch with
   ``setStorage: ... out of bounds for storage of size 0``, but copies of a freed weight (moving the
   model, deepcopy, saving a state_dict) are unchecked and crash or read garbage, as for FSDP's
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
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import cache, calibration
from .config import SVDQuantConfig
from .passes.base import QuantizedNodes, linear_parts
from .passes.pass_manager import SVDQPassManager
from .quantized_linear import QuantizedLinear
from .summary import CompileSummary

log = logging.getLogger("svdq_compile")

# Below this many output features a W4A4 GEMM saves nothing worth its activation quantization.
MIN_OUT_FEATURES = 16
# How Dynamo spells module attribute lookups in a source; not part of the module's name.
_CONTAINER_ATTRS = {"__dict__", "_modules", "_parameters", "_buffers"}
_OPERAND_FIELDS = ("weight_q", "weight_scales", "smooth_inv", "lora_down", "lora_up")


@dataclass
class QuantizedWeight:
    """The op operands of one quantized weight, shared by every graph that uses the weight."""

    weight_q: Tensor
    weight_scales: Tensor
    smooth_inv: Tensor
    lora_down: Tensor
    lora_up: Tensor
    group_size: int
    name: str
    seconds: float
    from_cache: bool
    freed: bool = False

    def operands(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, f) for f in _OPERAND_FIELDS)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.operands())


# weight Parameter -> {config_key(config): QuantizedWeight}; identity-keyed and weak, so a model that is
# deleted takes its quantized weights with it.
_QUANTIZED: WeakIdKeyDictionary = WeakIdKeyDictionary()
# Parameters that some compiled graph reads in 16-bit: never freed.
_READ_IN_16BIT: WeakIdKeyDictionary = WeakIdKeyDictionary()
_warned_no_calibration = False
# The summaries of the latest compiles, newest last (for inspection in notebooks and tests).
recent_summaries: collections.deque[CompileSummary] = collections.deque(maxlen=64)


def config_key(config: SVDQuantConfig) -> str:
    """The registry key of a config: JSON of the fields that change quantized weights.

    Example:
        >>> config_key(SVDQuantConfig(rank=8)) == config_key(SVDQuantConfig(rank=8, skip=()))
        True
    """
    return json.dumps(config.quantization_key(), sort_keys=True)


def quantized_entries(weight: Tensor) -> dict[str, QuantizedWeight]:
    """``{config_key: QuantizedWeight}`` of every config ``weight`` was quantized with (may be empty).

    Example:
        >>> quantized_entries(torch.nn.Parameter(torch.randn(4, 64)))
        {}
    """
    return dict(_QUANTIZED.get(weight, {}))


def register_quantized(weight: Tensor, config: SVDQuantConfig, entry: QuantizedWeight) -> None:
    """Make ``entry`` the quantized form of ``weight`` under ``config`` (e.g. loaded from a checkpoint),
    so the backend uses it instead of quantizing.

    Example:
        >>> w = torch.nn.Parameter(torch.randn(32, 64))
        >>> q = quantize_weight(w, "fc", SVDQuantConfig(rank=4, cache_dir=""))
        >>> w2 = torch.nn.Parameter(torch.empty(32, 64)); register_quantized(w2, SVDQuantConfig(rank=4), q)
        >>> quantize_weight(w2, "fc", SVDQuantConfig(rank=4)) is q
        True
    """
    _QUANTIZED.setdefault(weight, {})[config_key(config)] = entry


def quantize_weight(weight: Tensor, name: str, config: SVDQuantConfig) -> QuantizedWeight:
    """The quantized operands of ``weight`` for ``config``: from memory, the disk cache, or computed.

    Example:
        >>> w = torch.nn.Parameter(torch.randn(32, 64))
        >>> q = quantize_weight(w, "fc", SVDQuantConfig(rank=4, cache_dir=""))
        >>> q is quantize_weight(w, "fc", SVDQuantConfig(rank=4, cache_dir="")), q.weight_q.dtype
        (True, torch.int8)
    """
    global _warned_no_calibration
    config_id = config_key(config)
    per_config = _QUANTIZED.get(weight)
    if per_config is not None and config_id in per_config:
        return per_config[config_id]
    if weight.untyped_storage().nbytes() == 0:
        raise RuntimeError(
            f"svdquant: the 16-bit weight of {name!r} has no storage (freed by an earlier svdquant compile, or loaded shape-only "
            f"from a checkpoint) and was never quantized with {config_key(config)}; compile with the same quantization options as "
            "before, or keep the weights with options={'free_weights': False}"
        )
    start = time.perf_counter()
    stats = calibration.stats_for(weight)
    if stats is None and config.alpha is None and not _warned_no_calibration:
        _warned_no_calibration = True
        log.info("svdquant: no calibration statistics (see svdq_compile.calibrate); layers use weight-only smoothing (alpha = 0)")
    key = cache.layer_key(weight, config, stats) if cache.cache_dir(config) else None
    with torch.no_grad():
        layer = cache.load(config, key, weight.device) if key else None
        from_cache = layer is not None
        if layer is None:
            layer = QuantizedLinear.from_weight(weight, None, config, stats)
            if key:
                cache.save(config, key, layer)
        entry = QuantizedWeight(layer.weight_operand(), layer.scales, layer.smooth_inv, layer.lora_down, layer.lora_up, config.group_size, name, time.perf_counter() - start, from_cache)
    _QUANTIZED.setdefault(weight, {})[config_id] = entry
    return entry


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
    input_index: int  # position of the 16-bit weight among the graph's inputs
    name: str


class _Provider:
    """Shared logic of the backend's and the Inductor pass's weight providers."""

    def __init__(self, config: SVDQuantConfig, summary: CompileSummary) -> None:
        self.config = config
        self.config_id = config_key(config)
        self.summary = summary
        self.decided: dict[fx.Node, QuantizedNodes | None] = {}
        self.progress = None

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
        fresh = self.config_id not in _QUANTIZED.get(tensor, {})
        entry = quantize_weight(tensor, name, self.config)
        if self.progress is not None and fresh:
            self.progress.update(1)
        self.summary.quantized(name, tensor, entry, fresh)
        return self.make_nodes(graph, weight, name, entry)

    def count_candidates(self, graph: fx.Graph) -> int:
        """Weights the passes will ask about that still need quantizing (for the progress bar)."""
        count = 0
        for node in graph.nodes:
            parts = linear_parts(node)
            found = self.tensor_and_name(parts[1]) if parts else None
            if found and skip_reason(found[1], found[0], self.config) is None and self.config_id not in _QUANTIZED.get(found[0], {}):
                count += 1
        return count

    def tensor_and_name(self, weight: fx.Node) -> tuple[Tensor, str] | None:
        raise NotImplementedError

    def make_nodes(self, graph: fx.Graph, weight: fx.Node, name: str, entry: QuantizedWeight) -> QuantizedNodes:
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

    def tensor_and_name(self, weight: fx.Node) -> tuple[Tensor, str] | None:
        if weight not in self.index:
            return None
        grapharg = weight.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None and grapharg.source is not None else str(weight.target)
        source = source() if callable(source) else source
        return self.example_inputs[self.index[weight]], self.prefix + weight_name(source)

    def make_nodes(self, graph: fx.Graph, weight: fx.Node, name: str, entry: QuantizedWeight) -> QuantizedNodes:
        last = list(graph.find_nodes(op="placeholder"))[-1]
        nodes = []
        for field_name, tensor in zip(_OPERAND_FIELDS, entry.operands()):
            with graph.inserting_after(last):
                last = graph.placeholder(f"svdq_{len(self.layers)}_{field_name}")
            last.meta["example_value"] = tensor
            # No user-code source (like DDP's split graphs), but static: cudagraphs must not copy
            # the weights into their own buffers on every call, just as for parameters.
            last._dynamo_source = None
            last.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
            nodes.append(last)
            self.extra_inputs.append(tensor)
        self.layers.append(_Layer(self.index[weight], name))
        return QuantizedNodes(*nodes, entry.group_size)


class _RuntimeCall:
    """Calls the compiled graph with the quantized operands of the weights passed in this call."""

    def __init__(self, compiled: Callable, layers: list[_Layer], config: SVDQuantConfig) -> None:
        self.compiled = compiled
        self.layers = layers
        self.config = config
        self.announced = False

    def __call__(self, *args: Any) -> Any:
        known = len(_QUANTIZED)
        entries = [quantize_weight(args[layer.input_index], layer.name, self.config) for layer in self.layers]
        if not self.announced and len(_QUANTIZED) > known:
            self.announced = True  # regional compilation: the other blocks' weights arrive at their first call
            log.info("svdquant: quantized the weights of a module that shares a compiled graph, at its first call; the others follow")
        extra = [t for entry in entries for t in entry.operands()]
        out = self.compiled(*args, *extra)
        if self.config.free_weights:
            for layer, entry in zip(self.layers, entries):
                if not entry.freed:
                    entry.freed = _free(args[layer.input_index])
        return out


def _free(weight: Tensor) -> bool:
    """Release the storage of a 16-bit weight nothing reads any more; True when it is gone."""
    if weight in _READ_IN_16BIT:
        return False
    weight.untyped_storage().resize_(0)
    return True


def _inductor_patches(mode: str | None) -> dict[str, Any]:
    """Inductor config that ``torch.compile(mode=...)`` applies, with a clear error on a typo."""
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if mode is not None and mode not in modes:
        raise ValueError(f"svdquant: unknown mode {mode!r}; valid modes are {sorted(modes)}")
    return dict(modes[mode]) if mode else {}


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
    ones); ``mode`` is forwarded to Inductor like ``torch.compile(mode=...)`` does. Returns the
    compiled callable. ``SVDQUANT=0`` in the environment skips the rewrite (plain Inductor).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> with torch.no_grad():
        ...     y = torch.compile(model, backend="svdquant", options={"rank": 8, "cache_dir": ""})(torch.randn(4, 64))
        >>> y.shape
        torch.Size([4, 64])
    """
    from torch._inductor.compile_fx import compile_fx

    from .checkpoint import checkpoint_config  # the checkpoint module builds on this one's registry

    config = checkpoint_config(SVDQuantConfig.from_options(options))
    patches = _inductor_patches(mode)
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
    start = time.perf_counter()
    compiled = compile_fx(gm, [*example_inputs, *provider.extra_inputs], config_patches=patches)
    summary.compile_seconds = time.perf_counter() - start
    summary.report(free_weights=config.free_weights)
    recent_summaries.append(summary)
    if not provider.layers:
        return compiled
    return _RuntimeCall(compiled, provider.layers, config)


# ---------------------------------------------------------------------------------------------
# Inductor custom pass


class _FrozenProvider(_Provider):
    """Weights are ``get_attr`` constants (Inductor freezing); operands are attached as constants."""

    def __init__(self, gm: fx.GraphModule, config: SVDQuantConfig, summary: CompileSummary) -> None:
        super().__init__(config, summary)
        self.gm = gm
        self.fqn = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
        self.count = 0

    def tensor_and_name(self, weight: fx.Node) -> tuple[Tensor, str] | None:
        if weight.op != "get_attr":
            return None
        tensor = self.gm
        for part in str(weight.target).split("."):
            tensor = getattr(tensor, part)
        return tensor, weight_name(self.fqn.get(weight.target, str(weight.target)))

    def make_nodes(self, graph: fx.Graph, weight: fx.Node, name: str, entry: QuantizedWeight) -> QuantizedNodes:
        nodes = []
        for field_name, tensor in zip(_OPERAND_FIELDS, entry.operands()):
            attr = f"_svdq_{self.count}_{field_name}"
            # A buffer, so AOT autograd lifts it like the weights it replaces: under freezing it
            # becomes a frozen parameter, hashed by metadata (not value) in the FX-graph cache key.
            self.gm.register_buffer(attr, tensor)
            if hasattr(self.gm, "_param_name_to_source"):  # AOT autograd maps each lifted buffer to a source
                from torch._dynamo.source import ConstantSource

                self.gm._param_name_to_source[attr] = ConstantSource(attr)
            with graph.inserting_after(weight):
                nodes.append(graph.get_attr(attr))
        self.count += 1
        return QuantizedNodes(*nodes, entry.group_size)


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # torch without custom pass classes: the pass is still a callable
    CustomGraphPass = object  # type: ignore[misc,assignment]


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
            if not summary.rewrites.get("LinearToW4A4Pass") and not summary.rewrites.get("LoraLinearFusionPass") and has_param_inputs and not self._warned:
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


__all__ = ["svdquant_backend", "register_inductor_pass", "unregister_inductor_pass", "SVDQuantInductorPass", "quantize_weight", "quantized_entries", "register_quantized", "config_key", "skip_reason", "weight_name", "QuantizedWeight"]
