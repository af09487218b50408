"""Save a quantized model to one safetensors file and start from it without the 16-bit weights.

File layout (``FORMAT_VERSION``): for each quantized weight ``NAME`` (a parameter name such as
``transformer_blocks.0.attn.to_q.weight``) the tensors ``NAME:qweight`` (int4 packed two per byte),
``NAME:scales``, ``NAME:mult`` (two-level multipliers, empty for "int4"), ``NAME:smooth_inv``,
``NAME:lora_down`` and ``NAME:lora_up``; every other parameter and buffer under its own name, as
it is. The safetensors metadata holds the format version, the quantization config and the list of
quantized weights with their shapes; a JSON file beside it repeats that for people and tools.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import numerics
from .quantized_weights import QuantizedWeight, quantized_entries, register_quantized
from .config import SVDQuantConfig

FORMAT_VERSION = 1
_PARTS = ("qweight", "scales", "mult", "smooth_inv", "lora_down", "lora_up")


def _root(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule wraps the model


def save_quantized(module: nn.Module, path: str | Path) -> Path:
    """Write the quantized weights of ``module`` (compiled with backend="svdquant" and run once).

    Weights not quantized are written in 16-bit, so the file alone rebuilds the model. Returns the
    path written; raises a ValueError when nothing is quantized yet or a weight has several configs.

    Example:
        >>> import tempfile
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> compiled = torch.compile(model, backend="svdquant", options={"rank": 4, "cache_dir": ""})
        >>> with torch.no_grad():
        ...     _ = compiled(torch.randn(2, 64))
        >>> save_quantized(compiled, tempfile.mkdtemp() + "/m.safetensors").suffix
        '.safetensors'
    """
    root = _root(module)
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    quantized: dict[str, list[int]] = {}
    config: dict | None = None
    written: set[int] = set()  # storages already in ``tensors``
    for name, tensor in list(root.named_parameters()) + list(root.named_buffers()):
        entries = quantized_entries(tensor)
        if len(entries) > 1:
            raise ValueError(f"save_quantized: {name} was quantized with {len(entries)} configs; save a model compiled with one set of options")
        if not entries:
            tensors[name] = tensor.detach().contiguous().cpu()
            continue
        (key, entry), = entries.items()
        entry_config = json.loads(key)
        if config is not None and config != entry_config:
            raise ValueError(f"save_quantized: {name} was quantized with {entry_config}, other layers with {config}; compile with one set of options")
        config = entry_config
        for part, value in zip(_PARTS, _pack(entry, entry_config)):
            value = value.detach().contiguous().cpu()
            if value.numel() and value.untyped_storage().data_ptr() in written:
                value = value.clone()  # members of a joint quantization share operands, and safetensors refuses shared memory
            written.add(value.untyped_storage().data_ptr())
            tensors[f"{name}:{part}"] = value
        quantized[name] = list(tensor.shape)
    if not quantized:
        raise ValueError("save_quantized: no quantized layer found; compile the model with backend='svdquant' and run it once first")
    meta = {"format_version": FORMAT_VERSION, "config": config, "quantized": quantized}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"svdq_compile": json.dumps(meta)})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return path


def _pack(entry: QuantizedWeight, config: dict) -> tuple[Tensor, ...]:
    two_level = config["format"] != "int4"
    operand = entry.weight_q
    if operand.dtype == torch.uint8:  # kept packed in memory (packed_weights=True)
        operand = numerics.unpack_weight_operand(operand, entry.smooth_inv.shape[0], config["group_size"], two_level)
    if operand.dtype == torch.float8_e4m3fn:  # "int4_pow2": the same integers as int8
        operand = operand.float().to(torch.int8)
    if two_level:
        q, mult = numerics.split_2level(operand, config["group_size"])
    else:
        q, mult = operand, torch.empty(0, dtype=torch.uint8)
    return numerics.pack_int4(q), entry.weight_scales, mult, entry.smooth_inv, entry.lora_down, entry.lora_up


def checkpoint_config(config: SVDQuantConfig) -> SVDQuantConfig:
    """``config`` with the quantization fields of the checkpoint it names (``config.checkpoint``).

    The backend compiles with these, so it finds the operands ``load_quantized`` registered.

    Example:
        >>> checkpoint_config(SVDQuantConfig()).rank  # no checkpoint: unchanged
        32
    """
    if not config.checkpoint:
        return config
    with safe_open(str(config.checkpoint), framework="pt") as f:
        raw = (f.metadata() or {}).get("svdq_compile")
    if raw is None:
        raise ValueError(f"checkpoint {config.checkpoint} is not an svdq_compile checkpoint; write one with svdq_compile.save_quantized")
    return dataclasses.replace(config, **json.loads(raw)["config"])


def load_quantized(model: nn.Module, path: str | Path, device: str | torch.device | None = None, packed_weights: bool = False) -> SVDQuantConfig:
    """Load a ``save_quantized`` file into ``model`` (on CPU, a device, or the meta device).

    Every weight and buffer comes from the file; quantized weights become shape-only parameters (no
    memory) whose quantized operands the ``svdquant`` backend then uses without quantizing. Compile
    afterwards with ``options={"checkpoint": path}``. ``packed_weights=True`` keeps the weights at 4
    bits in memory (see ``SVDQuantConfig.packed_weights``). Returns the checkpoint's config. A file that
    does not match the model (missing layer, other shape, other format version) raises a ValueError
    naming the layer; nothing is loaded partially.

    Example:
        >>> import tempfile
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> compiled = torch.compile(model, backend="svdquant", options={"rank": 4, "cache_dir": ""})
        >>> with torch.no_grad():
        ...     _ = compiled(torch.randn(2, 64))
        >>> path = save_quantized(compiled, tempfile.mkdtemp() + "/m.safetensors")
        >>> load_quantized(torch.nn.Sequential(torch.nn.Linear(64, 64)), path).rank
        4
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_quantized: no checkpoint at {path}; write one with svdq_compile.save_quantized")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("svdq_compile")
        if raw is None:
            raise ValueError(f"load_quantized: {path} is not an svdq_compile checkpoint (no 'svdq_compile' metadata)")
        meta = json.loads(raw)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"load_quantized: {path} has format version {meta.get('format_version')}, this svdq_compile reads {FORMAT_VERSION}; re-save it with this version")
        config = SVDQuantConfig(**meta["config"], checkpoint=str(path), packed_weights=packed_weights)
        quantized = meta["quantized"]
        stored = set(f.keys())
        targets = dict(model.named_parameters()) | dict(model.named_buffers())
        _check_matches(targets, quantized, stored, f, path)
        device = torch.device(device) if device is not None else None
        for name, target in targets.items():
            where = device or (target.device if target.device.type != "meta" else torch.device("cpu"))
            if name in quantized:
                parts = {part: _own(f.get_tensor(f"{name}:{part}"), where) for part in _PARTS}
                weight = torch.empty(target.shape, dtype=target.dtype, device=where)
                weight.untyped_storage().resize_(0)  # shape-only: the 16-bit values are never needed
                new = nn.Parameter(weight, requires_grad=False)
                register_quantized(new, config, _unpack(parts, config, name))
            else:
                new = _own(f.get_tensor(name), where)
            _set(model, name, new, is_param=name in dict(model.named_parameters()))
    return config


def _own(tensor: Tensor, device: torch.device) -> Tensor:
    # A fresh allocation, not a view into the file's buffer: CPU BLAS kernels pick their code path
    # by alignment, and outputs must be bit-identical to the model that was saved.
    return tensor.to(device, copy=True)


def _check_matches(targets: dict[str, Tensor], quantized: dict[str, list[int]], stored: set[str], f, path: Path) -> None:
    for name, shape in quantized.items():
        if name not in targets:
            raise ValueError(f"load_quantized: {path} has quantized layer {name!r} that the model lacks; load it into the model it was saved from")
        if list(targets[name].shape) != shape:
            raise ValueError(f"load_quantized: layer {name!r} is {shape} in {path} but {list(targets[name].shape)} in the model")
    for name, target in targets.items():
        if name in quantized:
            continue
        if name not in stored:
            raise ValueError(f"load_quantized: the model's {name!r} is missing from {path}; save the checkpoint from this model's architecture")
        shape = list(f.get_slice(name).get_shape())
        if shape != list(target.shape):
            raise ValueError(f"load_quantized: {name!r} is {shape} in {path} but {list(target.shape)} in the model")


def _unpack(parts: dict[str, Tensor], config: SVDQuantConfig, name: str) -> QuantizedWeight:
    fp8 = config.format == "int4_pow2"
    if config.packed_weights and not fp8:  # the file's layout is numerics.pack_weight_operand's, split in two
        weight_q = torch.cat((parts["qweight"], parts["mult"]), dim=-1) if config.two_level else parts["qweight"]
    else:
        q = numerics.unpack_int4(parts["qweight"])
        weight_q = numerics.expand_2level(q, parts["mult"], config.group_size, fp8=fp8) if config.two_level else q
        if config.packed_weights and numerics.packs(weight_q, config.group_size):  # int4_pow2 packs exponents, not the file's multipliers
            weight_q = numerics.pack_weight_operand(weight_q, config.group_size, True)
    return QuantizedWeight(weight_q, parts["scales"], parts["smooth_inv"], parts["lora_down"], parts["lora_up"],
                           config.group_size, name.removesuffix(".weight"), seconds=0.0, from_cache=True, freed=True)


def _set(model: nn.Module, name: str, value: Tensor, is_param: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if is_param:
        owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


__all__ = ["save_quantized", "load_quantized", "checkpoint_config", "FORMAT_VERSION"]
