"""Write safetensors shards in a chosen tensor order, with groups of tensors starting at aligned offsets.

safetensors' own writer orders tensors as it likes; a converted checkpoint wants each expert's tensors
side by side and starting on a page boundary, so one aligned read moves one expert. The format allows
no holes between tensors, so a group's alignment is made by a small U8 tensor named
`tiermoe.padding.N` before it (the loader ignores such names). Tensors come from producers called as
the shard is written, so a checkpoint larger than memory is written with one expert in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import INDEX_FILE, SAFETENSORS_DTYPES

PAGE = 4096
PADDING_PREFIX = "tiermoe.padding."
_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Planned:
    """A tensor to write: its name, dtype and shape, and what makes its values when written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    aligned: bool = False  # start at a PAGE boundary (the first tensor of a group)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_checkpoint(out: Path, tensors: Iterable[Planned], shard_bytes: int = 4 << 30, progress=None) -> int:
    """Write `tensors` in order into out/model-XXXXX-of-YYYYY.safetensors shards of about shard_bytes
    (a single model.safetensors when one is enough) and the index; returns the bytes written."""
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + t.nbytes > shard_bytes and t.aligned:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes + PAGE
    shards.append(current)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
        total += _write_shard(out / name, shard, progress)
        weight_map.update({t.name: name for t in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return total


def _layout(shard: list[Planned]) -> tuple[list[Planned], dict]:
    """The shard's tensors with padding before aligned groups, and their header entries."""
    placed, header, offset, pads = [], {}, 0, 0
    for t in shard:
        gap = -offset % PAGE if t.aligned else 0
        if gap:
            pad = Planned(
                f"{PADDING_PREFIX}{pads}",
                torch.uint8,
                (gap,),
                lambda n=gap: torch.zeros(n, dtype=torch.uint8),
            )
            placed.append(pad)
            header[pad.name] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            offset, pads = offset + gap, pads + 1
        placed.append(t)
        header[t.name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    return placed, header


def _write_shard(path: Path, shard: list[Planned], progress) -> int:
    placed, header = _layout(shard)
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":"))
    text += " " * (-(8 + len(text.encode())) % PAGE)  # the data starts on a page: offsets align in the file
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text.encode())) + text.encode())
        for t in placed:
            values = t.make()
            if values.dtype != t.dtype or tuple(values.shape) != t.shape:
                raise ValueError(
                    f"{t.name}: made {values.dtype} {list(values.shape)}, planned {t.dtype} {list(t.shape)}"
                )
            f.write(values.cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            if progress and not t.name.startswith(PADDING_PREFIX):
                progress(t)
        return f.tell()
