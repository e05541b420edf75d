"""Where an architecture's experts live in a checkpoint: the names each architecture file declares."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertNames:
    """Where an architecture's experts live, as format strings over {layer} and {expert}.

    per_expert: (gate, up, down) weight names of one expert, each [I, H] / [I, H] / [H, I]; their biases,
    where the experts have them, are named the same with `.bias` for `.weight`.
    fused: (gate_up, down) names of a layer's stacked experts, [E, 2I, H] and [E, H, I].
    fused_bias: (gate_up, down) names of a layer's stacked biases, [E, 2I] and [E, H].
    fused_in_out: the fused weights are stored [E, in, out] ([E, H, 2I] and [E, I, H]: gpt-oss).
    interleaved: fused gate_up rows alternate gate and up (row 2j gate j, 2j + 1 up j: gpt-oss).
    """

    per_expert: tuple[str, str, str]
    fused: tuple[str, str]
    fused_bias: tuple[str, str] | None = None
    fused_in_out: bool = False
    interleaved: bool = False
