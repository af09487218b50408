"""The quantized form of each weight: the W4A4 op's operands, made once per weight Parameter and
quantization config (from memory, the disk cache, or computed) and shared by every compiled graph,
checkpoint and LoRA merge that uses the weight.

Entries are keyed by the Parameter's identity, weakly (a deleted model takes its quantized weights
with it), and by ``config_key``. Linears that read the same input can share one layer quantized
over their concatenated weights (``quantize_group``), each member's entry being its rows.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from . import cache, calibration, numerics
from .config import SVDQuantConfig
from .quantized_linear import CalibrationStats, QuantizedLinear

log = logging.getLogger("svdq_compile")

# The op operands of a quantized weight, in the order the op and the compiled graphs take them.
OPERAND_FIELDS = ("weight_q", "weight_scales", "smooth_inv", "lora_down", "lora_up")


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
    # the joint quantizations this weight's rows are part of (see QuantizedGroup)
    groups: list[QuantizedGroup] = field(default_factory=list, repr=False)

    def operands(self) -> tuple[Tensor, ...]:
        """In ``OPERAND_FIELDS`` order (spelled out: this runs for every layer on every call)."""
        return self.weight_q, self.weight_scales, self.smooth_inv, self.lora_down, self.lora_up

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.operands())


@dataclass
class QuantizedGroup:
    """One quantized layer over the concatenated weights of linears that read the same input.

    Weight quantization is per output row, so each member's rows of ``joint`` (``weight_q``,
    ``weight_scales``, ``lora_up``, with the shared ``smooth_inv`` and ``lora_down``) are a valid
    layer by themselves whose output is the member's columns of the joint output: the members'
    registry entries are those rows, as views of ``joint``'s tensors.
    """

    joint: QuantizedWeight
    members: tuple[QuantizedWeight, ...] = field(repr=False)
    # the members' operands when ``joint`` was made: a member whose operands were replaced since
    # (a LoRA fused into it) is no longer what ``joint`` computes
    built_from: tuple[tuple[Tensor, ...], ...] = field(repr=False)

    def current(self) -> bool:
        """True while every member still has the operands ``joint`` was made from."""
        return all(all(map(operator.is_, member.operands(), operands)) for member, operands in zip(self.members, self.built_from))


class _WeakIdRegistry:
    """A dict keyed by tensor identity that drops an item when its tensor dies.

    ``torch.utils.weak.WeakIdKeyDictionary`` does this too, but builds a weak reference object per
    lookup (about 3 us); compiled graphs look up every quantized weight on every call.

    Example:
        >>> registry, w = _WeakIdRegistry(), torch.zeros(1)
        >>> registry.setdefault(w, {})["k"] = 1
        >>> registry.get(w), len(registry)
        ({'k': 1}, 1)
        >>> del w; len(registry)
        0
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, key: Tensor, default: Any = None) -> Any:
        item = self._items.get(id(key))
        return item[1] if item is not None and item[0]() is key else default

    def setdefault(self, key: Tensor, default: Any) -> Any:
        item = self._items.get(id(key))
        if item is not None and item[0]() is key:
            return item[1]
        items = self._items
        # The callback runs when the tensor dies, before its id can be reused.
        self._items[id(key)] = (weakref.ref(key, lambda _, k=id(key): items.pop(k, None)), default)
        return default

    def pop(self, key: Tensor, default: Any = None) -> Any:
        value = self.get(key, self)
        if value is self:
            return default
        del self._items[id(key)]
        return value

    def values(self) -> list[Any]:
        return [value for _, value in self._items.values()]

    def __len__(self) -> int:
        return len(self._items)


# weight Parameter -> {config_key(config): QuantizedWeight}; identity-keyed and weak, so a model that is
# deleted takes its quantized weights with it.
_QUANTIZED = _WeakIdRegistry()
_warned_no_calibration = False


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


def forget_quantized(weight: Tensor) -> None:
    """Drop every quantized form of ``weight``, and of the weights quantized jointly with it (their
    operands share its SVD and smoothing), so the next use quantizes them again.

    Example:
        >>> w = torch.nn.Parameter(torch.randn(32, 64)); _ = quantize_weight(w, "fc", SVDQuantConfig(rank=4, cache_dir=""))
        >>> forget_quantized(w); quantized_entries(w)
        {}
    """
    popped = _QUANTIZED.pop(weight, {}).values()
    joined = {id(member) for entry in popped for group in entry.groups for member in group.members}
    for per_config in list(_QUANTIZED.values()) if joined else ():
        for key, entry in list(per_config.items()):
            if id(entry) in joined:
                del per_config[key]


def has_entry(weight: Tensor, config_id: str) -> bool:
    """Whether ``weight`` has a quantized form under the config whose ``config_key`` is ``config_id``.

    Example:
        >>> has_entry(torch.nn.Parameter(torch.randn(4, 64)), config_key(SVDQuantConfig()))
        False
    """
    return config_id in _QUANTIZED.get(weight, {})


def weights_quantized() -> int:
    """How many live weights have a quantized form (under any config).

    Example:
        >>> before = weights_quantized(); w = torch.nn.Parameter(torch.randn(32, 64))
        >>> _ = quantize_weight(w, "fc", SVDQuantConfig(rank=4, cache_dir="")); weights_quantized() - before
        1
    """
    return len(_QUANTIZED)


def live_entries() -> list[QuantizedWeight]:
    """Every quantized form of every live weight, under any config (memory accounting).

    Example:
        >>> w = torch.nn.Parameter(torch.randn(32, 64)); q = quantize_weight(w, "fc", SVDQuantConfig(rank=4, cache_dir=""))
        >>> any(entry is q for entry in live_entries())
        True
    """
    return [entry for per_config in _QUANTIZED.values() for entry in per_config.values()]


def quantize_weight(weight: Tensor, name: str, config: SVDQuantConfig) -> QuantizedWeight:
    """The quantized operands of ``weight`` for ``config``: from memory, the disk cache, or computed.

    Example:
        >>> w = torch.nn.Parameter(torch.randn(32, 64))
        >>> q = quantize_weight(w, "fc", SVDQuantConfig(rank=4, cache_dir=""))
        >>> q is quantize_weight(w, "fc", SVDQuantConfig(rank=4, cache_dir="")), q.weight_q.dtype
        (True, torch.int8)
    """
    return weight_entry(weight, name, config, config_key(config))


def weight_entry(weight: Tensor, name: str, config: SVDQuantConfig, config_id: str) -> QuantizedWeight:
    """``quantize_weight`` with the config's key given: a compiled graph's calls look their
    operands up on every call, and the key's JSON would cost more than the lookup.

    Example:
        >>> w, config = torch.nn.Parameter(torch.randn(32, 64)), SVDQuantConfig(rank=4, cache_dir="")
        >>> weight_entry(w, "fc", config, config_key(config)) is quantize_weight(w, "fc", config)
        True
    """
    per_config = _QUANTIZED.get(weight)
    if per_config is not None and config_id in per_config:
        return per_config[config_id]
    _require_storage(weight, name, config)
    start = time.perf_counter()
    entry = _quantized_entry(weight, name, config, calibration.stats_for(weight), start)
    _QUANTIZED.setdefault(weight, {})[config_id] = entry
    return entry


def quantize_group(weights: Sequence[Tensor], names: Sequence[str], config: SVDQuantConfig) -> QuantizedGroup | None:
    """One quantized layer over ``weights`` concatenated (weights of linears that read the same
    input), with each weight's registry entry its rows; None when they cannot share one.

    Weights not quantized yet are quantized together (one SVD of rank ``config.rank`` and one
    smoothing for all; the disk cache keys the concatenated weight). Weights that all have entries
    already are joined by concatenating those, if they share ``smooth_inv`` and ``lora_down`` (they
    were quantized jointly before, or loaded from a checkpoint of such a model); otherwise, and when
    only some have entries, they cannot share an op without quantizing them again: None.

    Example:
        >>> ws = [torch.nn.Parameter(torch.randn(32, 64)) for _ in range(3)]
        >>> group = quantize_group(ws, ["q", "k", "v"], SVDQuantConfig(rank=4, cache_dir=""))
        >>> tuple(group.joint.weight_q.shape), quantize_weight(ws[1], "k", SVDQuantConfig(rank=4)) is group.members[1]
        ((96, 64), True)
    """
    return group_entry(weights, names, config, config_key(config))


def group_entry(weights: Sequence[Tensor], names: Sequence[str], config: SVDQuantConfig, config_id: str) -> QuantizedGroup | None:
    """``quantize_group`` with the config's key given (see ``weight_entry``).

    Example:
        >>> ws, config = [torch.nn.Parameter(torch.randn(32, 64)) for _ in range(2)], SVDQuantConfig(rank=4, cache_dir="")
        >>> group_entry(ws, ["k", "v"], config, config_key(config)) is quantize_group(ws, ["k", "v"], config)
        True
    """
    entries = [_QUANTIZED.get(w, {}).get(config_id) for w in weights]
    if all(e is None for e in entries):
        return _quantize_jointly(weights, names, config, config_id)
    if any(e is None for e in entries):
        return None
    for group in entries[0].groups:
        if len(group.members) == len(entries) and all(a is b for a, b in zip(group.members, entries)) and group.current():
            return group
    return _concatenated(entries, names)


def _quantize_jointly(weights: Sequence[Tensor], names: Sequence[str], config: SVDQuantConfig, config_id: str) -> QuantizedGroup | None:
    if len({(w.dtype, w.device, w.shape[1:]) for w in weights}) > 1:
        return None
    for weight, name in zip(weights, names):
        _require_storage(weight, name, config)
    start = time.perf_counter()
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
    joint = _quantized_entry(weight, "+".join(names), config, _shared_stats([calibration.stats_for(w) for w in weights]), start)
    sizes = [w.shape[0] for w in weights]
    members = [QuantizedWeight(*operands, config.group_size, name, joint.seconds * n / weight.shape[0], joint.from_cache)
               for operands, name, n in zip(_member_rows(joint, sizes), names, sizes)]
    for w, member in zip(weights, members):
        _QUANTIZED.setdefault(w, {})[config_id] = member
    return _grouped(joint, members)


def _concatenated(entries: list[QuantizedWeight], names: Sequence[str]) -> QuantizedGroup | None:
    first = entries[0]
    if any(e.group_size != first.group_size or not _same(e.smooth_inv, first.smooth_inv) or not _same(e.lora_down, first.lora_down) for e in entries[1:]):
        return None
    joint = QuantizedWeight(_cat_rows([e.weight_q for e in entries]), _cat_rows([e.weight_scales for e in entries]), first.smooth_inv, first.lora_down,
                            _cat_rows([e.lora_up for e in entries]), first.group_size, "+".join(names), 0.0, all(e.from_cache for e in entries))
    if not any(e.groups for e in entries):
        # entries loaded one by one (a checkpoint): keep one copy of the operands, the members as views of the joint's
        for entry, operands in zip(entries, _member_rows(joint, [e.weight_q.shape[0] for e in entries])):
            for field_name, tensor in zip(OPERAND_FIELDS, operands):
                setattr(entry, field_name, tensor)
    return _grouped(joint, entries)


def _grouped(joint: QuantizedWeight, members: list[QuantizedWeight]) -> QuantizedGroup:
    group = QuantizedGroup(joint, tuple(members), tuple(m.operands() for m in members))
    for member in members:
        member.groups.append(group)
    return group


def _member_rows(joint: QuantizedWeight, sizes: list[int]) -> list[tuple[Tensor, ...]]:
    """Each member's operands (in ``OPERAND_FIELDS`` order) as views of ``joint``'s rows."""
    operands, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        operands.append((joint.weight_q[rows], joint.weight_scales[rows], joint.smooth_inv, joint.lora_down, joint.lora_up[rows]))
        start += n
    return operands


def _cat_rows(parts: list[Tensor]) -> Tensor:
    """``torch.cat(parts)``, as a view when the parts are adjacent rows of one tensor: members of a
    joint quantization run as a smaller group cost no copy.

    Example:
        >>> t = torch.arange(12).reshape(6, 2)
        >>> joined = _cat_rows([t[1:3], t[3:4]]); torch.equal(joined, t[1:4]), joined.data_ptr() == t[1:].data_ptr()
        (True, True)
    """
    first, offset = parts[0], parts[0].storage_offset()
    for part in parts:
        same_tensor = part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and part.dtype == first.dtype and part.shape[1:] == first.shape[1:]
        if not (same_tensor and part.is_contiguous() and part.storage_offset() == offset):
            return torch.cat(parts)
        offset += part.numel()
    return first.as_strided((sum(p.shape[0] for p in parts), *first.shape[1:]), first.stride(), first.storage_offset())


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))


def _shared_stats(stats: list[CalibrationStats | None]) -> CalibrationStats | None:
    """One input's statistics from its readers' records: the channel maxima's maximum (the records
    differ only in which rows they sampled) and the first record's rows."""
    present = [s for s in stats if s is not None]
    if not present:
        return None
    absmax = functools.reduce(torch.maximum, [s.absmax for s in present])
    return CalibrationStats(absmax=absmax, sample=present[0].sample)


def _require_storage(weight: Tensor, name: str, config: SVDQuantConfig) -> None:
    if weight.untyped_storage().nbytes() == 0:
        raise RuntimeError(
            f"svdquant: the 16-bit weight of {name!r} has no storage (freed by an earlier svdquant compile, or loaded shape-only "
            f"from a checkpoint) and was never quantized with {config_key(config)}; compile with the same quantization options as "
            "before, or keep the weights with options={'free_weights': False}"
        )


def _quantized_entry(weight: Tensor, name: str, config: SVDQuantConfig, stats: CalibrationStats | None, start: float) -> QuantizedWeight:
    """Quantize ``weight`` (or read it from the disk cache, or write it there); ``start`` is when
    the caller began, for the time the summary reports."""
    global _warned_no_calibration
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
        weight_q = layer.weight_operand()
        if config.packed_weights and numerics.packs(weight_q, config.group_size):
            weight_q = numerics.pack_weight_operand(weight_q, config.group_size, config.two_level)
        return QuantizedWeight(weight_q, layer.scales, layer.smooth_inv, layer.lora_down, layer.lora_up, config.group_size, name, time.perf_counter() - start, from_cache)


__all__ = ["QuantizedWeight", "QuantizedGroup", "config_key", "quantized_entries", "register_quantized", "forget_quantized", "quantize_weight", "quantize_group"]
