"""`Routing`: what the MoE blocks ask for expert ids when routing is overridden, recorded, or both.

The engine announces each sequence (`begin_sequence`: a new document in a state row, `end_sequence`) and
the runner each step (`begin_step`: the state rows, positions, validity and KV slots of the tokens about
to run, inside captured graphs too); each MoE block then calls `route(layer, probs)`. Without an override the router's own top-k stands, and a
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
        self.next_doc = 0  # documents are numbered in the order sequences start
        self.seq_docs: torch.Tensor | None = None  # [slots + 1]: each state row's document
        self.docs: torch.Tensor | None = None  # [B]: the current step's rows' documents
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

    def open(self, slots: int, kv_slots: int) -> None:
        """State for `slots` running sequences (row `slots` is where padding rows point) and a recorder
        buffer for every KV cache slot; the runner calls this once, before any graph is captured."""
        self.seq_docs = torch.zeros(slots + 1, dtype=torch.long, device=self.device)
        if self.model:
            self.model.open(slots + 1)
        if self.recorder:
            self.recorder.open(kv_slots)

    def begin_sequence(self, slot: int, doc: int | None = None) -> int:
        """A sequence starts in state row `slot`: a new document, or `doc` again when a preempted
        sequence recomputes (its routing then repeats exactly). Returns its document."""
        if doc is None:
            doc, self.next_doc = self.next_doc, self.next_doc + 1
        self.seq_docs[slot] = doc
        if self.model:
            self.model.begin_sequence(slot, doc)
        return doc

    def end_sequence(self, doc: int, prompt_len: int, kv_slots: list[int]) -> None:
        """A sequence ended; kv_slots: its computed tokens' KV cache slots by position (the recorder's)."""
        if self.recorder:
            self.recorder.end_sequence(doc, prompt_len, kv_slots)

    def flush(self) -> None:
        """The engine is idle: the recorder writes what it holds."""
        if self.recorder:
            self.recorder.flush()

    def begin_step(
        self, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, kv_slots: torch.Tensor
    ) -> None:
        """rows [B]: the state row of each batch row; positions, valid, kv_slots [B, S] of the tokens this
        step runs (device tensors)."""
        self.positions = positions
        self.docs = self.seq_docs[rows]
        if self.model:
            self.model.step(self.docs, rows, positions, valid)
        if self.recorder:
            self.recorder.step(kv_slots)

    def needs_probs(self) -> bool:
        """Recording alone routes by the router's top-k, and a trace's playback takes it past the
        recording; the routing models choose alone."""
        return self.model is None or isinstance(self.model, TracePlayback)

    def route(self, layer: int, probs: torch.Tensor | None) -> torch.Tensor:
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
        """The current step's tensors (documents, positions, routed ids, scores)."""
        model = self.model
        return self.docs, self.positions, model.ids if model else None, model.h if model else None

    def resume(self, view: tuple) -> None:
        """Point at tensors a captured graph rewrites on each replay, for eager readers between its pieces."""
        self.docs, self.positions, ids, h = view
        if self.model:
            self.model.ids, self.model.h = ids, h

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
