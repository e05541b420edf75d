"""Owns the model on its device: the KV cache, prefill and decode forwards, and CUDA graphs.

A decode step launches about a thousand small kernels; from Python that costs more than the GPU work
itself (measured: 25 ms of launch overhead against 5 ms of kernels per OLMoE step on an H100). When
the expert provider never synchronises with the host, the whole step is captured once per batch size
and cache size and replayed (DecodeGraph). When it does (the tiered store decides per layer which
experts to move), each layer's dense part (attention, norms, router, shared expert) is its own graph
and only the routed experts run eagerly in between (LayeredDecodeGraph)."""

from __future__ import annotations

import torch

from ..models.base import MoEArgs
from ..models.kv_cache import KVCache
from ..models.layers import CausalLM
from ..models.moe import SparseMoeBlock
from ..offload.provider import ExpertProvider
from ..routing.hook import Routing

MIN_CACHE = 256  # cache sizes are rounded up to powers of two from here, so few graphs are captured


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        args: MoEArgs,
        device: torch.device,
        dtype: torch.dtype,
        prefill_chunk: int,
        max_model_len: int,
        graphs: bool,
        provider: ExpertProvider,
        routing: Routing | None = None,
        kv_tokens: int | None = None,
    ):
        self.model, self.args, self.device, self.dtype = model, args, device, dtype
        # The memory plan's KV reserve, in tokens summed over a batch's rows: all caches held at once
        # stay within it. None: the context of one row.
        self.kv_tokens = kv_tokens or max_model_len
        self.routing = routing
        self.prefill_chunk, self.max_model_len = prefill_chunk, max_model_len
        self.graphs = graphs and device.type == "cuda"
        self.provider = provider
        self.pad_id = 0
        self._caches: dict[int, KVCache] = {}
        self._graphs: dict[int, DecodeGraph] = {}

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.num_layers, batch, max_len, a.num_kv_heads, a.head_dim, self.dtype, self.device)

    def cache_for(self, batch: int, max_len: int) -> KVCache:
        """A reset cache of at least max_len slots for `batch` rows, reused across calls (with its graph).
        Sizes round up to powers of two (fewer graphs to capture) but never past the plan's KV reserve:
        caches of other batch sizes are dropped when the new one would not fit beside them."""
        if batch * max_len > self.kv_tokens:
            raise ValueError(f"{batch} x {max_len} KV slots exceed the plan's {self.kv_tokens} tokens")
        cache = self._caches.get(batch)
        if cache is None or cache.max_len < max_len:
            self._graphs.pop(batch, None)
            self._caches.pop(batch, None)
            rounded = max(MIN_CACHE, 1 << (max_len - 1).bit_length())
            size = max(min(rounded, self.max_model_len, self.kv_tokens // batch), max_len)
            if batch * size + sum(c.batch * c.max_len for c in self._caches.values()) > self.kv_tokens:
                self._caches.clear()
                self._graphs.clear()
            cache = self._caches[batch] = self.new_cache(batch, size)
        cache.reset()
        return cache

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad the prompts into one batch and run them in chunks. Returns (last logits [B, V] float32,
        next positions [B])."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            valid[row, width - len(prompt) :] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        positions = (valid.cumsum(-1) - 1).clamp(min=0)
        if self.routing:
            self.routing.begin_run([len(p) for p in prompts], cache.max_len)
        # Each chunk fills the cache; the last one's logits are the next token's.
        *_, (_, logits) = self._chunks(ids, valid, positions, cache, self.prefill_chunk, last_only=True)
        return logits, positions[:, -1] + 1

    @torch.inference_mode()
    def logprobs(self, ids: list[int], chunk: int = 512, top: int = 0):
        """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1 (float32 [len - 1]) and, with top > 0, the
        `top` likeliest next tokens at each of those positions (ids and log-probabilities, [len - 1, top]):
        one sequence through a fresh cache, `chunk` tokens a forward (their logits, [chunk, vocab] float32,
        are the peak memory)."""
        cache = self.cache_for(1, len(ids))
        x = torch.tensor([ids], device=self.device)
        valid = torch.ones_like(x, dtype=torch.bool)
        if self.routing:
            self.routing.begin_run([len(ids)], cache.max_len)
        chosen, top_ids, top_values = [], [], []
        try:
            positions = torch.arange(len(ids), device=self.device)[None]
            for start, logits in self._chunks(x, valid, positions, cache, chunk, last_only=False):
                targets = x[0, start + 1 : start + 1 + logits.shape[1]]  # the next token of each position
                scored = torch.log_softmax(logits[0, : len(targets)].float(), dim=-1)
                chosen.append(scored.gather(-1, targets[:, None])[:, 0])
                if top:
                    best = torch.topk(scored, top, dim=-1)
                    top_ids.append(best.indices)
                    top_values.append(best.values)
        finally:
            self.end_run()
        if not top:
            return torch.cat(chosen)
        return torch.cat(chosen), torch.cat(top_ids), torch.cat(top_values)

    def _chunks(self, ids, valid, positions, cache: KVCache, chunk: int, last_only: bool):
        """Run ids [B, W] through the model `chunk` positions at a time, filling the cache; yields (start,
        logits of the chunk: [B, V] of its last position if last_only, else [B, T, V])."""
        width = ids.shape[1]
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            cache.start(valid[:, start:end])
            if self.routing:
                self.routing.begin_step(positions[:, start:end], valid[:, start:end])
            logits = self.model(ids[:, start:end], positions[:, start:end], cache, last_only=last_only)
            cache.commit()
            yield start, logits

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor, cache: KVCache):
        """tokens, positions [B] on device; active [B] bool (finished rows stay in the batch, masked)."""
        if self.graphs and self._caches.get(cache.batch) is cache:
            graph = self._graphs.get(cache.batch)
            if graph is None:
                whole = self.provider.graph_safe(cache.batch)
                kind = DecodeGraph if whole else LayeredDecodeGraph
                graph = self._graphs[cache.batch] = kind(self.model, cache, self.provider, self.routing)
                graph.prime(tokens, positions, active)
            return graph.run(tokens, positions, active)
        cache.start(active[:, None])
        if self.routing:
            self.routing.begin_step(positions[:, None], active[:, None])
        logits = self.model(tokens[:, None], positions[:, None], cache)
        cache.commit()
        return logits

    def end_run(self) -> None:
        """The run's sequences are done (or abandoned): a recorder writes its trace."""
        if self.routing:
            self.routing.end_run()


class DecodeGraph:
    """One captured decode step over a fixed cache; inputs are copied into static buffers per replay."""

    def __init__(self, model: CausalLM, cache: KVCache, provider: ExpertProvider, routing: Routing | None):
        self.model, self.cache, self.routing = model, cache, routing
        b, device = cache.batch, cache.valid.device
        self.tokens = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.active = torch.ones(b, dtype=torch.bool, device=device)

    def prime(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> None:
        """Capture with the first step's inputs in place, so the capture's warm-up run writes (KV cache,
        recorded routing) exactly where that step's replay will overwrite them. Routing state the warm-up
        advances is put back, so the first replay routes exactly as an eager step would."""
        self._load(tokens, positions, active)
        saved = [t.clone() for t in self.routing.state()] if self.routing else []
        self.capture()
        for t, value in zip(self.routing.state() if self.routing else [], saved, strict=True):
            t.copy_(value)

    def _load(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> None:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.active.copy_(active)
        self.cache.cursor.fill_(self.cache.length)

    def capture(self) -> None:
        self.graph = capture(self._step)
        self.logits = self.graph.outputs

    def _step(self) -> torch.Tensor:
        self.cache.start_static(self.active)
        self._route_step()
        return self.model(self.tokens[:, None], self.positions[:, None], self.cache)

    def _route_step(self) -> None:
        if self.routing:
            self.routing.begin_step(self.positions[:, None], self.active[:, None])

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache full: {self.cache.length} slots")
        self._load(tokens, positions, active)
        self.replay()
        self.cache.length += 1
        return self.logits

    def replay(self) -> None:
        self.graph.graph.replay()


class LayeredDecodeGraph(DecodeGraph):
    """Per-layer graphs of the dense work; the provider runs the routed experts eagerly between them."""

    def __init__(self, model: CausalLM, cache: KVCache, provider: ExpertProvider, routing: Routing | None):
        self.provider = provider
        super().__init__(model, cache, provider, routing)

    def capture(self) -> None:
        model, cache = self.model, self.cache
        windows = {layer.self_attn.spec.sliding_window for layer in model.model.layers}

        def prologue():
            cache.start_static(self.active)
            self._route_step()
            for window in windows:  # built once here, reused by every layer's graph
                cache.mask(1, window)
            return model.embed(self.tokens[:, None], self.positions[:, None])

        self.prologue = capture(prologue)
        # The tensors the prologue allocates inside its graph (where the recorder writes, the masks, the
        # emulated ids) hold nothing until it runs, and each piece's warm-up reads them: a warm-up would
        # write recorded ids at position 0 over the prompt's.
        self.prologue.graph.replay()
        x, rope = self.prologue.outputs
        self.pieces = []
        for layer in model.model.layers:
            if isinstance(layer.mlp, SparseMoeBlock):
                piece = capture(lambda layer=layer, x=x: layer.before_experts(x, rope, cache))
                x = torch.empty_like(x)  # the eager part writes the layer's output here
                self.pieces.append((piece, layer, x))
            else:
                piece = capture(lambda layer=layer, x=x: layer(x, rope, cache))
                x = piece.outputs
                self.pieces.append((piece, None, None))
        self.epilogue = capture(lambda: model.head(x[:, -1]))
        self.logits = self.epilogue.outputs
        # The step's routing tensors as captured: the eager expert part (the predictor) reads these.
        self.routing_view = self.routing.view() if self.routing else None

    def replay(self) -> None:
        if self.routing:
            self.routing.resume(self.routing_view)
        self.prologue.graph.replay()
        for piece, layer, out in self.pieces:
            piece.graph.replay()
            if layer is not None:
                x1, xn, weights, ids, shared = piece.outputs
                routed = self.provider.forward(layer.mlp.layer_idx, xn, ids, weights)
                layer.after_experts(x1, routed, shared, out=out)
        self.epilogue.graph.replay()


class Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, outputs):
        self.graph, self.outputs = graph, outputs


def capture(fn) -> Captured:
    """Capture fn() as a CUDA graph after one warm-up run on a side stream (lazy initialisation of
    libraries must not happen inside a capture). The warm-up's writes are redone by every replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return Captured(graph, outputs)
