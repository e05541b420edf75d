"""EngineConfig: where and how the engine runs. One source of defaults; units in the field names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidRequestError

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass
class EngineConfig:
    device: str | None = None  # "cuda", "cuda:1", "cpu"; None: cuda when available
    dtype: str | None = None  # bf16 / fp16 / fp32; None: bf16 on cuda, fp32 on cpu
    max_model_len: int | None = None  # tokens; None: the model's max_position_embeddings
    prefill_chunk: int = 2048  # tokens per prefill forward, bounds activation memory on long prompts
    show_progress: bool = False  # progress bars while loading
    gpu_budget_gib: float | None = None  # GiB for everything on the GPU; None: free memory minus 1 GiB (cuda)
    cpu_budget_gib: float | None = None  # GiB of (pinned) host memory for experts; None: half the RAM
    # GPU slot eviction policy: lfu, lru, lru-protect. LFU and no prefetch measured best on the H100
    # (bench/NOTES.md): Qwen3-30B-A3B at 8 GiB, LFU 36.6 tok/s, LRU 32.3, LRU with prefetch 27.2.
    eviction: str = "lfu"
    prefetch: bool = False  # predict the next layer's experts and copy them while this layer computes
    kv_reserve_tokens: int | None = (
        None  # KV cache tokens reserved in the GPU budget; None: min(context, 4096)
    )
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs where the expert provider allows it
    workspace_gib: float | None = None  # activations and library workspace; None: 1 GiB on cuda, 0 on cpu
    # Expert routing (routing/spec.py): natural, uniform, szd[:params] or trace:FILE; None: szd on synthetic
    # checkpoints (random routers repeat the same experts every token), natural on real ones.
    routing: str | None = None
    routing_seed: int = 0  # seed of emulated routing (uniform, szd) and of the emulated prefetch predictor
    record_routing: str | None = None  # write every token's expert ids per layer to this trace file
    prefetch_accuracy: float = (
        0.8  # under an override: share of the next layer's experts the predictor gets right
    )

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidRequestError(
                f"dtype {self.dtype!r} unknown; choose one of bf16, fp16, fp32", "dtype"
            )
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise InvalidRequestError(
                    f"device {self.device!r} unknown; use cuda, cuda:N or cpu", "device"
                ) from None
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise InvalidRequestError("device cuda asked for, but torch sees no CUDA GPU", "device")
        for name in ("gpu_budget_gib", "cpu_budget_gib", "workspace_gib"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidRequestError(f"{name} must be >= 0 GiB", name)
        if not 0.0 <= self.prefetch_accuracy <= 1.0:
            raise InvalidRequestError("prefetch_accuracy must be within [0, 1]", "prefetch_accuracy")
        if self.kv_reserve_tokens is not None and self.kv_reserve_tokens < 1:
            raise InvalidRequestError("kv_reserve_tokens must be at least 1 token", "kv_reserve_tokens")
        if self.prefill_chunk < 1:
            raise InvalidRequestError("prefill_chunk must be at least 1 token", "prefill_chunk")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype:
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
