"""tiermoe: run Mixture-of-Experts LLMs larger than the GPU, experts tiered over GPU, pinned RAM and disk."""

__all__ = ["LLM", "GenerationStats", "RequestOutput", "SamplingParams", "TokenEvent"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Loaded on first use, so that `import tiermoe.cli` (the command's --help, a chat over --url) does not
    # import torch.
    if name == "LLM":
        from .api import LLM

        return LLM
    if name in __all__:
        from .engine import request

        return getattr(request, name)
    raise AttributeError(f"module 'tiermoe' has no attribute {name!r}")
