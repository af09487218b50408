"""The one configuration of SVDQuant quantization, shared by numerics, passes and the backend."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FORMATS = ("int4_2level", "int4", "int4_pow2")

# Layers the reference engine keeps in 16-bit (REFERENCE.md section 1): embedders, the final
# norm/projection, and cross-attention k/v projections (which only ever see the short text sequence).
# Globs are matched with fnmatch against the module's qualified name inside the compiled model.
DEFAULT_SKIP = (
    "x_embedder",
    "context_embedder",
    "*time_text_embed.*",
    "*time_embed*",
    "*time_embedding.*",
    "*add_embedding.*",
    "*guidance_embed*",
    "adaln_single.*",
    "caption_projection.*",
    "pos_embed.*",
    "norm_out.*",
    "proj_out",
    "*.attn2.to_k",
    "*.attn2.to_v",
)


@dataclass
class SVDQuantConfig:
    """How a linear layer is quantized with SVDQuant.

    Args:
        format: "int4_2level" (default), "int4" or "int4_pow2". All store signed 4-bit weights and
            quantize activations per token to signed 4-bit in groups of ``group_size`` channels.
            "int4" is the paper's numerics: every group has its own float scale (absmax / 7).
            "int4_2level" gives each group the scale ``row_scale * m`` with an integer ``m`` in
            1..16, so a 4-bit value times its ``m`` fits int8 and the GEMM is a plain int8 dot with
            one float rescale in the epilogue (Hopper has no 4-bit tensor cores).
            "int4_pow2" rounds each ``m`` up to a power of two: the value times ``m`` is then
            exact in fp8 e4m3 and the GEMM runs on fp8 tensor cores, 8-16% faster than on int8
            ones on an H200, for coarser group scales. benchmarks/RESULTS.md has the speed and
            quality of each.
        group_size: channels per quantization group along the input dimension.
        rank: rank of the 16-bit low-rank branch that absorbs the weight outliers (0 disables it).
        alpha: smoothing exponent on activation maxima. ``None`` grid-searches (alpha, beta) per layer
            when calibration data exists and falls back to no smoothing (alpha = beta = 0) otherwise.
        beta: smoothing exponent on weight maxima; ``None`` together with ``alpha=None`` means search.
        refine_iters: extra rounds of ``L <- SVD_r(W - Q(W - L))``; the best round by error is kept.
        skip: fnmatch globs of module names left in 16-bit.
        calib_tokens: activation rows kept per layer during calibration for the smoothing search.
        cache_dir: folder of the disk cache of quantized weights and of the GEMM tuner's picks
            (``None``: ``$SVDQ_CACHE_DIR`` or ``~/.cache/svdq_compile``; ``""`` disables the cache).
        checkpoint: path of a file written by ``save_quantized``; layers are loaded from it instead of
            being quantized.
        fuse_lora: backend pass flag: fold peft / diffusers LoRA adapters into the low-rank branch
            of their base layer's W4A4 op (else the adapters run as a separate 16-bit branch).
        fuse_shared_input: backend pass flag: linears that read the same input (q/k/v, FLUX's
            proj_mlp) are quantized as one layer over their concatenated weights and run as one
            W4A4 op, so the input is quantized once (else one op, and one quantization, per linear).
        quantize_linear: backend pass flag: rewrite every eligible linear into the W4A4 op.
        fuse_gelu: backend pass flag: a tanh-approximated GELU that reads a W4A4 op's output (or
            one piece of a fused op's split output) runs in that op's GEMM epilogue.
        fuse_cat_input: backend pass flag: a W4A4 op whose input is a concatenation of two tensors
            along the features reads both pieces in place (FLUX single blocks' ``proj_out``).
        free_weights: after the first compiled call, release the storage of the 16-bit weights the
            compiled graph no longer reads (eager calls and ``state_dict`` then fail).
        packed_weights: keep quantized weights in GPU memory at 4 bits (0.27x the bytes of bf16)
            and expand each to the GEMM's 8-bit operand just before its GEMM, instead of keeping
            the 8-bit operand (0.5x): less memory, and a FLUX-sized forward about 6% slower on
            an H200 (benchmarks/RESULTS.md, runs 20 and 21). Applies when a weight is first quantized in
            the process.
            With "int4_pow2", layers with a single group per row (``in_features == group_size``)
            keep their 8-bit operand (their packed form could not be told from "int4_2level"'s).
        cuda_graphs: replay each compiled graph's calls on CUDA as CUDA graphs, one per block of
            weights and input shapes, captured at the second call with those shapes
            (``svdq_compile.cuda_graphs``). Takes the host time of launching the kernels out of
            the forward, also under regional compilation. Consecutive blocks hand their
            activations over in place; others are copied in; memory for two sets of block outputs
            per shape (more while the caller keeps outputs). Off under
            ``mode="reduce-overhead"`` (Inductor's own CUDA graphs), with autograd, and for calls
            with CPU tensors. Turn it off for graphs that modify their inputs in place.

    Example:
        >>> SVDQuantConfig(rank=16).rank
        16
    """

    format: str = "int4_2level"
    group_size: int = 64
    rank: int = 32
    alpha: float | None = None
    beta: float | None = None
    refine_iters: int = 0
    skip: tuple[str, ...] = DEFAULT_SKIP
    calib_tokens: int = 256
    cache_dir: str | None = None
    checkpoint: str | None = None
    fuse_lora: bool = True
    fuse_shared_input: bool = True
    quantize_linear: bool = True
    fuse_gelu: bool = True
    fuse_cat_input: bool = True
    free_weights: bool = True
    packed_weights: bool = False
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even integer >= 2, got {self.group_size!r}")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {self.rank!r}")
        if (self.alpha is None) != (self.beta is None):
            raise ValueError("set both alpha and beta (fixed smoothing) or neither (search)")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not isinstance(self.refine_iters, int) or self.refine_iters < 0:
            raise ValueError(f"refine_iters must be an integer >= 0, got {self.refine_iters!r}")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        self.skip = tuple(self.skip)
        if not isinstance(self.calib_tokens, int) or self.calib_tokens < 1:
            raise ValueError(f"calib_tokens must be an integer >= 1, got {self.calib_tokens!r}")
        for name in ("fuse_lora", "fuse_shared_input", "quantize_linear", "fuse_gelu", "fuse_cat_input", "free_weights", "packed_weights", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def two_level(self) -> bool:
        """True for the row scale times integer group multipliers of "int4_2level" and "int4_pow2"."""
        return self.format != "int4"

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "SVDQuantConfig":
        """Build a config from ``torch.compile(..., options={...})``, naming valid keys on a typo.

        Example:
            >>> SVDQuantConfig.from_options({"rank": 64}).rank
            64
        """
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown svdquant option(s) {unknown}; valid options are {valid}")
        return cls(**options)

    def quantization_key(self) -> dict[str, Any]:
        """The fields that change quantized weights (the disk-cache key uses these, not paths)."""
        return {
            "format": self.format,
            "group_size": self.group_size,
            "rank": self.rank,
            "alpha": self.alpha,
            "beta": self.beta,
            "refine_iters": self.refine_iters,
        }


__all__ = ["SVDQuantConfig", "DEFAULT_SKIP", "FORMATS"]
