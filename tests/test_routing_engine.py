"""Routing overrides and traces through the whole engine on CPU: recorded routing replays to the same
tokens, the store's hit counters equal the offline replay of the same stream, batches and seeds behave,
the emulated predictor has its stated accuracy, and bad values are one clear error."""

from __future__ import annotations

import numpy as np
import pytest

from tiermoe import LLM, SamplingParams
from tiermoe.cli import main
from tiermoe.errors import InvalidRequestError
from tiermoe.offload.budget import GIB
from tiermoe.routing.replay import replay
from tiermoe.routing.trace import load_trace

PROMPT = [5, 17, 42, 99, 7, 11, 120, 64, 3, 200]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    return path


def tiered(path, slots: int, **kw) -> LLM:
    """A store with exactly `slots` GPU slots per MoE layer (the budget is computed from the plan)."""
    plan = LLM(path, device="cpu").plan
    layers = 4
    budget = (plan.dense_bytes + plan.kv_bytes + layers * slots * plan.expert_bytes) / GIB
    return LLM(path, device="cpu", gpu_budget_gib=budget, **kw)


@pytest.mark.parametrize("suffix", [".npz", ".txt.gz"])
def test_recorded_trace_replays_to_identical_routing_and_tokens(checkpoint, tmp_path, suffix):
    path = tmp_path / f"natural{suffix}"
    recorded = LLM(checkpoint, device="cpu", record_routing=str(path))
    assert recorded.routing_mode == "natural"
    expected = recorded.generate(PROMPT, GREEDY)[0].token_ids
    trace = load_trace(path)
    # every routed token of every MoE layer: 10 prompt + 15 decoded tokens (the last one is never fed back)
    assert len(trace) == (len(PROMPT) + 15) * 4 and trace.prefill.sum() == len(PROMPT) * 4
    replayed = LLM(
        checkpoint, device="cpu", routing=f"trace:{path}", record_routing=str(tmp_path / "again.npz")
    )
    assert replayed.routing_mode == "trace"
    assert replayed.generate(PROMPT, GREEDY)[0].token_ids == expected
    again = load_trace(tmp_path / "again.npz")
    assert np.array_equal(again.experts, trace.experts) and np.array_equal(again.token, trace.token)


def test_a_teacher_forced_prefill_as_decode_routes_as_decoding_did(checkpoint, tmp_path):
    decoded, forced = tmp_path / "decoded.npz", tmp_path / "forced.npz"
    tokens = (
        LLM(checkpoint, device="cpu", record_routing=str(decoded)).generate(PROMPT[:1], GREEDY)[0].token_ids
    )
    # The same 16 positions in one prefill, as tiermoe eval routes a window of text.
    LLM(checkpoint, device="cpu", record_routing=str(forced)).generate(
        PROMPT[:1] + tokens[:-1], SamplingParams(max_tokens=1)
    )
    a, b = load_trace(decoded).as_decode(), load_trace(forced).as_decode()
    assert len(set(load_trace(forced).step.tolist())) == 1 and b.step.max() == 15 and not b.prefill.any()
    for column in ("seq", "token", "layer", "step"):
        assert np.array_equal(
            getattr(a, column) - getattr(a, column).min(), getattr(b, column) - getattr(b, column).min()
        )
    assert np.array_equal(np.sort(a.experts, axis=1), np.sort(b.experts, axis=1))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("routing", ["szd", "uniform"])
def test_store_hit_counters_equal_offline_replay(checkpoint, tmp_path, policy, routing):
    path = tmp_path / "trace.npz"
    llm = tiered(checkpoint, slots=3, routing=routing, record_routing=str(path), eviction=policy)
    hits = misses = 0
    for i in range(3):  # the cache carries over from run to run, as it does offline
        # Equal lengths: the store also admits the experts of left-padding tokens, which a trace omits.
        prompts = [PROMPT[i:], PROMPT[: len(PROMPT) - i]]
        stats = llm.generate(prompts, GREEDY)[0].stats.experts
        hits, misses = hits + stats["gpu_hits"], misses + stats["gpu_misses"]
    offline = replay(load_trace(path), 3, policy)
    assert (offline.hits, offline.misses) == (hits, misses)
    assert 0 < hits < misses + hits


def test_override_at_batch_size_two_routes_each_row_as_alone(checkpoint, tmp_path):
    batch = LLM(checkpoint, device="cpu", routing="szd", record_routing=str(tmp_path / "b.npz"))
    alone = LLM(checkpoint, device="cpu", routing="szd", record_routing=str(tmp_path / "a.npz"))
    batch.generate([PROMPT, PROMPT[:6]], GREEDY)
    alone.generate(PROMPT, GREEDY)
    b, a = load_trace(tmp_path / "b.npz"), load_trace(tmp_path / "a.npz")
    rows = b.seq == 0
    order = np.lexsort((b.layer[rows], b.token[rows]))
    mine = np.lexsort((a.layer, a.token))
    assert np.array_equal(b.experts[rows][order], a.experts[mine])
    assert set(b.seq.tolist()) == {0, 1}


def test_routing_seed_changes_routing_and_repeats(checkpoint):
    def tokens(seed: int) -> list[int]:
        llm = LLM(checkpoint, device="cpu", routing="uniform", routing_seed=seed)
        return llm.generate(PROMPT, GREEDY)[0].token_ids

    assert tokens(0) == tokens(0)
    assert tokens(0) != tokens(1)


@pytest.mark.parametrize("accuracy", [1.0, 0.5])
def test_emulated_predictor_has_its_stated_accuracy(checkpoint, accuracy):
    llm = tiered(checkpoint, slots=4, routing="szd", prefetch=True, prefetch_accuracy=accuracy)
    stats = llm.generate(PROMPT[:1], SamplingParams(max_tokens=120, ignore_eos=True))[0].stats.experts_decode
    # batch 1, one token a step: the predicted set has k experts, of which `accuracy` are the true ones
    assert stats["prefetch_precision"] == pytest.approx(accuracy, abs=0.08)
    assert stats["prefetch_recall"] == pytest.approx(accuracy, abs=0.08)


def test_decode_statistics_exclude_prefill(checkpoint):
    llm = tiered(checkpoint, slots=2, routing="uniform")
    stats = llm.generate(PROMPT, GREEDY)[0].stats
    whole, decode = stats.experts, stats.experts_decode
    assert 0 < decode["gpu_misses"] < whole["gpu_misses"]
    assert decode["gpu_hits"] + decode["gpu_misses"] == 15 * 4 * 2  # 15 decode tokens x 4 layers x top-2
    assert decode["bytes_h2d"] == decode["gpu_misses"] * llm.plan.expert_bytes


def test_bad_routing_is_one_clear_error(checkpoint, tmp_path, capsys):
    with pytest.raises(InvalidRequestError, match="unknown"):
        LLM(checkpoint, device="cpu", routing="zipf")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a trace")
    base = ["generate", "--model", str(checkpoint), "--device", "cpu", "--prompt", "hi", "--max-tokens", "2"]
    for value in (f"trace:{bad}", f"trace:{tmp_path / 'missing.npz'}", "szd:phi=1.5"):
        capsys.readouterr()
        assert main([*base, "--routing", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err


@pytest.mark.parametrize("routing", ["natural", "uniform", "szd"])
def test_prefetch_at_three_slots_a_layer_never_runs_out_of_victims(checkpoint, routing):
    """Batch 2, top-2: a layer's predicted experts can fill all 3 slots; prefetching one more found no
    slot to evict (ValueError in the policy; seen first on the GPU machine's graph-vs-eager test)."""
    llm = tiered(checkpoint, slots=3, routing=routing, prefetch=True)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    out = llm.generate([PROMPT, PROMPT[:4]], params) + llm.generate([PROMPT[2:], PROMPT[:7]], params)
    assert [len(o.token_ids) for o in out] == [40] * 4
    stats = llm.store_stats()
    assert stats["prefetch_issued"] > 0 and stats["gpu_misses"] > 0
