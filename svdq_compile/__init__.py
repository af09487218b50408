"""svdq_compile: SVDQuant W4A4 inference as a torch.compile backend.

Example:
    >>> import torch, svdq_compile
    >>> model = torch.nn.Sequential(torch.nn.Linear(128, 128))
    >>> svdq_compile.QuantizedLinear.from_linear(model[0]).rank
    32
"""

import os as _os

from .backend import register_inductor_pass, unregister_inductor_pass
from .calibration import calibrate
from .checkpoint import load_quantized, save_quantized
from .config import SVDQuantConfig
from .lora import prepare_lora_layers
from .ops import w4a4_linear
from .quantized_linear import CalibrationStats, QuantizedLinear

__all__ = [
    "SVDQuantConfig",
    "QuantizedLinear",
    "CalibrationStats",
    "w4a4_linear",
    "calibrate",
    "register_inductor_pass",
    "unregister_inductor_pass",
    "save_quantized",
    "load_quantized",
    "prepare_lora_layers",
]

if _os.environ.get("SVDQUANT", "").strip() == "1":
    # A plain torch.compile(model) then runs the rewrite as Inductor's pre-grad pass (under freezing,
    # the only place Inductor sees weights). Needs this import before compiling; see docs/backend.md.
    register_inductor_pass(freeze=True)
