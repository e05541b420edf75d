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
