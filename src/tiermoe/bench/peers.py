"""HF transformers baselines on the same checkpoint, prompts and GPU cap as tiermoe.

  hf          AutoModelForCausalLM, every weight on the one device (skipped when it cannot fit)
  hf-offload  accelerate device_map="auto" with max_memory capping the GPU at tiermoe's budget

`measure` is called inside a child process (see measure.py), so each peer's memory and peak RSS are
its own.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import psutil
import torch

from ..weights.checkpoint import SYNTHETIC_KEY
from .shapes import checkpoint_size
from .workload import Workload, median_figures, random_prompts

PEERS = ("hf", "hf-offload")
_GIB = 1 << 30
# Room for activations, KV cache and the CUDA context when deciding whether `hf` fits the GPU.
_FIT_HEADROOM_GIB = 2.0


class _TokenClock:
    """A generate() streamer that only timestamps: the first put() is the prompt, each later one a
    generated token (the whole batch's step). transformers copies tokens to the host before put(),
    so the device has finished the step when the time is taken."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _load(
    engine: str, model_dir: str, gpu_budget_gib: float | None, cpu_budget_gib: float | None, offload_dir: str
):
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if SYNTHETIC_KEY in json.loads((Path(model_dir) / "config.json").read_text()):
        return _from_config(engine, model_dir, dtype, gpu_budget_gib, cpu_budget_gib)
    if engine == "hf":
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device_map="cuda:0" if cuda else "cpu"
        )
    cpu_cap = cpu_budget_gib or psutil.virtual_memory().total / _GIB * 0.9
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        device_map="auto",
        max_memory={0: f"{gpu_budget_gib}GiB", "cpu": f"{cpu_cap:.1f}GiB"},
        offload_folder=offload_dir,  # used only if the CPU cap is exceeded too
    )


def _from_config(engine: str, model_dir: str, dtype: torch.dtype, gpu_budget_gib, cpu_budget_gib):
    """A checkpoint whose experts tiermoe generates in memory has none on disk for transformers to load:
    build the same architecture with random weights (normal(0, 0.02), as synth writes) instead. Speed does
    not depend on the values; the results note it."""
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cuda = torch.cuda.is_available()
    if engine == "hf":
        device_map = {"": "cuda:0" if cuda else "cpu"}
    else:
        cpu_cap = cpu_budget_gib or psutil.virtual_memory().total / _GIB * 0.9
        max_memory = {0: f"{gpu_budget_gib}GiB", "cpu": f"{cpu_cap:.1f}GiB"}
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=model._no_split_modules
        )
    model.to_empty(device="cpu" if engine != "hf" or not cuda else "cuda:0")
    with torch.no_grad():
        # Drawn on the GPU when there is one: normal_ over 30B bf16 parameters on the CPU took longer than
        # the whole benchmark's time limit (Qwen3-30B-A3B, 2026-11-24).
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty_like(p, device="cuda" if cuda else "cpu").normal_(0.0, 0.02))
        for module in model.modules():  # to_empty left the rotary tables empty: rebuild them
            if type(module).__name__.endswith("RotaryEmbedding"):
                fresh = type(module)(config=module.config)
                module.inv_freq.copy_(fresh.inv_freq)
                module.original_inv_freq = fresh.original_inv_freq.to(module.inv_freq.device)
    return model if engine == "hf" else dispatch_model(model, device_map=device_map)


def skip_reason(engine: str, model_dir: str, gpu_budget_gib: float | None) -> str | None:
    """Why this peer cannot run here, or None."""
    cuda = torch.cuda.is_available()
    if engine == "hf-offload":
        if not cuda:
            return "hf-offload offloads from a GPU; no CUDA device here"
        if gpu_budget_gib is None:
            return "hf-offload needs a GPU cap (--gpu-budget) to offload under"
        return None
    if cuda:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        need = checkpoint_size(config).total_bytes / _GIB + _FIT_HEADROOM_GIB
        have = torch.cuda.get_device_properties(0).total_memory / _GIB
        if need > have:
            return f"does not fit the GPU: needs about {need:.1f} GiB, {torch.cuda.get_device_name(0)} has {have:.1f} GiB"
    return None


def _timed_generate(model, input_ids: torch.Tensor, gen_len: int) -> dict:
    clock = _TokenClock()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=gen_len,
        min_new_tokens=gen_len,  # ignore eos so every engine produces the same number of tokens
        pad_token_id=model.generation_config.pad_token_id or 0,
        streamer=clock,
    )
    batch, prompt_len = input_ids.shape
    if out.shape[1] != prompt_len + gen_len:
        raise RuntimeError(f"generate stopped after {out.shape[1] - prompt_len} of {gen_len} tokens")
    ttft = clock.times[1] - start  # times[0] is the prompt being handed over
    decode_s = clock.times[-1] - clock.times[1]
    return {
        "ttft_s": ttft,
        "prefill_tok_s": batch * prompt_len / ttft,
        # Like tiermoe's GenerationStats: the first token comes from prefill, the rest are decode steps.
        "decode_tok_s": batch * (gen_len - 1) / decode_s if decode_s > 0 else None,
    }


def measure(
    engine: str,
    model_dir: str,
    workload: Workload,
    gpu_budget_gib: float | None,
    cpu_budget_gib: float | None,
) -> dict:
    """Load the peer, warm it up, time workload.repeat generate calls; figures are medians.
    Callers check skip_reason first (measure.run_isolated does, before starting a process)."""
    with tempfile.TemporaryDirectory(prefix="tiermoe-offload-") as offload_dir:
        start = time.perf_counter()
        model = _load(engine, model_dir, gpu_budget_gib, cpu_budget_gib, offload_dir)
        load_s = time.perf_counter() - start
        placement = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()})
        if engine == "hf-offload" and set(placement) <= {"cpu", "disk"}:
            # accelerate keeps room for the largest layer; below that it runs the model on the CPU.
            return {
                "error": f"skipped: a {gpu_budget_gib:g} GiB cap leaves no layer on the GPU ({placement})"
            }
        # Offloaded modules sit on the CPU; accelerate's hooks run them on the GPU, where inputs go.
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        vocab = model.config.vocab_size
        prompts = torch.tensor(random_prompts(vocab, workload), device=device)
        _timed_generate(model, prompts[:, : min(8, workload.prompt_len)], 2)  # warm-up: kernels, allocator
        samples = []
        for run in range(1, workload.repeat + 1):
            prompts = torch.tensor(random_prompts(vocab, workload, run), device=device)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            sample = _timed_generate(model, prompts, workload.gen_len)
            sample["peak_gpu_gib"] = (
                torch.cuda.max_memory_allocated() / _GIB if torch.cuda.is_available() else 0.0
            )
            sample["peak_host_gib"] = _peak_host_gib()
            samples.append(sample)
    return {
        **median_figures(samples),
        "samples": samples,
        "load_s": load_s,
        "placement": placement,
        "error": None,
    }
