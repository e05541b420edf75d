"""`tiermoe synth`: write a Hugging Face checkpoint with random weights and a real model's config.

Weights are drawn shard by shard (never the whole model in memory), on the GPU when there is one,
from a generator seeded per tensor name: the same seed gives the same tensors whatever the shard size
or device order. Linear and embedding weights are normal(0, 0.02) and norms are ones, the init the
published models were trained from, which keeps activations finite through every layer. A tokenizer of
the preset's vocabulary, special-token ids and chat template comes with it (bench/synth_tokenizer.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from safetensors.torch import save_file

from ..convert import writer_for
from ..errors import InvalidRequestError
from ..models.registry import from_config
from ..weights.checkpoint import SYNTH_INFO_FILE, SYNTHETIC_KEY
from .presets import PRESETS, get_preset
from .shapes import TensorSpec, bytes_per_element, tensor_specs
from .synth_tokenizer import copy_tokenizer, prepare_tokenizer

INIT_STD = 0.02
_DTYPES = {"bf16": (torch.bfloat16, "bfloat16")}
_GIB = 1 << 30
# What an earlier synth may have left: a --no-tokenizer run must not keep a stale tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


@dataclass(frozen=True)
class SynthResult:
    out_dir: Path
    files: list[str]
    total_bytes: int
    num_tensors: int
    tokenizer: str | None = None  # tokenizer style written, None when none was


def _plan_shards(specs: list[TensorSpec], elem_bytes: int, shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy packing in checkpoint order; a tensor bigger than a shard gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * elem_bytes
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _tensor_seed(seed: int, name: str) -> int:
    # 32 bits: the CPU generator (mt19937) ignores higher seed bits.
    return zlib.crc32(f"{seed}:{name}".encode())


def _make_tensor(spec: TensorSpec, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(_tensor_seed(seed, spec.name))
    t = torch.empty(spec.shape, dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=gen)
    return t.cpu()


def _resolve(preset_or_config: str | dict) -> tuple[str, str, dict, dict, str | None]:
    if isinstance(preset_or_config, str):
        p = get_preset(preset_or_config)
        return p.name, p.source, p.config, p.generation_config, p.tokenizer
    config = dict(preset_or_config)
    return "custom", "custom", config, {}, None


def _generation_config(config: dict, published: dict) -> dict:
    # Without eos in generation_config, transformers' generate never stops and engines disagree on
    # stop tokens; tiny presets have no published file, so take the ids from config.json.
    gen = dict(published) or {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None
    }
    gen.setdefault("transformers_version", config.get("transformers_version", "5.0.0"))
    return gen


def synth_checkpoint(
    preset_or_config: str | dict,
    out_dir: str | Path,
    dtype: str = "bf16",
    seed: int = 0,
    shard_gib: float = 4.0,
    device: str | None = None,
    progress: bool = True,
    experts_in_memory: bool = False,
    tokenizer: bool = True,
    experts: str | None = None,
) -> SynthResult:
    """Write config.json, generation_config.json, safetensors shards (and their index when more than
    one) to out_dir. preset_or_config: a preset name or a config.json dict with `architectures`.

    tokenizer: also write the preset's tokenizer.json and tokenizer_config.json (built once, then
    copied from ~/.cache/tiermoe/tokenizers); a config dict gets none, since no preset says its style.

    experts_in_memory: write no expert tensors; config.json tells tiermoe to generate them (seeded, same
    init) straight into its host cache. For shapes whose experts outgrow the disk (Qwen3-30B-A3B).
    experts: with experts_in_memory, generate them quantized (int4, fp8, nvfp4 or mxfp4, as `tiermoe convert` writes
    them); quantized experts on disk come from `tiermoe convert` of a bf16 synth."""
    if dtype not in _DTYPES:
        raise InvalidRequestError(
            f"unknown dtype {dtype!r}; choose bf16 (quantized experts: --experts int4, fp8, nvfp4 or mxfp4)",
            param="dtype",
        )
    if experts is not None and not experts_in_memory:
        raise InvalidRequestError(
            "--experts quantizes experts generated in memory (--experts-in-memory); for quantized experts "
            "on disk, synth bf16 and then run tiermoe convert",
            param="experts",
        )
    torch_dtype, dtype_name = _DTYPES[dtype]
    name, source, config, published_gen, style = _resolve(preset_or_config)
    style = style if tokenizer else None
    from_config(config)  # fail before writing anything if the architecture is unknown
    config["torch_dtype"] = dtype_name
    generation_config = _generation_config(config, published_gen)
    # Before the weights, so that a tokenizer that cannot be made fails in seconds, not after GiBs.
    tokenizer_dir = prepare_tokenizer(style, config, generation_config) if style else None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Shards of an earlier synth with another shard count would sit beside an index that no longer names them.
    for stale in [
        *out.glob("model*.safetensors"),
        out / "model.safetensors.index.json",
        out / SYNTH_INFO_FILE,
        *(out / f for f in _TOKENIZER_FILES),
    ]:
        stale.unlink(missing_ok=True)
    specs = tensor_specs(config)
    if experts_in_memory:
        specs = [spec for spec in specs if not spec.is_expert]
        config[SYNTHETIC_KEY] = {"seed": seed, "std": INIT_STD}
        if experts is not None:  # int4 groups of 128 inputs, fewer where a tiny shape has fewer
            hidden, inter = from_config(config)[2].expert_shape
            group = next((g for g in (128, 64, 32, 16, 8) if hidden % g == 0 and inter % g == 0), 128)
            config["quantization_config"] = writer_for(experts, group_size=group).config
    elem = bytes_per_element(config)
    shards = _plan_shards(specs, elem, int(shard_gib * _GIB))
    total = sum(s.numel for s in specs) * elem
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    columns = (
        TextColumn("[bold]synth[/] {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"{name} on {dev.type}", total=total)
        for fname, shard in zip(files, shards, strict=True):
            tensors = {}
            for spec in shard:
                tensors[spec.name] = _make_tensor(spec, torch_dtype, dev, seed)
                bar.advance(task, spec.numel * elem)
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            del tensors

    if len(files) > 1:
        weight_map = {spec.name: fname for fname, shard in zip(files, shards, strict=True) for spec in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    if tokenizer_dir:
        copy_tokenizer(tokenizer_dir, out)
    info = {
        "preset": name,
        "source": source,
        "dtype": dtype,
        "seed": seed,
        "init_std": INIT_STD,
        "total_bytes": total,
        "experts_in_memory": experts_in_memory,
        "tokenizer": style,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / SYNTH_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return SynthResult(out, files, total, len(specs), style)


def read_synth_info(model_dir: str | Path) -> dict:
    """What synth recorded about a checkpoint ({} for checkpoints it did not write)."""
    path = Path(model_dir) / SYNTH_INFO_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def main(args: argparse.Namespace) -> int:
    result = synth_checkpoint(
        args.preset,
        args.out,
        dtype=args.dtype,
        seed=args.seed,
        shard_gib=args.shard_gib,
        device=args.device,
        experts_in_memory=args.experts_in_memory,
        tokenizer=args.tokenizer,
        experts=args.experts,
    )
    tokenizer = f" and a {result.tokenizer} tokenizer" if result.tokenizer else ""
    print(
        f"wrote {result.num_tensors} tensors, {result.total_bytes / _GIB:.2f} GiB in {len(result.files)} file(s){tokenizer} to {result.out_dir}"
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synth")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="bf16", help="bf16")
    p.add_argument(
        "--experts", default=None, choices=("int4", "fp8", "nvfp4", "mxfp4"),
        help="with --experts-in-memory: generate the experts quantized (as tiermoe convert writes them)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gib", type=float, default=4.0, help="target size of each safetensors shard, GiB")
    p.add_argument(
        "--device", default=None, help="where to draw the random numbers (default: cuda if present)"
    )
    p.add_argument(
        "--experts-in-memory",
        action="store_true",
        help="write no expert tensors: tiermoe generates them into its host cache (checkpoints larger than the disk)",
    )
    p.add_argument(
        "--no-tokenizer",
        dest="tokenizer",
        action="store_false",
        help="write no tokenizer (token-id prompts only)",
    )
    p.set_defaults(func=main)
    return p
