"""The expert format of a checkpoint, from its config.json."""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..models.experts import SWIGLU, ExpertKind
from .base import ExpertFormat
from .dense import DenseFormat
from .fp4 import GROUP as NVFP4_GROUP
from .fp4 import Nvfp4Format
from .fp8 import Fp8BlockFormat
from .int4 import Int4Format
from .mxfp4 import Mxfp4Format

SUPPORTED = "fp8 (block scales), gptq and awq (4-bit), modelopt (NVFP4), mxfp4"  # quant_method values format_for reads


def quantization(config: dict) -> dict | None:
    """config.json's quantization_config, or None for an unquantized checkpoint."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise CheckpointError("config.json: quantization_config must be an object with a quant_method")
    return qc


def format_for(
    config: dict, hidden: int, inter: int, dtype: torch.dtype, kind: ExpertKind = SWIGLU
) -> ExpertFormat:
    """The format a checkpoint's experts are kept in: its quantization_config's, else the compute dtype.
    kind: what the architecture's experts compute (biases, GLU), which every format carries."""
    qc = quantization(config)
    if qc is None:
        return DenseFormat(hidden, inter, dtype, kind)
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
        return Fp8BlockFormat(hidden, inter, dtype, tuple(block), kind)
    if method in ("gptq", "awq"):
        bits = qc.get("bits", qc.get("w_bit"))
        group = qc.get("group_size", qc.get("q_group_size", 128))
        if bits != 4:
            raise CheckpointError(
                f"config.json: {method} with {bits} bits is not supported; tiermoe reads 4-bit"
            )
        if method == "gptq" and qc.get("desc_act"):
            raise CheckpointError(
                "config.json: GPTQ with act-order (desc_act: true) is not supported: its groups follow a "
                "permutation of the inputs (g_idx); use a checkpoint quantized with desc_act false"
            )
        if method == "gptq" and qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
            raise CheckpointError(
                f"config.json: GPTQ checkpoint_format {qc['checkpoint_format']!r} is not supported"
            )
        if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
            raise CheckpointError(
                f"config.json: AWQ version {qc['version']!r} is not supported; tiermoe reads gemm"
            )
        if not isinstance(group, int) or group == 0 or group < -1:
            raise CheckpointError(
                f"config.json: {method} group_size {group!r} is not a positive integer or -1"
            )
        v2 = qc.get("checkpoint_format") == "gptq_v2"
        return Int4Format(hidden, inter, dtype, group, "gptq_v2" if v2 else method, kind)
    if method == "modelopt":
        algo, group = qc.get("quant_algo"), qc.get("group_size", NVFP4_GROUP)
        if algo != "NVFP4" or group != NVFP4_GROUP:
            raise CheckpointError(
                f"config.json: modelopt quant_algo {algo!r} with group_size {group!r} is not supported; tiermoe "
                f"reads NVFP4 with groups of {NVFP4_GROUP}"
            )
        return Nvfp4Format(hidden, inter, dtype, kind)
    if method == "mxfp4":
        return Mxfp4Format(hidden, inter, dtype, kind)
    raise CheckpointError(f"config.json: quant_method {method!r} is not supported; tiermoe reads {SUPPORTED}")
