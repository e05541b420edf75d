"""`--routing`: parse the option and build the `Routing` a model runs with.

  natural                the checkpoint's own routers (on random weights: an optimistic upper bound)
  uniform                k distinct experts uniformly per token and layer (the worst case)
  szd                    the SZD model with the calibration of the checkpoint's model family
  szd:s_g=..,phi=..      the same with some parameters set (the others stay calibrated)
  trace:FILE             replay a recorded trace (routing/trace.py)

The default is szd on synthetic checkpoints (written by `tiermoe synth`) and natural on real ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..errors import InvalidRequestError
from ..weights.checkpoint import SYNTH_INFO_FILE, SYNTHETIC_KEY
from .hook import Routing
from .playback import TracePlayback
from .recorder import TraceRecorder
from .synthetic import RoutingModel, SZDParams, SZDRouting, UniformRouting, calibrated
from .trace import load_trace

MODES = ("natural", "uniform", "szd", "trace")


@dataclass(frozen=True)
class RoutingSpec:
    mode: str
    szd: SZDParams | None = None
    trace_path: str | None = None


def parse_routing(text: str, model_type: str = "") -> RoutingSpec:
    """A --routing value -> RoutingSpec; anything malformed is one clear InvalidRequestError."""
    mode, _, rest = text.strip().partition(":")
    if mode in ("natural", "uniform") and not rest:
        return RoutingSpec(mode)
    if mode == "trace":
        if not rest:
            raise InvalidRequestError("--routing trace needs a file: trace:FILE", "routing")
        return RoutingSpec("trace", trace_path=rest)
    if mode == "szd":
        return RoutingSpec("szd", szd=_szd_params(rest, calibrated(model_type)))
    raise InvalidRequestError(
        f"--routing {text!r} unknown; use natural, uniform, szd, szd:s_g=..,sigma_doc=..,sigma_loc=..,"
        "phi=..,p_stick=.. or trace:FILE",
        "routing",
    )


def _szd_params(text: str, base: SZDParams) -> SZDParams:
    names = [f.name for f in fields(SZDParams)]
    values = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq or name.strip() not in names:
            raise InvalidRequestError(
                f"--routing szd parameter {item!r} unknown; give NAME=VALUE with NAME one of {', '.join(names)}",
                "routing",
            )
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise InvalidRequestError(
                f"--routing szd: {name.strip()} needs a number, got {value!r}", "routing"
            ) from None
    try:
        return replace(base, **values)
    except ValueError as e:
        raise InvalidRequestError(f"--routing szd: {e}", "routing") from None


def is_synthetic(path: Path) -> bool:
    """Written by `tiermoe synth` (random weights whose own routing means nothing)."""
    if (path / SYNTH_INFO_FILE).exists():
        return True
    config = path / "config.json"
    return config.exists() and SYNTHETIC_KEY in json.loads(config.read_text())


def routing_model(
    spec: RoutingSpec, num_layers: int, num_experts: int, top_k: int, seed: int, device: torch.device
) -> RoutingModel | None:
    """The routing model of a uniform or szd spec; None for the others (natural, trace)."""
    dims = (num_layers, num_experts, top_k, seed, device)
    if spec.mode == "uniform":
        return UniformRouting(*dims)
    if spec.mode == "szd":
        return SZDRouting(*dims, spec.szd)
    return None


def build_routing(
    text: str | None,
    path: Path,
    model_type: str,
    moe_layers: list[int],
    num_experts: int,
    top_k: int,
    device: torch.device,
    seed: int = 0,
    record: str | None = None,
    prefetch_accuracy: float = 0.8,
) -> Routing | None:
    """The Routing for a model, or None when its own routers decide and nothing is recorded."""
    if text is None:
        text = "szd" if is_synthetic(path) else "natural"
    spec = parse_routing(text, model_type)
    model = routing_model(spec, len(moe_layers), num_experts, top_k, seed, device)
    if spec.mode == "trace":
        model = TracePlayback(
            load_trace(spec.trace_path), spec.trace_path, moe_layers, num_experts, top_k, device
        )
    recorder = TraceRecorder(record, moe_layers, num_experts, top_k, device) if record else None
    if model is None and recorder is None:
        return None
    return Routing(moe_layers, top_k, device, model, recorder, prefetch_accuracy, seed)
