"""`Routing`: what the MoE blocks ask for expert ids when routing is overridden, recorded, or both.

The runner announces each run (`begin_run`: new documents in the batch rows) and each step
(`begin_step`: the positions and validity of the tokens about to run, inside captured graphs too); each
MoE block then calls `route(layer, probs)`. Without an override the router's own top-k stands, and a
recorder, if any, writes it down.
"""

from __future__ import annotations

import itertools

import torch

from . import rng
from .playback import TracePlayback
from .recorder import TraceRecorder
from .synthetic import RoutingModel

_PREDICT, _WRONG = 11, 12  # purposes of the emulated predictor's draws


class Routing:
    def __init__(
        self,
        moe_layers: list[int],
        top_k: int,
        device: torch.device,
        model: RoutingModel | None = None,
        recorder: TraceRecorder | None = None,
        prefetch_accuracy: float = 0.8,
        seed: int = 0,
    ):
        self.moe_layers, self.k, self.device = moe_layers, top_k, device
        self.index = {layer: i for i, layer in enumerate(moe_layers)}
        self.model, self.recorder = model, recorder
        self.prefetch_accuracy, self.seed = prefetch_accuracy, seed
        self.next_doc = 0  # documents are numbered in the order runs start them
        self._docs: dict[int, torch.Tensor] = {}
        self.docs: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        return self.model.mode if self.model else "natural"

    @property
    def params(self) -> dict | None:
        return self.model.params if self.model else None

    @property
    def overrides(self) -> bool:
        return self.model is not None

    def begin_run(self, prompt_lens: list[int], max_len: int) -> None:
        """New documents in every batch row; max_len: the KV cache's length for this batch."""
        b = len(prompt_lens)
        docs = list(range(self.next_doc, self.next_doc + b))
        self.next_doc += b
        if b not in self._docs:  # kept per batch size: a captured graph reads this very tensor
            self._docs[b] = torch.zeros(b, dtype=torch.long, device=self.device)
        self.docs = self._docs[b]
        self.docs.copy_(torch.tensor(docs))
        if self.model:
            self.model.begin_run(self.docs)
        if self.recorder:
            self.recorder.begin_run(docs, prompt_lens, max_len)

    def begin_step(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """positions, valid: [B, S] of the tokens this step runs (device tensors)."""
        self.positions = positions
        if self.model:
            self.model.step(self.docs, positions, valid)
        if self.recorder:
            self.recorder.step(positions, valid)

    def route(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, k] for the router probabilities probs [T, E] of MoE layer `layer`."""
        i = self.index[layer]
        if self.model is None:
            ids = probs.topk(self.k, dim=-1).indices
        else:
            ids = self.model.ids[i].reshape(-1, self.k)
            if isinstance(self.model, TracePlayback):  # tokens past the recording keep the router's choice
                ids = torch.where(ids >= 0, ids, probs.topk(self.k, dim=-1).indices)
        if self.recorder:
            self.recorder.observe(i, ids.view(*self.positions.shape, self.k))
        return ids

    def view(self) -> tuple:
        """The current step's tensors (positions, routed ids, scores)."""
        return self.positions, self.model.ids if self.model else None, self.model.h if self.model else None

    def resume(self, view: tuple) -> None:
        """Point at tensors a captured graph rewrites on each replay, for eager readers between its pieces."""
        self.positions, ids, h = view
        if self.model:
            self.model.ids, self.model.h = ids, h

    def end_run(self) -> None:
        if self.recorder:
            self.recorder.end_run()

    def state(self) -> list[torch.Tensor]:
        """Tensors a step changes in place: saved and restored around a graph's warm-up run."""
        return (self.model.state() if self.model else []) + (self.recorder.state() if self.recorder else [])

    def predictor(self) -> EmulatedPredictor:
        return EmulatedPredictor(self)


class EmulatedPredictor:
    """Next-layer prediction under an override, where the routers decide nothing and router lookahead
    would predict noise (ROUTING.md): the next layer's true set with each expert kept with probability
    `prefetch_accuracy`, the others replaced by draws from that layer's scores outside the true set."""

    def __init__(self, routing: Routing):
        self.routing = routing
        layers = routing.moe_layers
        self.next_layer = dict(itertools.pairwise(layers))

    def predict(self, layer: int, x: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return None
        r, model = self.routing, self.routing.model
        i = r.index[nxt]
        true = model.ids[i]  # [B, S, k]; -1 where a trace has no row
        keys = rng.hash_keys(r.seed, _PREDICT, i, r.docs[:, None, None], r.positions[..., None])  # [B, S, 1]
        keep = rng.uniform(rng.hash_keys(keys, torch.arange(r.k, device=true.device))) < r.prefetch_accuracy
        scores = rng.gumbel(rng.hash_keys(keys, _WRONG, torch.arange(model.E, device=true.device)))
        if model.h is not None:
            scores = scores + model.h[i]
        scores = scores.scatter(-1, true.clamp(min=0), float("-inf"))  # wrong guesses are really wrong
        wrong = scores.topk(r.k, dim=-1).indices
        return nxt, torch.where(keep & (true >= 0), true, wrong).reshape(-1, r.k)
