"""`tiermoe convert`: quantize an unquantized checkpoint's experts into a published format.

    tiermoe convert --model DIR --experts int4|fp8|nvfp4|mxfp4 --out DIR [--group-size 128] [--scales mse|rtn]

int4 is written in GPTQ's layout (qweight / qzeros / scales / g_idx, asymmetric, no act-order), so the
loader and kernels of published GPTQ checkpoints serve it and other GPTQ tools read it; fp8 as
Qwen3-*-FP8 (e4m3 with float32 block scales); nvfp4 as NVIDIA ModelOpt's NVFP4 (e2m1, e4m3 scales per
16 values, a float32 scale per tensor); mxfp4 as OCP microscaling (e2m1, e8m0 scales per 32 values), each
expert's weight as `<name>_blocks` / `<name>_scales` as gpt-oss names its fused experts. Everything but the routed experts (attention, routers,
embeddings, norms, shared experts) is copied as it is. Each expert's tensors are written side by side from
a page boundary, so one aligned read moves one expert. The checkpoint is written into a hidden temporary
directory beside --out, config.json last, and renamed to --out only when complete: an interrupted
convert leaves nothing that loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .errors import CheckpointError, InvalidRequestError
from .formats.dense import DenseFormat
from .formats.fp4 import Nvfp4Writer
from .formats.fp8 import Fp8Writer
from .formats.int4 import GptqWriter
from .formats.mxfp4 import Mxfp4Writer
from .formats.registry import format_for
from .weights.checkpoint import INDEX_FILE, SYNTHETIC_KEY
from .weights.loader import open_source
from .weights.writer import Planned, write_checkpoint

WRITERS = {"int4": GptqWriter, "fp8": Fp8Writer, "nvfp4": Nvfp4Writer, "mxfp4": Mxfp4Writer}


def writer_for(experts: str, group_size: int = 128, scales: str = "mse", block: int = 128):
    if experts == "int4":
        return GptqWriter(group_size, scales)
    if experts == "fp8":
        return Fp8Writer((block, block))
    if experts == "nvfp4":
        return Nvfp4Writer()
    if experts == "mxfp4":
        return Mxfp4Writer()
    raise InvalidRequestError(f"--experts {experts!r}: choose one of {', '.join(WRITERS)}", "experts")


def convert(
    model: str | Path, out: str | Path, writer, progress: bool = False, device: str | None = None
) -> Path:
    """Write `model` with its experts quantized by `writer` to `out` (which must not exist); the
    quantization runs on `device` (default: the GPU when there is one)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    if out.exists():
        raise InvalidRequestError(f"--out {out} exists; convert writes a new directory", "out")
    source = open_source(model, torch.device("cpu"), torch.float32)
    ckpt, args, arch = source.checkpoint, source.args, source.arch
    if not isinstance(source.format, DenseFormat):
        raise CheckpointError(f"{ckpt.path}: its experts are already quantized ({source.format.name})")
    if SYNTHETIC_KEY in ckpt.config:
        raise CheckpointError(f"{ckpt.path}: its experts are generated in memory (tiermoe synth), not stored")
    hidden, inter = args.expert_shape
    format_for(
        {"quantization_config": writer.config}, hidden, inter, torch.bfloat16
    )  # the shape fits the format

    names, fmt = arch.expert_names, source.format
    expert_tensors: set[str] = set()
    for layer in args.moe_layers:
        expert_tensors |= ckpt.expert_names_on_disk(fmt, names, layer, args.num_experts)
    planned = [_copied(ckpt, name) for name in sorted(ckpt.keys() - expert_tensors)]
    for layer in args.moe_layers:
        fused = ckpt.expert_layout(fmt, names, layer) == "fused"
        for e in range(args.num_experts):
            planned += _expert(
                ckpt, arch, writer, names, layer, e, fused, hidden, inter, device, args.expert_kind.bias
            )

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        start, total = time.perf_counter(), len(planned)
        done = [0]

        def advance(_):
            done[0] += 1
            if progress and (done[0] % 64 == 0 or done[0] == total):
                print(f"\rconvert: {done[0]}/{total} tensors", end="", file=sys.stderr, flush=True)

        nbytes = write_checkpoint(tmp, planned, progress=advance)
        for f in ckpt.path.iterdir():  # tokenizer, chat template, generation config, ...
            if (
                f.is_file()
                and not f.name.endswith(".safetensors")
                and f.name not in (INDEX_FILE, "config.json")
            ):
                shutil.copy2(f, tmp / f.name)
        config = dict(ckpt.config, quantization_config=writer.config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))  # last: until now nothing loads
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(
            f"\nconvert: {out} ({nbytes / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return out


def _copied(ckpt, name: str) -> Planned:
    disk_name, dtype, shape = ckpt.stored(name)
    if dtype is None:
        raise CheckpointError(f"{ckpt.path}: tensor {disk_name} has a dtype tiermoe does not read")
    return Planned(disk_name, dtype, shape, lambda: ckpt.get(name))


def _expert(
    ckpt,
    arch,
    writer,
    names,
    layer: int,
    expert: int,
    fused: bool,
    hidden: int,
    inter: int,
    device,
    biased: bool,
) -> list[Planned]:
    """The planned tensors of one expert: its three projections quantized, made together when the first
    is written (one expert in memory at a time), and its biases where it has them."""
    bases = [
        arch.hub_name(n.format(layer=layer, expert=expert)).removesuffix(".weight") for n in names.per_expert
    ]
    made: dict[str, torch.Tensor] = {}

    def weights() -> list[torch.Tensor]:  # gate, up [I, H] and down [H, I]
        if fused:
            gate_up, down = (ckpt.get(n.format(layer=layer))[expert].to(device).float() for n in names.fused)
            if names.fused_in_out:
                gate_up, down = gate_up.mT, down.mT
            return [*split_gate_up(gate_up, names.interleaved), down]
        return [ckpt.get(n.format(layer=layer, expert=expert)).to(device).float() for n in names.per_expert]

    def make(name: str) -> torch.Tensor:
        if not made:
            for base, w in zip(bases, weights(), strict=True):
                made.update(writer.quantize(base, w))
        return made.pop(name)

    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    specs = [s for base, (n, k) in zip(bases, shapes, strict=True) for s in writer.specs(base, n, k)]
    planned = [
        Planned(name, dtype, shape, lambda name=name: make(name), aligned=i == 0)
        for i, (name, dtype, shape) in enumerate(specs)
    ]
    return planned + (_biases(ckpt, names, layer, expert, fused, bases) if biased else [])


def split_gate_up(gate_up: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) rows of an expert's gate_up [2I, ...]: its halves, or its even and odd rows."""
    return (gate_up[0::2], gate_up[1::2]) if interleaved else gate_up.chunk(2)


def _biases(ckpt, names, layer: int, expert: int, fused: bool, bases: list[str]) -> list[Planned]:
    """One expert's biases, kept unquantized beside its weights: `<projection>.bias` [I], [I] and [H]."""
    if fused:
        gate_up, down = (ckpt.get(n.format(layer=layer))[expert] for n in names.fused_bias)
        values = [*split_gate_up(gate_up, names.interleaved), down]
    else:
        values = [
            ckpt.get(f"{n.format(layer=layer, expert=expert).removesuffix('.weight')}.bias")
            for n in names.per_expert
        ]
    return [
        Planned(f"{base}.bias", v.dtype, tuple(v.shape), lambda v=v: v.contiguous())
        for base, v in zip(bases, values, strict=True)
    ]


def main(args: argparse.Namespace) -> int:
    writer = writer_for(args.experts, args.group_size, args.scales, args.block)
    convert(args.model, args.out, writer, progress=True)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert")
    p.add_argument("--model", required=True, help="an unquantized checkpoint directory")
    p.add_argument("--experts", required=True, choices=list(WRITERS), help="the experts' format")
    p.add_argument("--out", required=True, help="the new checkpoint directory (must not exist)")
    p.add_argument("--group-size", type=int, default=128, help="int4: inputs per scale and zero point")
    p.add_argument(
        "--scales", choices=("mse", "rtn"), default="mse",
        help="int4: mse searches each group's range for the least squared error; rtn rounds over the full range",
    )  # fmt: skip
    p.add_argument("--block", type=int, default=128, help="fp8: block edge of the block scales")
    p.set_defaults(func=main)
    return p
