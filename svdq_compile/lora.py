"""LoRA strengths that change without recompiling, and ``fuse_lora`` on quantized layers.

peft keeps each adapter's strength in ``layer.scaling[adapter]`` as a Python float. Dynamo bakes a
float it reads into the graph and guards on its value, so every ``set_adapters(..., weights)``,
``fuse_lora(lora_scale=...)`` or hotswap with another alpha recompiles the whole model. Here the
``scaling`` dict of every peft LoRA layer becomes a ``TensorScaling``: its values are 0-dim fp32
tensors (graph inputs, guarded on metadata only), and peft's own writes (``set_scale``,
``scale_layer``, hotswap) update those tensors in place, so the compiled graph reads the new
strength at its next call.

peft's ``merge`` (``fuse_lora``) adds ``scale * B @ A`` to the 16-bit weight, which a quantized
layer no longer reads (and whose storage the backend may have freed). On a layer that has quantized
operands, ``merge`` here appends ``A`` / ``scale * B`` to those operands' low-rank factors instead,
the way SVDQuant runs LoRAs, and ``unmerge`` takes them off again; the 16-bit weight is merged too
while it still has storage.

The svdquant LoRA pass calls ``prepare_lora_layers`` on the compiled module whenever it meets
adapters; a float strength it converts makes that graph recompile once, at its next call. Calling
it yourself after loading the LoRAs and before compiling saves that one recompile.

Example:
    >>> from peft import LoraConfig, inject_adapter_in_model
    >>> model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(8, 8)))
    >>> prepare_lora_layers(model)
    1
    >>> model[0].set_scale("default", 0.5); model[0].scaling["default"]
    tensor(1.)
"""

from __future__ import annotations

import numbers
import types
from typing import Any

import torch
from torch import Tensor, nn

from .quantized_weights import forget_quantized, quantized_entries

# Largest total low-rank rank (SVD branch + every fused adapter) folded into one svdq.w4a4_linear;
# the CUDA kernel fuses the down projection up to this rank. Adapters past it run as a 16-bit branch.
MAX_FUSED_RANK = 256


class TensorScaling(dict):
    """peft's ``{adapter: strength}`` dict with 0-dim fp32 tensor values that are updated in place.

    Assigning a number (or a tensor) to an existing adapter copies it into that adapter's tensor;
    a new adapter gets a new tensor on ``device``.

    Example:
        >>> s = TensorScaling({"a": 2.0}, device="cpu"); t = s["a"]
        >>> s["a"] = 0.25; s["a"] is t, t.item()
        (True, 0.25)
    """

    def __init__(self, values: dict[str, Any], device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        for key, value in values.items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        current = self.get(key)
        if isinstance(current, Tensor):
            if value is not current:
                with torch.no_grad():
                    current.copy_(torch.as_tensor(value, dtype=current.dtype))
            return
        if not isinstance(value, (numbers.Real, Tensor)):
            raise TypeError(f"TensorScaling: the strength of adapter {key!r} must be a number or a 0-dim tensor, got {type(value).__name__}")
        super().__setitem__(key, torch.as_tensor(value, dtype=torch.float32).to(self.device).clone())

    def __reduce__(self) -> tuple:  # deepcopy / pickle keep the class and the device
        return (TensorScaling, (dict(self), self.device))


def prepare_lora_layers(model: nn.Module) -> int:
    """Make the strengths of every peft LoRA layer in ``model`` in-place tensors, and give linear
    LoRA layers the quantization-aware ``merge`` / ``unmerge``. Idempotent; returns how many layers
    had float strengths converted now.

    Example:
        >>> prepare_lora_layers(torch.nn.Linear(4, 4))
        0
    """
    converted = 0
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict) or not hasattr(module, "lora_A") or not hasattr(module, "get_base_layer"):
            continue
        if not isinstance(scaling, TensorScaling):
            module.scaling = TensorScaling(scaling, module.get_base_layer().weight.device)
            converted += 1
        if isinstance(module.get_base_layer(), nn.Linear) and "merge" not in vars(module):
            module.merge = types.MethodType(_merge_into_quantized, module)
            module.unmerge = types.MethodType(_unmerge_from_quantized, module)
    return converted


def _merge_into_quantized(layer: nn.Module, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
    """peft ``merge`` for a layer whose weight the svdquant backend quantized: append each adapter
    (``A``, ``scale * B``) to the quantized low-rank factors; merge the 16-bit weight if it is kept."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    peft_merge = type(layer).merge
    weight = layer.get_base_layer().weight
    entries = list(quantized_entries(weight).values())
    adapters = [a for a in check_adapters_to_merge(layer, adapter_names) if a in layer.lora_A]  # active, and on this layer
    if not entries or not adapters:
        return peft_merge(layer, safe_merge=safe_merge, adapter_names=adapter_names)
    freed = weight.untyped_storage().nbytes() == 0
    unsupported = [a for a in adapters if a in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(a, False)]
    if unsupported:
        if freed:
            raise RuntimeError(f"svdquant: cannot fuse adapters {unsupported} (a LoRA variant such as DoRA, or a LoRA bias) into a quantized layer "
                               "whose 16-bit weight was freed; compile with options={'free_weights': False} or keep the adapters unfused")
        return peft_merge(layer, safe_merge=safe_merge, adapter_names=adapter_names)
    saved = layer.__dict__.setdefault("_svdq_before_merge", [])
    with torch.no_grad():
        for adapter in adapters:
            down = layer.lora_A[adapter].weight
            up = layer.lora_B[adapter].weight * layer.scaling[adapter]
            for entry in entries:
                saved.append((entry, entry.lora_down, entry.lora_up))
                entry.lora_down = torch.cat([entry.lora_down, down.to(entry.lora_down)], 0)
                entry.lora_up = torch.cat([entry.lora_up, up.to(entry.lora_up)], 1)
    if freed:
        layer.merged_adapters.extend(adapters)
    else:
        peft_merge(layer, safe_merge=safe_merge, adapter_names=adapters)


def _unmerge_from_quantized(layer: nn.Module) -> None:
    """peft ``unmerge`` that also restores the quantized low-rank factors ``merge`` extended."""
    saved = layer.__dict__.get("_svdq_before_merge", [])
    freed = layer.get_base_layer().weight.untyped_storage().nbytes() == 0
    if freed and not saved and layer.merged:
        raise RuntimeError("svdquant: cannot unfuse a LoRA that was fused into the 16-bit weight before it was quantized and freed; "
                           "fuse after compiling, or keep the weights with options={'free_weights': False} and recompile after unfusing")
    if freed:
        layer.merged_adapters.clear()
    else:
        merged_before_quantizing = layer.merged and not saved
        type(layer).unmerge(layer)
        if merged_before_quantizing:
            # the quantized operands hold the fused LoRA: forget them, so the next call quantizes the unmerged weight
            forget_quantized(layer.get_base_layer().weight)
    while saved:
        entry, down, up = saved.pop()
        entry.lora_down, entry.lora_up = down, up


__all__ = ["MAX_FUSED_RANK", "TensorScaling", "prepare_lora_layers"]
