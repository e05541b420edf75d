"""EngineConfig: where and how the engine runs. The one source of every engine setting's default; units
in the field names. Fields are grouped by the part of the engine they configure; each field's `help`
metadata documents it, and the CLI flags are generated from them (flags.py), so a default lives here only.
Importing this module does not import torch (the CLI's --help and chat over --url need none)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidRequestError

MISS_PATHS = ("auto", "copy", "in-place", "staged")  # EngineConfig.miss_path
DENSE_WEIGHTS = ("auto", "dequantized", "fp8")  # EngineConfig.dense_weights
PRESETS = ("latency", "throughput", "balanced", "auto")  # --preset: the planner's picks (planner.py)


def user_cache_dir() -> Path:
    """Where tiermoe keeps what it makes once per machine (tokenizers, GGUFs, tuned kernel launches):
    $XDG_CACHE_HOME/tiermoe, else ~/.cache/tiermoe."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiermoe"


# dtype names the engine accepts -> torch dtype names
DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
}


def _setting(default, help: str, flag: str | None = None):
    """A field with its documentation; flag: the CLI flag when it is not --field-name, "" for none."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class EngineConfig:
    # --- the model on its device
    device: str | None = _setting(None, "cuda, cuda:N or cpu (default: cuda when available)")
    dtype: str | None = _setting(None, "bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    max_model_len: int | None = _setting(
        None,
        "context length in tokens (default: max_position_embeddings; beyond it only as far as the "
        "config's rope scaling reaches)",
    )
    # --- the runner
    prefill_chunk: int = _setting(
        2048, "tokens per prefill forward: bounds activation memory on long prompts"
    )
    cuda_graphs: bool = _setting(
        True, "capture decode steps as CUDA graphs where the expert provider allows it"
    )
    kv_reserve_tokens: int | None = _setting(
        None,
        "KV cache tokens reserved in the GPU budget, shared by the running sequences (default: context, at most 4096)",
    )
    max_num_seqs: int = _setting(
        16, "sequences decoding at once; more requests wait in the queue (the KV reserve may admit fewer)"
    )
    experts_per_token: int | None = _setting(
        None,
        "routed experts per token, below the model's top-k to trade quality for speed (default: the "
        "model's top-k; its perplexity cost is in the README)",
    )
    # --- the memory plan and the expert store
    gpu_budget_gib: float | None = _setting(
        None,
        "GiB for everything on the GPU (default: free memory before loading minus 1 GiB)",
        "--gpu-budget",
    )
    cpu_budget_gib: float | None = _setting(
        None, "GiB of pinned RAM for experts (default: half the RAM)", "--cpu-budget"
    )
    workspace_gib: float | None = _setting(
        None, "GiB for activations and library workspace (default: 1 on cuda, 0 on cpu)", "--workspace"
    )
    dense_weights: str = _setting(
        "auto",
        "an FP8 checkpoint's dense linear layers: dequantized (to the compute dtype at load), fp8 (kept in "
        "FP8, one byte a weight, dequantized at each forward) or auto (fp8 only where dequantized ones "
        "would leave fewer than top-k expert slots a layer in the GPU budget)",
    )
    # LFU and no prefetch measured best with random routers (bench/NOTES.md); under trained-like (szd)
    # routing at about k slots per layer the policies are within 2 points of each other.
    eviction: str = _setting("lfu", "GPU expert slot eviction policy")
    prefetch: bool = _setting(
        False, "predict the next layer's experts and copy them while this layer computes"
    )
    miss_path: str = _setting(
        "auto",
        "how decode reaches an expert missing from the GPU: auto (staged where it can run: a CUDA GPU, a "
        "format with decode kernels, every expert in the host cache, the workspace for 16 experts, no "
        "cpu_compute; copy elsewhere), copy (into a slot, then compute; a host "
        "round trip per layer), in-place (the kernel reads it from pinned host memory, the step one "
        "CUDA graph; it is admitted to a slot after the step when it earns one) or staged (the step one "
        "CUDA graph; a kernel copies each miss into a victim slot, which admits it, and computes it from "
        "there; needs the workspace to hold 16 experts)",
    )
    cpu_compute: bool = _setting(
        False,
        "compute part of each decode layer's missed experts on the CPU from the host cache while the "
        "others are copied, split by costs measured at load (miss_path copy, which auto then picks)",
    )
    # --- expert routing (routing/spec.py)
    routing: str | None = _setting(
        None,
        "who picks the experts: natural (the routers), uniform, szd, szd:s_g=..,sigma_doc=..,sigma_loc=..,"
        "phi=..,p_stick=.. or trace:FILE (default: szd on synthetic checkpoints, natural otherwise)",
    )
    routing_seed: int = _setting(
        0, "seed of emulated routing (uniform, szd) and of the emulated prefetch predictor"
    )
    record_routing: str | None = _setting(
        None, "write every token's expert ids per layer to this file (.npz or .txt.gz)"
    )
    prefetch_accuracy: float = _setting(
        0.8, "under a routing override: share of the next layer's experts the emulated predictor gets right"
    )
    # --- the caller
    show_progress: bool = _setting(False, "progress bars and the plan line while loading", "")

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidRequestError(
                f"dtype {self.dtype!r} unknown; choose one of bf16, fp16, fp32", "dtype"
            )
        if self.device is not None:
            import torch  # here, not at module level: see the module docstring

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
        if self.miss_path not in MISS_PATHS:
            raise InvalidRequestError(
                f"miss_path {self.miss_path!r} unknown; choose one of {', '.join(MISS_PATHS)}", "miss_path"
            )
        if self.dense_weights not in DENSE_WEIGHTS:
            raise InvalidRequestError(
                f"dense_weights {self.dense_weights!r} unknown; choose one of {', '.join(DENSE_WEIGHTS)}",
                "dense_weights",
            )
        if self.cpu_compute and self.miss_path not in ("auto", "copy"):
            raise InvalidRequestError("cpu_compute works with miss_path copy only", "cpu_compute")
        if not 0.0 <= self.prefetch_accuracy <= 1.0:
            raise InvalidRequestError("prefetch_accuracy must be within [0, 1]", "prefetch_accuracy")
        if self.experts_per_token is not None and self.experts_per_token < 1:
            raise InvalidRequestError("experts_per_token must be at least 1", "experts_per_token")
        for name in ("prefill_chunk", "kv_reserve_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidRequestError(f"{name} must be at least 1 token", name)
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs must be at least 1", "max_num_seqs")

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def torch_dtype(self):
        import torch

        if self.dtype:
            return getattr(torch, DTYPES[self.dtype])
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
