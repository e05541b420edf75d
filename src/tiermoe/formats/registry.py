"""The expert format of a checkpoint, from its config.json."""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from .base import ExpertFormat
from .dense import DenseFormat
from .fp8 import Fp8BlockFormat

SUPPORTED = "fp8 (block scales)"  # quant_method values format_for reads, for error messages


def quantization(config: dict) -> dict | None:
    """config.json's quantization_config, or None for an unquantized checkpoint."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise CheckpointError("config.json: quantization_config must be an object with a quant_method")
    return qc


def format_for(config: dict, hidden: int, inter: int, dtype: torch.dtype) -> ExpertFormat:
    """The format a checkpoint's experts are kept in: its quantization_config's, else the compute dtype."""
    qc = quantization(config)
    if qc is None:
        return DenseFormat(hidden, inter, dtype)
    method = qc["quant_method"]
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(f"config.json: fp8 fmt {qc['fmt']!r} is not supported; tiermoe reads e4m3")
        block = qc.get("weight_block_size")
        if not (
            isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise CheckpointError(
                "config.json: fp8 without weight_block_size (one scale per tensor or per channel) is not "
                f"supported; tiermoe reads block-scaled fp8 as Qwen3-*-FP8 and DeepSeek-V3 publish it (got {block!r})"
            )
        return Fp8BlockFormat(hidden, inter, dtype, tuple(block))
    raise CheckpointError(f"config.json: quant_method {method!r} is not supported; tiermoe reads {SUPPORTED}")
