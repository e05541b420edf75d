"""Hugging Face `architectures` name -> Architecture entry."""

from __future__ import annotations

from ..errors import UnsupportedArchitectureError
from . import mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import Architecture

ARCHITECTURES: dict[str, Architecture] = {m.ARCH.name: m.ARCH for m in (qwen3_moe, qwen2_moe, mixtral, olmoe)}


def architecture_for(config: dict, where: str = "config.json") -> Architecture:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedArchitectureError(
        f"{where}: architecture {names or '(none given)'} is not supported; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )
