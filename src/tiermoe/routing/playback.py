"""Replay a recorded routing trace as the routing of a run: `--routing trace:FILE`.

The trace's sequences are dealt to requests in order (the n-th document of the run gets the trace's
n-th sequence, cycling), so a workload recorded on a real checkpoint replays against any budget and
policy. Tokens the trace does not cover (a generation longer than the recording) keep the router's own
choice.
"""

from __future__ import annotations

import torch

from ..errors import InvalidRequestError
from .synthetic import RoutingModel
from .trace import Trace


class TracePlayback(RoutingModel):
    mode = "trace"

    def __init__(self, trace: Trace, path: str, moe_layers: list[int], num_experts: int, top_k: int, device):
        super().__init__(len(moe_layers), num_experts, top_k, 0, device)
        if trace.top_k != top_k or trace.num_experts > num_experts:
            raise InvalidRequestError(
                f"routing trace {path} has {trace.num_experts} experts top-{trace.top_k}; this model has "
                f"{num_experts} top-{top_k}",
                "routing",
            )
        missing = sorted(set(trace.layers) - set(moe_layers))
        if missing:
            raise InvalidRequestError(
                f"routing trace {path} routes layer {missing[0]}, which is not an MoE layer of this model",
                "routing",
            )
        self.path = path
        tables = [torch.from_numpy(trace.table(s, moe_layers)) for s in trace.sequences()]
        width = max(t.shape[0] for t in tables)
        # [sequences, positions + 1, L, k]; the extra position is all -1, where uncovered tokens look up
        table = torch.full((len(tables), width + 1, len(moe_layers), top_k), -1, dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, : t.shape[0]] = t.to(torch.int32)
        self.table = table.to(device)
        self.width = width

    @property
    def params(self) -> dict:
        return {"file": self.path, "sequences": self.table.shape[0]}

    def step(
        self, docs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
    ) -> None:
        pos = positions.clamp(max=self.width)  # past the recording: the all -1 row
        ids = self.table[(docs % self.table.shape[0])[:, None], pos]  # [B, S, L, k]
        self.ids = ids.permute(2, 0, 1, 3).long()  # [L, B, S, k], -1 where the trace has no row
        self.h = None
