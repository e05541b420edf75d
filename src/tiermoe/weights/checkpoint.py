"""A Hugging Face checkpoint directory: config.json plus single or sharded safetensors, read lazily.

Tensors are memory-mapped by safetensors and read one at a time (or one expert slice at a time), so
loading never holds the whole model in RAM. Names go through the architecture's rename table first,
so callers only see the in-memory names that transformers uses (e.g. Mixtral's `block_sparse_moe`
becomes `mlp`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..formats.base import ExpertFormat, Piece
from ..models.names import ExpertNames

# config.json key of checkpoints whose experts are generated, not stored (tiermoe synth --experts-in-memory)
SYNTHETIC_KEY = "tiermoe_synthetic_experts"
# what `tiermoe synth` records beside the checkpoint it wrote (preset, seed, date)
SYNTH_INFO_FILE = "tiermoe_synth.json"

INDEX_FILE = "model.safetensors.index.json"


SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what an unquantized tensor may be stored as


@dataclass(frozen=True)
class ByteRange:
    """A contiguous run of one tensor's bytes in a checkpoint file."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype


class Checkpoint:
    """Lazy access to the tensors of a checkpoint directory."""

    def __init__(self, path: str | os.PathLike, renames: tuple[tuple[str, str], ...] = ()):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        self.config = read_config(self.path)
        self._renames = [(re.compile(src), dst) for src, dst in renames]
        self._files: dict[str, object] = {}
        self._headers: dict[str, dict] = {}
        self._where: dict[str, tuple[str, str]] = {}  # our name -> (file, name on disk)
        for file in self._shard_files():
            handle = self._open(file)
            for disk_name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                self._where[self._rename(disk_name)] = (file, disk_name)

    def _shard_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}")
        for file in files:
            if not (self.path / file).exists():
                raise CheckpointError(f"{self.path / file} is missing (listed in {INDEX_FILE})")
        return files

    def _open(self, file: str):
        if file not in self._files:
            full = self.path / file
            try:
                handle = safe_open(str(full), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(
                    f"cannot read {full}: {e} (is the file truncated or corrupt?)"
                ) from None
            self._files[file] = handle
        return self._files[file]

    def _rename(self, name: str) -> str:
        for pattern, dst in self._renames:
            name = pattern.sub(dst, name)
        return name

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self.path / self._where[name][0]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped."""
        file, disk_name = self._locate(name)
        try:
            return self._open(file).get_tensor(disk_name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {disk_name} from {self.path / file}: {e}") from None

    def stored(self, name: str) -> tuple[str, torch.dtype | None, tuple[int, ...]]:
        """(name on disk, dtype, shape) of tensor `name`, from its file's header (nothing read)."""
        file, disk_name = self._locate(name)
        entry = self.header(file)[disk_name]
        return disk_name, SAFETENSORS_DTYPES.get(entry["dtype"]), tuple(entry["shape"])

    def _locate(self, name: str) -> tuple[str, str]:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} not found in {self.path}") from None

    def expert_layout(self, fmt: ExpertFormat, names: ExpertNames, layer: int) -> str:
        """'per_expert' or 'fused', whichever this checkpoint uses for `layer` (quantized formats name
        their own per-expert tensors, e.g. `.qweight`)."""
        first = fmt.pieces(names, layer, 0, fused=False)[0].name
        if first in self:
            return "per_expert"
        fused = fmt.fused_name(names, layer)
        if fused in self:
            return "fused"
        raise CheckpointError(
            f"no expert weights for layer {layer} in {self.path}: expected {first} or {fused}"
        )

    def header(self, file: str) -> dict:
        """The parsed safetensors header of a file: name -> {dtype, shape, data_offsets}, plus data start."""
        if file not in self._headers:
            full = self.path / file
            with open(full, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            self._headers[file] = {"__data_start__": 8 + size, **header}
        return self._headers[file]

    def byte_range(
        self,
        name: str,
        shape: tuple[int, ...],
        index: int | None = None,
        dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    ) -> ByteRange:
        """Where tensor `name` (or its index-th slice along dim 0) lies in its file; checks its shape and
        that its dtype is one of `dtypes`.

        `shape` is the expected shape of what is returned (the slice when index is given)."""
        file, disk_name = self._locate(name)
        entry = self.header(file)[disk_name]
        full_shape = tuple(entry["shape"])
        got = full_shape[1:] if index is not None else full_shape
        expect_shape(disk_name, got, shape, self.path / file)
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype not in dtypes:
            allowed = ", ".join(k for k, v in SAFETENSORS_DTYPES.items() if v in dtypes)
            raise CheckpointError(
                f"tensor {disk_name} in {self.path / file} has dtype {entry['dtype']}, expected {allowed}"
            )
        start = self.header(file)["__data_start__"] + entry["data_offsets"][0]
        nbytes = math.prod(shape) * dtype.itemsize
        if index is not None:
            if not 0 <= index < full_shape[0]:
                raise CheckpointError(f"tensor {disk_name} in {self.path / file} has no slice {index}")
            start += index * nbytes
        return ByteRange(self.path / file, start, nbytes, dtype)

    def expert_ranges(
        self, fmt: ExpertFormat, names: ExpertNames, layer: int, expert: int
    ) -> list[tuple[Piece, ByteRange]]:
        """Each checkpoint tensor of one expert in format `fmt`, with where it lies on disk."""
        fused = self.expert_layout(fmt, names, layer) == "fused"
        return [
            (p, self.byte_range(p.name, p.shape, p.index, p.dtypes or FLOAT_DTYPES))
            for p in fmt.pieces(names, layer, expert, fused)
        ]

    def expert_names_on_disk(
        self, fmt: ExpertFormat, names: ExpertNames, layer: int, num_experts: int
    ) -> set[str]:
        """Our names of every expert tensor of a layer, to account for them in the leftover check."""
        fused = self.expert_layout(fmt, names, layer) == "fused"
        return {p.name for e in range(num_experts) for p in fmt.pieces(names, layer, e, fused)}


def expect_shape(name: str, got: tuple[int, ...], shape: tuple[int, ...], where: Path | str) -> None:
    if tuple(got) != tuple(shape):
        raise CheckpointError(
            f"tensor {name} in {where} has shape {list(got)}, expected {list(shape)} from config.json"
        )


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{file} not found: a checkpoint directory needs its config.json")
    return read_json_object(file)


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold an object (config.json, generation_config.json); CheckpointError else."""
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__}, not an object")
    return value
