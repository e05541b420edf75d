"""Build a model from a checkpoint directory: pick the architecture, create the module tree on the meta
device, stream every non-expert tensor into place, and hand the experts to a provider.

Every tensor in the checkpoint must be used and every parameter found: anything left over or missing
is an error naming it, never a silently half-loaded model.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import CheckpointError, InvalidRequestError
from ..formats.base import ExpertFormat
from ..formats.fp8 import SCALE_SUFFIX
from ..formats.registry import format_for
from ..models.base import Architecture, MoEArgs
from ..models.layers import Attention, CausalLM, Rotary
from ..models.moe import Experts, SparseMoeBlock
from ..models.registry import architecture_for
from .checkpoint import SYNTHETIC_KEY, Checkpoint, expect_shape, read_config

# Tensors some writers add that carry nothing we need (rotary tables are recomputed; alignment padding).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$|^tiermoe\.padding\.\d+$")  # padding: weights/writer.py

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """What a provider needs to know to serve a model's experts."""

    path: Path
    arch: Architecture
    args: MoEArgs
    hf_config: object
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype  # of the dense weights and activations
    format: ExpertFormat  # of the experts, in every tier


def open_source(
    path: str | Path, device: torch.device, dtype: torch.dtype, experts_per_token: int | None = None
) -> ModelSource:
    """The checkpoint at `path` with its architecture, args and expert format. experts_per_token: route
    each token to this many experts instead of the config's top-k (fewer: faster, less exact)."""
    path = Path(path)
    config = read_config(path)
    arch = architecture_for(config, str(path / "config.json"))
    hf = hf_config(path)
    try:
        args = arch.args_from_hf(hf)
    except AttributeError as e:
        raise CheckpointError(f"{path / 'config.json'} lacks a field {arch.name} needs: {e}") from None
    if experts_per_token is not None:
        if not 1 <= experts_per_token <= args.top_k:
            raise InvalidRequestError(
                f"experts_per_token {experts_per_token}: this model routes to {args.top_k} experts a token; "
                f"choose 1 to {args.top_k}",
                "experts_per_token",
            )
        args = dataclasses.replace(args, top_k=experts_per_token)
    fmt = format_for(config, *args.expert_shape, dtype, args.expert_kind)
    return ModelSource(path, arch, args, hf, Checkpoint(path, arch.renames), device, dtype, fmt)


def hf_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError... for bad configs
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None


def build_meta(source: ModelSource, fp8_dense: bool = False) -> CausalLM:
    """The module tree on the meta device in the compute dtype: sizes known, nothing allocated. A tied
    head the checkpoint unties gets its own lm_head here, so that the memory plan counts it. fp8_dense:
    the linear layers an FP8 checkpoint stores with block scales stay FP8 (formats/fp8.py Fp8Linear)."""
    with torch.device("meta"):
        model = source.arch.build(source.args, source.hf_config)
    model = model.to(dtype=source.dtype)
    if fp8_dense:
        ckpt = source.checkpoint
        source.format.keep_linears(model, lambda name: f"{name}.weight{SCALE_SUFFIX}" in ckpt)
    for module in model.modules():  # what a module keeps in float32 whatever the compute dtype
        for name in getattr(module, "FLOAT32_PARAMETERS", ()):
            if (param := getattr(module, name)) is not None:
                param.data = param.data.float()
    untie_head(model, source, torch.device("meta"))
    return model


def load_model(
    model: CausalLM,
    source: ModelSource,
    experts: Experts,
    routing=None,
    progress: Progress | None = None,
) -> CausalLM:
    """Allocate the meta model's dense weights on the device, stream them in, and hand the MoE blocks
    their experts. routing: a routing.Routing that overrides or records the routers' choice."""
    model.to_empty(device=source.device)
    for module in model.modules():
        if isinstance(module, Rotary):
            module.reset()
    load_dense(model, source, progress)
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.experts, module.routing = experts, routing
        elif isinstance(module, Attention):
            module.fuse_qkv()
    return model.requires_grad_(False).eval()


def load_dense(model: CausalLM, source: ModelSource, progress: Progress | None) -> None:
    ckpt, args = source.checkpoint, source.args
    params = dict(model.named_parameters())
    disk = {name: name for name in params}  # our parameter -> the checkpoint tensor it is read from
    if model.lm_head is None and EMBED not in ckpt and HEAD in ckpt:
        disk[EMBED] = HEAD  # tied, only the head written: transformers ties the other way round
    expert_names: set[str] = set()
    if SYNTHETIC_KEY not in ckpt.config:
        for layer in args.moe_layers:
            expert_names |= ckpt.expert_names_on_disk(
                source.format, source.arch.expert_names, layer, args.num_experts
            )
    fmt = source.format
    companions = {c for tensor in disk.values() for c in fmt.companions(tensor) if c in ckpt}
    missing = sorted(name for name, tensor in disk.items() if tensor not in ckpt)
    if missing:
        raise CheckpointError(f"tensor {missing[0]} missing from {ckpt.path} ({len(missing)} missing in all)")
    leftover = sorted(
        n
        for n in ckpt.keys() - set(disk.values()) - expert_names - companions
        if not IGNORED.match(n) and not _tied_head(n, model) and not fmt.ignored(n)
    )
    # An MTP layer is one with its own eh_proj: a checkpoint one decoder layer longer than its config
    # says must still fail.
    mtp = tuple(
        f"model.layers.{i}."
        for i in range(args.num_layers, args.num_layers + args.mtp_layers)
        if f"model.layers.{i}.eh_proj.weight" in ckpt
    )
    if mtp:
        kept = [n for n in leftover if not n.startswith(mtp)]
        log.info(
            "%d tensors of %d multi-token prediction layer(s) recognised and left on disk (speculative "
            "decoding would read them)",
            len(leftover) - len(kept),
            len(mtp),
        )
        leftover = kept
    if leftover:
        raise CheckpointError(
            f"{ckpt.path} holds tensors this {source.arch.name} config does not use, e.g. {leftover[:3]} "
            f"({len(leftover)} in all): does config.json match the weights?"
        )
    task = progress.add_task("dense weights", total=len(params)) if progress else None
    for name, param in params.items():
        stored = disk[name]
        tensors = {n: ckpt.get(n) for n in (stored, *fmt.companions(stored)) if n in ckpt}
        value = fmt.dense_weight(stored, tensors, param.dtype)  # dequantized where the format stores it so
        expect_shape(stored, tuple(value.shape), tuple(param.shape), ckpt.file_of(stored))
        param.data.copy_(value)
        if progress:
            progress.advance(task)


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tied_head(name: str, model: CausalLM) -> bool:
    """The checkpoint's lm_head.weight when the model uses embed_tokens for it (untie_head found the
    two equal, as checkpoints that store a tied weight twice have them)."""
    return name == HEAD and model.lm_head is None


def untie_head(model: CausalLM, source: ModelSource, device: torch.device | None = None) -> None:
    """Give a tied model (tie_word_embeddings) its own lm_head when the checkpoint holds an lm_head.weight
    unlike embed_tokens: transformers then does not tie them, uses each, and warns. Compared in the
    compute dtype, as transformers compares the loaded parameters. A no-op when the model has a head.
    device: where the new head is allocated (meta when called on the model build_meta made)."""
    ckpt = source.checkpoint
    if model.lm_head is not None or HEAD not in ckpt or EMBED not in ckpt:
        return
    if _same_tensor(ckpt.get(HEAD), ckpt.get(EMBED), source.dtype):
        return
    log.warning(
        "%s: config.json sets tie_word_embeddings, but the checkpoint's %s differs from %s; using them "
        "untied, as transformers does (set tie_word_embeddings to false to silence this)",
        ckpt.path,
        HEAD,
        EMBED,
    )
    model.lm_head = torch.nn.utils.skip_init(
        torch.nn.Linear, source.args.hidden_size, source.args.vocab_size, bias=False, device=device,
        dtype=source.dtype,
    )  # fmt: skip


def _same_tensor(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, rows: int = 4096) -> bool:
    """torch.equal after the cast to dtype, a block of rows at a time (the tensors are memory-mapped)."""
    if a.shape != b.shape:
        return False
    return all(
        torch.equal(a[i : i + rows].to(dtype), b[i : i + rows].to(dtype)) for i in range(0, len(a), rows)
    )


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
