"""Where an architecture's experts live in a checkpoint: the names each architecture file declares."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertNames:
    """Where an architecture's experts live, as format strings over {layer} and {expert}.

    per_expert: (gate, up, down) weight names of one expert, each [I, H] / [I, H] / [H, I].
    fused: (gate_up, down) names of a layer's stacked experts, [E, 2I, H] and [E, H, I].
    """

    per_expert: tuple[str, str, str]
    fused: tuple[str, str]
