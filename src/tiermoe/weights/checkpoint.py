"""A Hugging Face checkpoint directory: config.json plus single or sharded safetensors, read lazily.

Tensors are memory-mapped by safetensors and read one at a time (or one expert slice at a time), so
loading never holds the whole model in RAM. Names go through the architecture's rename table first,
so callers only see the in-memory names that transformers uses (e.g. Mixtral's `block_sparse_moe`
becomes `mlp`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ExpertNames:
    """Where an architecture's experts live, as format strings over {layer} and {expert}.

    per_expert: (gate, up, down) weight names of one expert, each [I, H] / [I, H] / [H, I].
    fused: (gate_up, down) names of a layer's stacked experts, [E, 2I, H] and [E, H, I].
    """

    per_expert: tuple[str, str, str]
    fused: tuple[str, str]


class Checkpoint:
    """Lazy access to the tensors of a checkpoint directory."""

    def __init__(self, path: str | os.PathLike, renames: tuple[tuple[str, str], ...] = ()):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        self.config = read_config(self.path)
        self._renames = [(re.compile(src), dst) for src, dst in renames]
        self._files: dict[str, object] = {}
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

    def shape(self, name: str) -> tuple[int, ...]:
        file, disk_name = self._locate(name)
        return tuple(self._open(file).get_slice(disk_name).get_shape())

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor, or its `index`-th slice along dim 0 (read without touching the rest)."""
        file, disk_name = self._locate(name)
        handle = self._open(file)
        try:
            if index is None:
                return handle.get_tensor(disk_name)
            return handle.get_slice(disk_name)[index]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {disk_name} from {self.path / file}: {e}") from None

    def _locate(self, name: str) -> tuple[str, str]:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} not found in {self.path}") from None

    def expert_layout(self, names: ExpertNames, layer: int) -> str:
        """'per_expert' or 'fused', whichever this checkpoint uses for `layer`."""
        if names.fused[0].format(layer=layer) in self:
            return "fused"
        if names.per_expert[0].format(layer=layer, expert=0) in self:
            return "per_expert"
        raise CheckpointError(
            f"no expert weights for layer {layer} in {self.path}: expected "
            f"{names.per_expert[0].format(layer=layer, expert=0)} or {names.fused[0].format(layer=layer)}"
        )

    def expert(
        self, names: ExpertNames, layer: int, expert: int, shape: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's (gate_up [2I, H], down [H, I]) in the checkpoint's dtype. shape is (H, I)."""
        hidden, inter = shape
        if self.expert_layout(names, layer) == "fused":
            gu_name, down_name = (n.format(layer=layer) for n in names.fused)
            gate_up, down = self.get(gu_name, expert), self.get(down_name, expert)
        else:
            gate, up, down_ = (n.format(layer=layer, expert=expert) for n in names.per_expert)
            gate_t, up_t = self.get(gate), self.get(up)
            expect_shape(gate, gate_t, (inter, hidden), self.file_of(gate))
            expect_shape(up, up_t, (inter, hidden), self.file_of(up))
            gate_up, down = torch.cat([gate_t, up_t]), self.get(down_)
            down_name = down_
        expect_shape(
            f"{names.fused[0].format(layer=layer)}[{expert}]", gate_up, (2 * inter, hidden), self.path
        )
        expect_shape(down_name, down, (hidden, inter), self.path)
        return gate_up, down

    def expert_names_on_disk(self, names: ExpertNames, layer: int, num_experts: int) -> set[str]:
        """Our names of every expert tensor of a layer, to account for them in the leftover check."""
        if self.expert_layout(names, layer) == "fused":
            return {n.format(layer=layer) for n in names.fused}
        return {n.format(layer=layer, expert=e) for e in range(num_experts) for n in names.per_expert}


def expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], where: Path | str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {name} in {where} has shape {list(tensor.shape)}, expected {list(shape)} from config.json"
        )


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{file} not found: a checkpoint directory needs its config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
