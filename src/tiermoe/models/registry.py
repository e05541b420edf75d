"""Hugging Face `architectures` name -> Architecture entry."""

from __future__ import annotations

from ..errors import CheckpointError, UnsupportedArchitectureError
from . import deepseek, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import Architecture

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        qwen3_moe.ARCH,
        qwen2_moe.ARCH,
        mixtral.ARCH,
        olmoe.ARCH,
        deepseek.V2,
        deepseek.V3,
        gpt_oss.ARCH,
    )
}


def architecture_for(config: dict, where: str = "config.json") -> Architecture:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedArchitectureError(
        f"{where}: architecture {names or '(none given)'} is not supported; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def from_config(config: dict, where: str = "config.json"):
    """(Architecture, transformers config, MoEArgs) of a config.json dict, as the loader reads them,
    without a checkpoint: for plans, profiles and synthetic checkpoints made from the config alone."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    arch = architecture_for(config, where)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{where} has model_type {model_type!r}, which transformers does not know")
    hf = CONFIG_MAPPING[model_type].from_dict(dict(config))
    return arch, hf, arch.args_from_hf(hf)
