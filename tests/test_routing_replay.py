"""Offline cache replay: hand-counted hits for LRU, LFU and Belady (token-batched steps, waves, Counter
ties), Belady as the upper bound, the same counts as the engine's TieredExpertStore on random streams,
and the locality statistics on a hand-made trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiermoe.errors import InvalidRequestError
from tiermoe.formats.dense import DenseFormat
from tiermoe.offload.budget import MemoryPlan
from tiermoe.offload.sources import SyntheticExperts
from tiermoe.offload.store import TieredExpertStore
from tiermoe.routing.replay import locality, replay
from tiermoe.routing.trace import Trace


def trace_of(steps: list[list[tuple]], num_experts: int = 8, layer: int = 0) -> Trace:
    """One MoE layer; steps[i] lists the (seq, token, prefill, experts) rows routed in engine step i."""
    cols = [(s, t, layer, p, i, ex) for i, rows in enumerate(steps) for s, t, p, ex in rows]
    seq, token, layers, prefill, step, experts = zip(*cols, strict=True)
    return Trace.build(seq, token, layers, prefill, step, experts, num_experts)


def decode_stream(experts: list[list[int]]) -> Trace:
    """One sequence decoding one token per step."""
    return trace_of([[(0, t, False, ex)] for t, ex in enumerate(experts)])


def counts(trace: Trace, slots, policy: str) -> tuple[int, int]:
    r = replay(trace, slots, policy)
    return r.hits, r.misses


def test_lru_and_belady_differ_on_a_cyclic_stream():
    # 2 slots, experts 0 1 2 0 1. LRU: each expert was evicted just before its return, 0 hits.
    # Belady at expert 2 evicts 1 (next used at step 4) rather than 0 (step 3), then hits on 0.
    # LFU: counts tie at 1, the lowest slot goes: 2 evicts 0, 0 evicts 2, so 1 survives and hits.
    trace = decode_stream([[0], [1], [2], [0], [1]])
    assert counts(trace, 2, "lru") == (0, 5)
    assert counts(trace, 2, "belady") == (1, 4)
    assert counts(trace, 2, "lfu") == (1, 4)


def test_lfu_keeps_the_frequent_expert_where_lru_keeps_the_recent_one():
    # 2 slots, 0 0 1 2 1. LRU at 2 evicts 0 (least recent), then hits on 1: 2 hits.
    # LFU at 2 evicts 1 (count 1 against 0's 2), then misses 1: 1 hit. Belady evicts 0 (never used again).
    trace = decode_stream([[0], [0], [1], [2], [1]])
    assert counts(trace, 2, "lru") == (2, 3)
    assert counts(trace, 2, "lfu") == (1, 4)
    assert counts(trace, 2, "belady") == (2, 3)


def test_a_step_of_several_tokens_runs_in_waves_most_routed_first():
    # k 2, 2 slots. Step 0 prefills 3 tokens routing 3 1 | 1 2 | 2 1: Counter order 1 (3x), 2 (2x), 3;
    # wave [1, 2] loads both, wave [3] evicts the least recent, 1: 3 misses, cache {2, 3}.
    # Step 1 routes 1 2: 2 resident first, hit; 1 evicts 3.  Step 2 routes 3 2: 2 hits; 3 evicts 1.
    trace = trace_of(
        [
            [(0, 0, True, [3, 1]), (0, 1, True, [1, 2]), (0, 2, True, [2, 1])],
            [(0, 3, False, [1, 2])],
            [(0, 4, False, [3, 2])],
        ]
    )
    r = replay(trace, 2, "lru")
    assert (r.hits, r.misses) == (2, 5)
    assert (r.layers[0].decode.hits, r.layers[0].decode.misses) == (2, 2)
    assert r.hit_rate == pytest.approx(2 / 7) and r.decode_hit_rate == pytest.approx(0.5)
    # Belady at step 0's wave [3] evicts 1 too (next used at step 1, 2 also at step 1: the lowest slot).
    assert counts(trace, 2, "belady") == (2, 5)


def test_counter_ties_break_by_first_routed_in_batch_row_order():
    # Two sequences in one step route 5 6 and 6 5: a tie, 5 first (seq 0 is the first batch row). With one
    # slot, 5 loads and 6 evicts it; the next step's 6 then hits. Had 6 gone first, it would miss.
    first = [(0, 0, False, [5, 6]), (1, 0, False, [6, 5])]
    trace = trace_of([first, [(0, 1, False, [6, 7])]])
    assert counts(trace, 1, "lru") == (1, 3)
    swapped = trace_of([[(0, 0, False, [6, 5]), (1, 0, False, [5, 6])], [(0, 1, False, [6, 7])]])
    assert counts(swapped, 1, "lru") == (0, 4)


def test_slots_per_layer_differ_by_layer_and_bad_arguments_fail_clearly():
    a = trace_of([[(0, t, False, [e])] for t, e in enumerate([0, 1, 0, 1])], layer=3)
    b = trace_of([[(0, t, False, [e])] for t, e in enumerate([0, 1, 0, 1])], layer=5)
    both = Trace.build(*(np.concatenate([getattr(a, c), getattr(b, c)]) for c in
                         ("seq", "token", "layer", "prefill", "step", "experts")), num_experts=8)  # fmt: skip
    r = replay(both, {3: 1, 5: 2}, "lru")
    assert {ly: (f.all.hits, f.all.misses) for ly, f in r.layers.items()} == {3: (0, 4), 5: (2, 2)}
    assert r.to_dict()["layers"]["5"] == {
        "slots": 2, "hits": 2, "misses": 2, "hit_rate": 0.5, "decode": {"hits": 2, "misses": 2, "hit_rate": 0.5}
    }  # fmt: skip
    with pytest.raises(InvalidRequestError, match="layers \\[5\\]"):
        replay(both, {3: 1}, "lru")
    with pytest.raises(InvalidRequestError, match="at least one"):
        replay(both, 0, "lru")
    with pytest.raises(InvalidRequestError, match="unknown cache policy 'fifo'"):
        replay(both, 2, "fifo")


def random_trace(seed: int, steps: int = 60, layers=(1, 2), num_experts: int = 16, k: int = 3) -> Trace:
    """Batches of 1-3 sequences: a prefill step of 1-5 tokens per row, then decode steps; experts drawn
    from a small drifting hot set so that caches see both hits and misses."""
    rng = np.random.default_rng(seed)
    cols, step, seq = [], 0, 0
    while step < steps:
        batch, prompt, gen = rng.integers(1, 4), rng.integers(1, 6), rng.integers(1, 8)
        docs = range(seq, seq + batch)
        seq += batch
        for span in [range(prompt)] + [[prompt + i] for i in range(gen)]:
            for layer in layers:
                hot = rng.permutation(num_experts)[: k + 3]
                for d in docs:
                    for t in span:
                        cols.append((d, t, layer, t < prompt, step, rng.choice(hot, k, replace=False)))
            step += 1
    return Trace.build(*zip(*cols, strict=True), num_experts=num_experts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_belady_is_the_upper_bound(seed):
    trace = random_trace(seed)
    for slots in (3, 5, 8):
        best = replay(trace, slots, "belady").hits
        others = {p: replay(trace, slots, p).hits for p in ("lru", "lfu", "lru-protect")}
        assert all(best >= h for h in others.values()), (slots, best, others)
    # With a slot for every expert only first uses miss, whatever the policy.
    first_uses = sum(len(np.unique(trace.experts[trace.layer == layer])) for layer in trace.layers)
    assert {replay(trace, 16, p).misses for p in ("lru", "lfu", "belady")} == {first_uses}


def engine_counts(trace: Trace, slots: int, policy: str) -> tuple[int, int]:
    """GPU hits and misses of the engine's own TieredExpertStore (CPU, prefetch off) fed the trace's
    routing step by step: each step's rows of a layer become the ids [T, k] the MoE block hands it."""
    hidden, inter, k = 4, 2, trace.top_k
    quotas = dict.fromkeys(trace.layers, slots)
    total = len(quotas) * trace.num_experts
    fmt = DenseFormat(hidden, inter, torch.float32)
    plan = MemoryPlan(0, 0, 0, fmt.nbytes, total, sum(quotas.values()), quotas, host_slots=total)
    source = SyntheticExperts(0, 0.02, fmt, torch.device("cpu"))
    store = TieredExpertStore(
        source,
        plan,
        fmt,
        trace.num_experts,
        torch.device("cpu"),
        policy,
        prefetch=False,
    )
    order = np.lexsort((trace.token, trace.seq, trace.layer, trace.step))  # engine order: batch row, token
    for step in np.unique(trace.step):
        for layer in trace.layers:
            rows = order[(trace.step[order] == step) & (trace.layer[order] == layer)]
            if len(rows):
                ids = torch.as_tensor(trace.experts[rows])  # [T, k]
                x = torch.randn(len(rows), hidden)  # [T, H]
                store.forward(layer, x, ids, torch.full((len(rows), k), 1.0 / k))
    s = store.stats_
    return s.gpu_hits, s.gpu_misses


@pytest.mark.parametrize("policy", ["lru", "lfu", "lru-protect"])
def test_replay_counts_what_the_engine_store_counts(policy):
    trace = random_trace(7, steps=40)
    for slots in (2, 4, 7):  # 2 < k: every step runs in waves; 4 and 7: prefill steps do
        assert counts(trace, slots, policy) == engine_counts(trace, slots, policy), slots


def test_locality_overlap_and_reuse_by_hand():
    # Layer 0, seq 0: a prompt token [5 6], then decode 0 1 | 1 2 | 3 4 | 0 3.
    #   overlap of decode tokens 2-4: 1/2, 0, 1/2; reuse within 8: 1/2, 0, 1 (0 from token 1, 3 from 3).
    # Layer 1: seq 0 decodes 0 1 | 0 1 (overlap 1, reuse 1); seq 1 decodes 2 3 | 3 2 | 2 5 (1 and 1/2 each);
    #   seq 1's first token is not compared with seq 0's last.
    rows = [(0, 0, 0, True, [5, 6])]
    rows += [(0, t + 1, 0, False, ex) for t, ex in enumerate([[0, 1], [1, 2], [3, 4], [0, 3]])]
    rows += [(0, t, 1, False, ex) for t, ex in enumerate([[0, 1], [0, 1]])]
    rows += [(1, t, 1, False, ex) for t, ex in enumerate([[2, 3], [3, 2], [2, 5]])]
    seq, token, layer, prefill, experts = zip(*rows, strict=True)
    trace = Trace.build(seq, token, layer, prefill, token, experts, num_experts=8)
    loc = locality(trace)
    assert (loc.layers[0].tokens, loc.layers[1].tokens, loc.overall.tokens) == (3, 3, 6)
    assert loc.layers[0].overlap == pytest.approx(1 / 3) and loc.layers[0].reuse == pytest.approx(1 / 2)
    assert loc.layers[1].overlap == pytest.approx(5 / 6) and loc.layers[1].reuse == pytest.approx(5 / 6)
    assert loc.overall.overlap == pytest.approx(3.5 / 6) and loc.overall.reuse == pytest.approx(4 / 6)
    assert locality(trace, window=1).layers[0].reuse == pytest.approx(1 / 3)  # window 1 is the overlap
    # With the prompt token counted, decode token 1 gets a predecessor sharing nothing.
    with_prefill = locality(trace, include_prefill=True).layers[0]
    assert with_prefill.tokens == 4
    assert with_prefill.overlap == pytest.approx(1 / 4) and with_prefill.reuse == pytest.approx(1.5 / 4)
    assert loc.to_dict()["tokens"] == "decode" and loc.to_dict()["layers"]["1"]["tokens"] == 3
