"""Routing models that replace the routers' choice of experts on synthetic checkpoints (ROUTING.md).

Random-weight routers pick almost the same experts every token, so a benchmark that trusts them
measures a cache that never misses. These models decide the expert ids instead; the MoE block still
computes the chosen experts with the router's probabilities, normalised as the model does.

Neither depends on the hidden states, so one call per step routes every MoE layer at once: a few dozen
kernels per step whatever the depth, all on the device, capturable in a CUDA graph. Draws come from
counter-based hashes of (seed, document, layer, position), so runs repeat exactly under a seed.

  uniform  k distinct experts drawn uniformly per token and layer: no locality, the worst case.
  szd      sticky, Zipf-skewed, drifting: per layer a global popularity g[e] = -s_g ln(rank(e)), a hot
           set per document z_doc ~ N(0, I), a local hot set drifting as an AR(1) process
           z_t = phi z_{t-1} + sqrt(1 - phi^2) eps_t; each expert of the previous token's set is kept
           with probability p_stick, the rest filled by Gumbel-top-k over
           h = g + sigma_doc z_doc + sigma_loc z_t. Tokens of a prompt are routed one after another,
           exactly as in decode.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from . import rng
from .trace import Trace

# Purposes of the draws, mixed into the hash so each is independent of the others.
_EPS, _GUMBEL, _STICK, _DOC, _LOC0, _RANK = range(1, 7)


@dataclass(frozen=True)
class SZDParams:
    s_g: float  # Zipf skew of the global popularity
    sigma_doc: float  # weight of the per-document hot set
    sigma_loc: float  # weight of the drifting local hot set
    phi: float  # AR(1) coefficient of the drift per token, in [0, 1)
    p_stick: float  # probability that an expert of the previous token is kept, in [0, 1]

    def __post_init__(self):
        if (
            not 0 <= self.phi < 1
            or not 0 <= self.p_stick <= 1
            or min(self.s_g, self.sigma_doc, self.sigma_loc) < 0
        ):
            raise ValueError("szd needs s_g, sigma_doc, sigma_loc >= 0, 0 <= phi < 1 and 0 <= p_stick <= 1")

    def to_dict(self) -> dict:
        return asdict(self)


# Calibrated to the published hit rates and overlaps of trained models (ROUTING.md), by model family.
CALIBRATED = {
    "olmoe": SZDParams(s_g=0.9, sigma_doc=0.25, sigma_loc=1.0, phi=0.99, p_stick=0.15),
    "qwen3_moe": SZDParams(s_g=1.1, sigma_doc=1.25, sigma_loc=1.5, phi=0.99, p_stick=0.10),
    "mixtral": SZDParams(s_g=0.2, sigma_doc=0.25, sigma_loc=1.0, phi=0.9, p_stick=0.0),
}
# Families without a calibration (Qwen2-MoE, ...) route with less locality: ROUTING.md's Mixtral-like regime.
UNCALIBRATED = CALIBRATED["mixtral"]


def calibrated(model_type: str) -> SZDParams:
    return CALIBRATED.get(model_type, UNCALIBRATED)


class RoutingModel:
    """Routes every MoE layer of a step at once. After `step`, `ids` is [L, B, S, k] (long) and `h`
    [L, B, S, E] the scores the ids were drawn from (the emulated predictor draws its wrong guesses there)."""

    mode = ""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, seed: int, device: torch.device):
        self.L, self.E, self.k, self.seed, self.device = num_layers, num_experts, top_k, seed, device
        self.layer_keys = torch.arange(num_layers, device=device)[:, None, None, None]  # [L, 1, 1, 1]
        self.expert_keys = torch.arange(num_experts, device=device)  # [E]
        self.ids: torch.Tensor | None = None
        self.h: torch.Tensor | None = None

    @property
    def params(self) -> dict | None:
        return None

    def open(self, slots: int) -> None:
        """Room for the state of `slots` sequences at once (rows of running requests; one more for padding)."""

    def begin_sequence(self, slot: int, doc: int) -> None:
        """Document `doc` starts (or restarts, after a preemption) in state row `slot`."""

    def start(self, docs: torch.Tensor) -> torch.Tensor:
        """Documents `docs` [B] starting together in state rows 0 .. B-1 (a synthetic batch); returns the
        rows for `step`."""
        self.open(len(docs))
        for row, doc in enumerate(docs.tolist()):
            self.begin_sequence(row, doc)
        return torch.arange(len(docs), device=self.device)

    def state(self) -> list[torch.Tensor]:
        """Tensors a step changes in place (saved around graph warm-ups, which must not advance them)."""
        return []

    def _step_keys(self, docs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[L, B, S, 1] hash of (seed, layer, document, position)."""
        return rng.hash_keys(
            self.seed, self.layer_keys, docs[None, :, None, None], positions[None, :, :, None]
        )

    def step(
        self, docs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Route every MoE layer of one step at once (into self.ids); each routing model defines it.
        docs, rows [B]: each batch row's document and state row; positions, valid [B, S]."""
        raise NotImplementedError(f"{type(self).__name__} must define step()")


class UniformRouting(RoutingModel):
    mode = "uniform"

    def step(
        self, docs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
    ) -> None:
        keys = self._step_keys(docs, positions)
        g = rng.gumbel(rng.hash_keys(keys, _GUMBEL, self.expert_keys))  # [L, B, S, E]
        self.ids = g.topk(self.k, dim=-1).indices  # Gumbel-top-k of equal scores: uniform, distinct
        self.h = torch.zeros_like(g)


class SZDRouting(RoutingModel):
    mode = "szd"

    def __init__(self, num_layers, num_experts, top_k, seed, device, params: SZDParams):
        super().__init__(num_layers, num_experts, top_k, seed, device)
        self.p = params
        # Global popularity: a random ranking of the experts per layer, Zipf-weighted.
        order = rng.uniform(rng.hash_keys(seed, _RANK, self.layer_keys[:, 0, 0], self.expert_keys)).argsort(
            -1
        )
        rank = torch.empty_like(order).scatter_(-1, order, self.expert_keys.expand(num_layers, -1).clone())
        self.g = -params.s_g * torch.log((rank + 1).float())  # [L, E]
        self._state: dict[str, torch.Tensor] = {}

    @property
    def params(self) -> dict:
        return self.p.to_dict()

    def open(self, slots: int) -> None:
        # One row per running sequence: a captured graph gathers and scatters its rows of these very tensors.
        self._state = {
            "base": torch.zeros(self.L, slots, self.E, device=self.device),
            "z": torch.zeros(self.L, slots, self.E, device=self.device),
            "prev": torch.full((self.L, slots, self.k), -1, dtype=torch.long, device=self.device),
        }

    def begin_sequence(self, slot: int, doc: int) -> None:
        s = self._state
        docs = torch.tensor([doc], device=self.device)
        keys = rng.hash_keys(self.seed, self.layer_keys[..., 0], docs[None, :, None])  # [L, 1, 1]
        z_doc = rng.normal(rng.hash_keys(keys, _DOC, self.expert_keys))  # [L, 1, E]
        s["base"][:, slot] = (self.g[:, None] + self.p.sigma_doc * z_doc)[:, 0]
        s["z"][:, slot] = rng.normal(rng.hash_keys(keys, _LOC0, self.expert_keys))[:, 0]  # the stationary law
        s["prev"][:, slot] = -1

    def state(self) -> list[torch.Tensor]:
        return [self._state["z"], self._state["prev"]] if self._state else []

    def step(
        self, docs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
    ) -> None:
        if positions.shape[1] == 1 and docs.is_cuda:  # a decode step: one launch (szd_kernel.py)
            from .szd_kernel import szd_decode  # triton comes with torch's CUDA builds

            return szd_decode(self, docs, rows, positions, valid, (_EPS, _GUMBEL, _STICK))
        p, s = self.p, self._state
        keys = self._step_keys(docs, positions)  # [L, B, S, 1]
        eps = rng.normal(rng.hash_keys(keys, _EPS, self.expert_keys))  # [L, B, S, E]
        noise = rng.gumbel(rng.hash_keys(keys, _GUMBEL, self.expert_keys))
        stick = rng.uniform(rng.hash_keys(keys, _STICK, self.expert_keys[: self.k]))  # [L, B, S, k]
        base, z, prev = s["base"][:, rows], s["z"][:, rows], s["prev"][:, rows]  # [L, B, E | k]
        ids, hs = [], []
        for t in range(positions.shape[1]):  # each token depends on the one before: stickiness, drift
            v = valid[None, :, t, None]  # [1, B, 1]; padding rows leave the state alone
            z = torch.where(v, p.phi * z + math.sqrt(1 - p.phi**2) * eps[:, :, t], z)
            h = base + p.sigma_loc * z  # [L, B, E]
            keep = (prev >= 0) & (stick[:, :, t] < p.p_stick)
            # Kept experts outrank every fresh draw, so top-k takes them and fills the rest by Gumbel.
            score = (h + noise[:, :, t]).scatter_add(-1, prev.clamp(min=0), keep.float() * 1e9)
            chosen = score.topk(self.k, dim=-1).indices  # [L, B, k]
            prev = torch.where(v, chosen, prev)
            ids.append(chosen)
            hs.append(h)
        # Padding rows share one state row: what they write there is never read for a sequence.
        s["z"].index_copy_(1, rows, z)
        s["prev"].index_copy_(1, rows, prev)
        self.ids = torch.stack(ids, dim=2)  # [L, B, S, k]
        self.h = torch.stack(hs, dim=2)  # [L, B, S, E]


def synthetic_trace(
    model: RoutingModel, moe_layers: list[int], sequences: int, prompt_len: int, gen_len: int
) -> Trace:
    """The trace the engine records under `model` when `sequences` documents run as one batch: each
    prompt routed in one step, then gen_len decode steps of one token each. No checkpoint needed: the
    routing does not depend on the hidden states (issue 15's union of experts a step, offline)."""
    docs = torch.arange(sequences, device=model.device)
    rows = model.start(docs)
    cols: dict[str, list] = {"seq": [], "token": [], "layer": [], "prefill": [], "step": [], "experts": []}
    spans = [(0, prompt_len, True)] + [(prompt_len + t, 1, False) for t in range(gen_len)]
    for step, (start, length, prefill) in enumerate(spans):
        positions = torch.arange(start, start + length, device=model.device).expand(sequences, length)
        valid = torch.ones(sequences, length, dtype=torch.bool, device=model.device)
        model.step(docs, rows, positions, valid)
        ids = model.ids.cpu()  # [L, B, S, k]
        for row, layer in enumerate(moe_layers):
            for b in range(sequences):
                cols["experts"].append(ids[row, b])
                cols["seq"] += [b] * length
                cols["token"] += list(range(start, start + length))
                cols["layer"] += [layer] * length
                cols["prefill"] += [prefill] * length
                cols["step"] += [step] * length
    experts = torch.cat(cols.pop("experts")).numpy()
    return Trace.build(**cols, experts=experts, num_experts=model.E)
