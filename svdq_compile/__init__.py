"""svdq_compile: SVDQuant W4A4 inference as a torch.compile backend.

Example:
    >>> import torch, svdq_compile
    >>> model = torch.nn.Sequential(torch.nn.Linear(128, 128))
    >>> svdq_compile.QuantizedLinear.from_linear(model[0]).rank
    32
"""

from .config import SVDQuantConfig
from .ops import w4a4_linear
from .quantized_linear import CalibrationStats, QuantizedLinear

__all__ = ["SVDQuantConfig", "QuantizedLinear", "CalibrationStats", "w4a4_linear"]
