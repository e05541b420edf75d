"""Owns the model on its device: the KV cache, prefill and decode forwards, and CUDA graphs.

A step runs the scheduler's chunks: the sequences decoding one token each as one batch, the prompt
chunks as another (models/kv_cache.py: every row at its own length in its own blocks).

A decode step launches about a thousand small kernels; from Python that costs more than the GPU work
itself (measured: 25 ms of launch overhead against 5 ms of kernels per OLMoE step on an H100). When
the expert provider never synchronises with the host, the whole step is captured once per batch size
and block-table width and replayed (DecodeGraph). When it does (the tiered store decides per layer which
experts to move), each layer's dense part (attention, norms, router, shared expert) is its own graph
and only the routed experts run eagerly in between (LayeredDecodeGraph)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import MoEArgs
from ..models.kv_cache import BLOCK_TOKENS, KVBatch, KVCache, cache_slots, slots, slots_of
from ..models.layers import CausalLM
from ..models.moe import SparseMoeBlock
from ..offload.provider import ExpertProvider
from ..routing.hook import Routing
from .scheduler import Chunk

MIN_BLOCKS = 16  # a decode graph's block tables round up to powers of two from here (256 tokens)


@dataclass(frozen=True)
class Row:
    """One row of a forward: `tokens` of a sequence from position `start`, its KV blocks, its state row."""

    tokens: list[int]
    start: int
    blocks: list[int]
    state_row: int

    @classmethod
    def of(cls, chunk: Chunk) -> Row:
        r = chunk.request
        return cls(
            [r.token(i) for i in range(chunk.start, chunk.start + chunk.count)], chunk.start, r.blocks, r.slot
        )


@dataclass
class StepInputs:
    """A forward's inputs on the device, views of one packed tensor [B, 3T + NB + 3] (one copy a step):
    token ids, positions, KV slots (T each), block table (NB), then length, token count and state row."""

    ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    counts: torch.Tensor  # [B]: real tokens of each row (rows are right-padded; padding rows 0)
    rows: torch.Tensor  # [B]: state rows (routing)
    kv: KVBatch

    # Derived in the forward, not when unpacking: inside a graph capture they must be recomputed from
    # the static buffer on every replay.
    def valid(self) -> torch.Tensor:
        """[B, T] bool: the real tokens."""
        return torch.arange(self.ids.shape[1], device=self.ids.device)[None, :] < self.counts[:, None]

    def logits_at(self) -> torch.Tensor:
        """[B]: each row's last real token."""
        return (self.counts - 1).clamp(min=0)

    @staticmethod
    def pack(rows: list[Row], batch: int, width: int, blocks: int, pad_row: int) -> torch.Tensor:
        """The host tensor of `rows`, padded to `batch` rows of `width` tokens and `blocks` blocks."""
        t = width
        packed = torch.zeros(batch, 3 * t + blocks + 3, dtype=torch.long)
        packed[:, -1] = pad_row
        for b, row in enumerate(rows):
            n = len(row.tokens)
            positions = torch.arange(row.start, row.start + n)
            table = torch.tensor(row.blocks, dtype=torch.long)
            packed[b, :n] = torch.tensor(row.tokens)
            packed[b, t : t + n] = positions
            packed[b, 2 * t : 2 * t + n] = slots(table, positions)
            packed[b, 3 * t : 3 * t + len(row.blocks)] = table
            packed[b, -3:] = torch.tensor([row.start + n, n, row.state_row])
        return packed

    @classmethod
    def unpack(cls, packed: torch.Tensor, width: int) -> StepInputs:
        t = width
        ids, positions, slots = packed[:, :t], packed[:, t : 2 * t], packed[:, 2 * t : 3 * t]
        lengths, counts, rows = packed[:, -3], packed[:, -2], packed[:, -1]
        return cls(ids, positions, counts, rows, KVBatch(packed[:, 3 * t : -3], slots, positions, lengths))


def decode_rows(n: int) -> int:
    """The batch a decode graph is captured for: 1, 2, 4, then multiples of 8 (few graphs, little padding;
    a padding row still routes to experts)."""
    return 1 << (n - 1).bit_length() if n <= 4 else -(-n // 8) * 8


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
        max_num_seqs: int = 16,
    ):
        self.model, self.args, self.device, self.dtype = model, args, device, dtype
        # The memory plan's KV reserve, in tokens over every running sequence (whole blocks, and the null
        # block, as the plan counts them).
        self.kv_tokens = kv_tokens or max_model_len
        num_blocks = cache_slots(self.kv_tokens) // BLOCK_TOKENS
        self.kv = KVCache(model.cache_shapes(), num_blocks, dtype, device)
        self.routing = routing
        self.prefill_chunk, self.max_num_seqs = prefill_chunk, max_num_seqs
        self.graphs = graphs and device.type == "cuda"
        self.provider = provider
        if routing:
            routing.open(max_num_seqs, cache_slots(self.kv_tokens))
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        # One memory pool for every captured graph: each (batch, blocks) shape stays captured, and with a
        # pool of its own each would keep its KV gather and activations, their sum growing past the
        # plan's workspace as a sweep or a server meets new shapes. Shared, the pool is as large as the
        # largest shape. Safe because replays never overlap and a step's outputs (its logits, a piece's
        # routed ids) are consumed, in stream order, before another graph's replay can overwrite them;
        # what a graph keeps across replays (its gather index, masks) its prologue rewrites each replay.
        self.graph_pool = torch.cuda.graph_pool_handle() if self.graphs else None
        # Rows of the last decode forward, padding included: the provider's after_step counts what they
        # routed (a padding row's experts are read too).
        self.decoded_rows = 0

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run a step's chunks: the one-token ones (decode) as one batch, under a CUDA graph where the
        provider allows, the longer ones (prompt chunks) as another. Returns the logits at each chunk's
        last token, [len(chunks), V] float32 in chunk order."""
        decode = [i for i, c in enumerate(chunks) if c.count == 1]
        prefill = [i for i, c in enumerate(chunks) if c.count > 1]
        if not prefill:  # the common step: no index tensors to build
            return self._decode([Row.of(c) for c in chunks])[: len(chunks)]
        out = torch.empty(len(chunks), self.args.vocab_size, device=self.device)
        rows = [Row.of(chunks[i]) for i in prefill]
        width, blocks = max(len(r.tokens) for r in rows), max(len(r.blocks) for r in rows)
        out[prefill] = self._eager(rows, len(rows), width, blocks, logits=True)
        if decode:
            rows = [Row.of(chunks[i]) for i in decode]
            out[decode] = self._decode(rows)[: len(rows)]
        return out

    def _eager(self, rows: list[Row], batch: int, width: int, blocks: int, logits: bool) -> torch.Tensor:
        packed = StepInputs.pack(rows, batch, width, blocks, self.max_num_seqs).to(self.device)
        return self.forward(StepInputs.unpack(packed, width), logits_at_last=logits)

    def forward(self, inputs: StepInputs, logits_at_last: bool = True) -> torch.Tensor:
        self.begin(inputs)
        at = inputs.logits_at() if logits_at_last else None
        return self.model(inputs.ids, inputs.positions, self.kv, at)

    def begin(self, inputs: StepInputs) -> None:
        """Bind the forward's rows to the KV cache and announce its step to the routing."""
        self.kv.bind(inputs.kv)
        if self.routing:
            self.routing.begin_step(inputs.rows, inputs.positions, inputs.valid(), inputs.kv.slots)

    def _decode(self, rows: list[Row]) -> torch.Tensor:
        batch = decode_rows(len(rows))
        blocks = max(MIN_BLOCKS, 1 << (max(len(r.blocks) for r in rows) - 1).bit_length())
        blocks = min(blocks, self.num_blocks)
        if not self.graphs:
            self.decoded_rows = len(rows)
            return self._eager(rows, len(rows), 1, blocks, logits=True)
        packed = StepInputs.pack(rows, batch, 1, blocks, self.max_num_seqs)
        graph = self._graphs.get((batch, blocks))
        if graph is None:
            kind = DecodeGraph if self.provider.graph_safe(batch) else LayeredDecodeGraph
            graph = self._graphs[(batch, blocks)] = kind(self, packed)
        self.decoded_rows = batch
        return graph.run(packed, len(rows))

    @torch.inference_mode()
    def logprobs(self, ids: list[int], blocks: list[int], chunk: int = 512, top: int = 0):
        """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1 (float32 [len - 1]) and, with top > 0, the
        `top` likeliest next tokens at each of those positions (ids and log-probabilities, [len - 1, top]):
        one sequence in `blocks` (enough for all of ids), `chunk` tokens a forward (their logits,
        [chunk, vocab] float32, are the peak memory, once). Its routing state is the padding row's."""
        doc = self.routing.begin_sequence(self.max_num_seqs) if self.routing else 0
        chosen, top_ids, top_values = [], [], []
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            logits = self._eager(
                [Row(piece, start, blocks, self.max_num_seqs)], 1, len(piece), len(blocks), False
            )
            targets = torch.tensor(ids[start + 1 : start + 1 + len(piece)], device=self.device)  # next tokens
            # log-probabilities as logits less their log-sum-exp, picked before subtracting, and the
            # log-sum-exp (whose exp makes a copy of its input) taken 64 rows at a time: no second
            # [chunk, vocab] float32 tensor (311 MB a 512-token chunk of Qwen3's vocabulary)
            scores = logits[0, : len(targets)].float()
            norm = torch.cat([torch.logsumexp(rows, dim=-1, keepdim=True) for rows in scores.split(64)])
            chosen.append((scores.gather(-1, targets[:, None]) - norm)[:, 0])
            if top:
                best = torch.topk(scores, top, dim=-1)
                top_ids.append(best.indices)
                top_values.append(best.values - norm)
        if self.routing:
            self.routing.end_sequence(doc, len(ids), slots_of(blocks, len(ids)))
        if not top:
            return torch.cat(chosen)
        return torch.cat(chosen), torch.cat(top_ids), torch.cat(top_values)


class DecodeGraph:
    """One captured decode step for a batch size and block-table width; each replay's inputs are copied
    into one static packed buffer."""

    def __init__(self, runner: ModelRunner, packed: torch.Tensor):
        self.runner, self.model, self.routing = runner, runner.model, runner.routing
        self.packed = packed.to(runner.device)
        self.inputs = StepInputs.unpack(self.packed, 1)
        # Captured with the first step's inputs in place, so the capture's warm-up run writes (KV cache,
        # recorded routing) exactly where that step's replay will overwrite them. Routing state the warm-up
        # advances is put back, so the first replay routes exactly as an eager step would.
        saved = [t.clone() for t in self.routing.state()] if self.routing else []
        self.capture()
        for t, value in zip(self.routing.state() if self.routing else [], saved, strict=True):
            t.copy_(value)

    def capture(self) -> None:
        self.graph = capture(lambda: self.runner.forward(self.inputs), self.runner.graph_pool)
        self.logits = self.graph.outputs

    def run(self, packed: torch.Tensor, rows: int) -> torch.Tensor:
        """Replay with `packed` in place; rows: the real ones (the rest are padding)."""
        self.packed.copy_(packed)
        self.replay(rows)
        return self.logits

    def replay(self, rows: int) -> None:
        self.graph.graph.replay()


class LayeredDecodeGraph(DecodeGraph):
    """Per-layer graphs of the dense work; the provider runs the routed experts eagerly between them."""

    def capture(self) -> None:
        model, cache, inputs = self.model, self.runner.kv, self.inputs
        windows = {layer.self_attn.spec.sliding_window for layer in model.model.layers}
        # The runner's one pool for all the pieces, replayed in the order they are captured: what a layer's
        # piece frees (its gathered keys and values) serves the next, instead of each piece's own pool
        # keeping a copy of the whole KV gather.
        pool = self.runner.graph_pool

        def prologue():
            self.runner.begin(inputs)
            for window in windows:  # built once here, reused by every layer's graph
                cache.mask(window)
            return model.embed(inputs.ids, inputs.positions)

        self.prologue = capture(prologue, pool)
        # Held here: an eager forward rebinds the cache's gather index and masks, and the pool must not
        # hand their memory to anything else while these graphs read it.
        self.held = (cache._gather, dict(cache._masks))
        # The tensors the prologue allocates inside its graph (the gather index, the masks, the routed
        # ids) hold nothing until it runs, and each piece's warm-up reads them.
        self.prologue.graph.replay()
        x, rope = self.prologue.outputs
        self.pieces = []
        for layer in model.model.layers:
            if isinstance(layer.mlp, SparseMoeBlock):
                piece = capture(lambda layer=layer, x=x: layer.before_experts(x, rope, cache), pool)
                x = torch.empty_like(x)  # the eager part writes the layer's output here
                self.pieces.append((piece, layer, x))
            else:
                piece = capture(lambda layer=layer, x=x: layer(x, rope, cache), pool)
                x = piece.outputs
                self.pieces.append((piece, None, None))
        self.epilogue = capture(lambda: model.head(x[:, -1]), pool)
        self.logits = self.epilogue.outputs
        # The step's routing tensors as captured: the eager expert part (the predictor) reads these.
        self.routing_view = self.routing.view() if self.routing else None

    def replay(self, rows: int) -> None:
        if self.routing:
            self.routing.resume(self.routing_view)
        self.prologue.graph.replay()
        provider = self.runner.provider
        for piece, layer, out in self.pieces:
            piece.graph.replay()
            if layer is not None:
                x1, xn, weights, ids, shared = piece.outputs  # [B, 1, H], [B, H], [B, k], [B, k], ...
                # Only the real rows reach the store: a padding row's experts would be fetched and counted.
                routed = provider.forward(layer.mlp.layer_idx, xn[:rows], ids[:rows], weights[:rows])
                if rows < xn.shape[0]:
                    routed = torch.cat([routed, routed.new_zeros(xn.shape[0] - rows, routed.shape[1])])
                layer.after_experts(x1, routed, shared, out=out)
        self.epilogue.graph.replay()


class Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, outputs):
        self.graph, self.outputs = graph, outputs


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def warmup_stream() -> torch.cuda.Stream:
    """The one side stream every capture's warm-up runs on (per device). cuBLAS keeps a workspace (32 MiB on
    an H100) for each stream it ran on, and torch.cuda.Stream() hands out a pool of 32 in turn: the copy
    path's layered graphs, some fifty captures, held 32 of them, 1 GiB past the plan (bench/NOTES.md 50)."""
    device = torch.cuda.current_device()
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream()
    return _WARMUP_STREAMS[device]


def capture(fn, pool=None) -> Captured:
    """Capture fn() as a CUDA graph after one warm-up run on a side stream (lazy initialisation of
    libraries must not happen inside a capture). The warm-up's writes are redone by every replay.
    pool: a memory pool shared with other graphs replayed in capture order (None: its own)."""
    stream = warmup_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return Captured(graph, outputs)
