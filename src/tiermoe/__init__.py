"""tiermoe: run Mixture-of-Experts LLMs larger than the GPU, experts tiered over GPU, pinned RAM and disk."""

from .api import LLM
from .engine.request import GenerationStats, RequestOutput, SamplingParams, TokenEvent

__all__ = ["LLM", "GenerationStats", "RequestOutput", "SamplingParams", "TokenEvent"]
__version__ = "0.1.0"
