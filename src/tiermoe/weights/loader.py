"""Build a model from a checkpoint directory: pick the architecture, create the module tree on the meta
device, stream every non-expert tensor into place, and hand the experts to a provider.

Every tensor in the checkpoint must be used and every parameter found: anything left over or missing
is an error naming it, never a silently half-loaded model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import CheckpointError
from ..models.base import Architecture, MoEArgs
from ..models.layers import CausalLM, Rotary
from ..models.moe import SparseMoeBlock
from ..models.registry import architecture_for
from ..offload.predictor import RouterLookahead
from ..offload.provider import ExpertProvider
from ..offload.sources import SYNTHETIC_KEY
from .checkpoint import Checkpoint, expect_shape, read_config

# Tensors some writers add that carry nothing we need (rotary tables are recomputed).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

# (source, bytes of the dense weights, progress bar) -> the provider that will serve the experts
ProviderFactory = Callable[["ModelSource", int, "Progress | None"], ExpertProvider]


@dataclass
class ModelSource:
    """What a provider needs to know to serve a model's experts."""

    path: Path
    arch: Architecture
    args: MoEArgs
    hf_config: object
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype


def open_source(path: str | Path, device: torch.device, dtype: torch.dtype) -> ModelSource:
    path = Path(path)
    config = read_config(path)
    arch = architecture_for(config, str(path / "config.json"))
    hf = hf_config(path)
    try:
        args = arch.args_from_hf(hf)
    except AttributeError as e:
        raise CheckpointError(f"{path / 'config.json'} lacks a field {arch.name} needs: {e}") from None
    return ModelSource(path, arch, args, hf, Checkpoint(path, arch.renames), device, dtype)


def hf_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError... for bad configs
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None


def load_model(
    source: ModelSource, provider_factory: ProviderFactory, show_progress: bool = False, routing=None
) -> tuple[CausalLM, ExpertProvider]:
    """routing: a routing.Routing that overrides or records the routers' choice, or None."""
    with progress_bar(show_progress) as progress:
        with torch.device("meta"):
            model = source.arch.build(source.args, source.hf_config)
        model.to(dtype=source.dtype).to_empty(device=source.device)
        for module in model.modules():
            if isinstance(module, Rotary):
                module.reset()
        load_dense(model, source, progress)
        dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        provider = provider_factory(source, dense_bytes, progress)
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    for block in blocks:
        block.experts, block.routing = provider, routing
    # Under an override the routers decide nothing, so their lookahead would predict noise.
    overridden = routing is not None and routing.overrides
    provider.attach(
        routing.predictor() if overridden else RouterLookahead({b.layer_idx: b.gate for b in blocks})
    )
    model.requires_grad_(False).eval()
    return model, provider


def load_dense(model: CausalLM, source: ModelSource, progress: Progress | None) -> None:
    ckpt, args = source.checkpoint, source.args
    params = dict(model.named_parameters())
    expected = set(params)
    expert_names: set[str] = set()
    if SYNTHETIC_KEY not in ckpt.config:
        for layer in args.moe_layers:
            expert_names |= ckpt.expert_names_on_disk(source.arch.expert_names, layer, args.num_experts)
    missing = sorted(expected - ckpt.keys())
    if missing:
        raise CheckpointError(f"tensor {missing[0]} missing from {ckpt.path} ({len(missing)} missing in all)")
    leftover = sorted(
        n for n in ckpt.keys() - expected - expert_names if not IGNORED.match(n) and not _tied_head(n, model)
    )
    if leftover:
        raise CheckpointError(
            f"{ckpt.path} holds tensors this {source.arch.name} config does not use, e.g. {leftover[:3]} "
            f"({len(leftover)} in all): does config.json match the weights?"
        )
    task = progress.add_task("dense weights", total=len(params)) if progress else None
    for name, param in params.items():
        tensor = ckpt.get(name)
        expect_shape(name, tuple(tensor.shape), tuple(param.shape), ckpt.file_of(name))
        param.data.copy_(tensor.to(source.dtype))
        if progress:
            progress.advance(task)


def _tied_head(name: str, model: CausalLM) -> bool:
    return name == "lm_head.weight" and model.lm_head is None


class progress_bar:
    """A rich progress bar when asked for, else None; used as a context manager."""

    def __init__(self, enabled: bool):
        self.progress = (
            Progress(
                TextColumn("[bold]loading[/] {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            if enabled
            else None
        )

    def __enter__(self) -> Progress | None:
        if self.progress:
            self.progress.start()
        return self.progress

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()
