"""What one routed expert computes, where architectures differ: SwiGLU, down(silu(gate(x)) * up(x)), for
most; gpt-oss adds a bias to both projections and clamps its GLU. Formats (formats/) own the bytes and
the kernels; this is the math they all share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ExpertKind:
    """bias: gate_up and down have biases ([2I] and [H]). limit: gpt-oss's clamped GLU, gate <= limit and
    -limit <= up <= limit, then gate * sigmoid(alpha * gate) * (up + 1); None: silu(gate) * up."""

    bias: bool = False
    limit: float | None = None
    alpha: float = 1.0

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.limit is None:
            return F.silu(gate) * up
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + 1)


SWIGLU = ExpertKind()
