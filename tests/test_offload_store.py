"""The tiered store on CPU: a budget far below the model gives exactly the all-resident tokens, every
tier path is taken, budgets hold, bad files and budgets fail clearly."""

from __future__ import annotations

import shutil

import pytest
import torch

from tiermoe import LLM, SamplingParams
from tiermoe.errors import BudgetError, CheckpointError, InvalidRequestError
from tiermoe.offload.budget import GIB
from tiermoe.offload.in_place import admits
from tiermoe.offload.store import TieredExpertStore

from .conftest import prompt_logits

PROMPT = [5, 17, 42, 99, 7, 11, 120, 64, 3, 200, 31, 8]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    resident = LLM(path, device="cpu")
    return path, resident


def budget_for(resident: LLM, slots_per_layer: int) -> float:
    """A GPU budget in GiB that leaves exactly slots_per_layer expert slots per MoE layer."""
    plan = resident.plan
    layers = len(resident.args.moe_layers)
    return (plan.dense_bytes + plan.kv_bytes + layers * slots_per_layer * plan.expert_bytes) / GIB


def tiered(path, resident, slots=2, host=None, **kw) -> LLM:
    host_gib = None if host is None else host * resident.plan.expert_bytes / GIB
    return LLM(path, device="cpu", gpu_budget_gib=budget_for(resident, slots), cpu_budget_gib=host_gib, **kw)


def test_small_budget_gives_identical_tokens_and_logits(model):
    path, resident = model
    llm = tiered(path, resident, slots=2)
    assert isinstance(llm.provider, TieredExpertStore)
    assert len(llm.provider.pool) == 2 * 4  # 8 of the 32 experts fit
    expected = resident.generate(PROMPT, GREEDY)[0]
    got = llm.generate(PROMPT, GREEDY)[0]
    assert got.token_ids == expected.token_ids
    # One token runs the same kernels on the same weights in both: its logits are bit-identical.
    logits = [prompt_logits(x, [PROMPT[:1]]) for x in (resident, llm)]
    assert torch.equal(logits[0], logits[1])


def test_every_tier_is_used_and_counted(model):
    path, resident = model
    llm = tiered(
        path, resident, slots=2, host=12, prefetch=True
    )  # host cache holds 12 of 32 experts: the rest come from disk
    out = llm.generate(PROMPT, GREEDY)[0]
    assert out.token_ids == resident.generate(PROMPT, GREEDY)[0].token_ids
    s = out.stats.experts
    expert_bytes = resident.plan.expert_bytes
    assert s["gpu_hits"] + s["prefetch_hits"] > 0 and s["gpu_misses"] > 0
    assert s["host_hits"] > 0 and s["host_misses"] > 0
    assert s["bytes_disk"] == s["host_misses"] * expert_bytes and s["disk_s"] > 0
    assert s["bytes_h2d"] == (s["gpu_misses"] + s["prefetch_issued"]) * expert_bytes
    assert 0 < s["gpu_hit_rate"] < 1
    assert s["host_slots"] == 12 and s["gpu_slots"] == 8 and s["layer_slots_min"] == 2  # 4 layers x 2


def test_pool_stays_within_budget(model):
    path, resident = model
    llm = tiered(path, resident, slots=3, host=10)
    llm.generate(PROMPT, GREEDY)
    store = llm.provider
    plan = llm.plan
    assert plan.dense_bytes + plan.kv_bytes + store.pool.nbytes <= budget_for(resident, 3) * GIB + 1
    for part in store.pool.layers.values():
        assert len(part.slots) == 3 and len(part.slot_of) <= 3
        assert all(part.slot_of[part.expert_of[s]] == s for s in part.expert_of)
    assert store.host.nbytes == 10 * plan.expert_bytes
    assert len(store.host.entry_of) <= 10


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_prefill_larger_than_slots_runs_in_waves(model, slots):
    """Waves of half the slots, the next one's copies issued before this one computes (double-buffered;
    with 3 slots a wave of 1 leaves one slot spare)."""
    path, resident = model
    llm = tiered(path, resident, slots=slots)
    prompts = [PROMPT * 4, PROMPT[:5]]  # 48 tokens x top-2 touch most of the 8 experts of each layer
    expected = [o.token_ids for o in resident.generate(prompts, GREEDY)]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected


@pytest.mark.parametrize("policy", ["lru", "lfu", "lru-protect"])
def test_prefetch_and_policies_do_not_change_tokens(model, policy):
    path, resident = model
    expected = resident.generate(PROMPT, GREEDY)[0].token_ids
    on = tiered(path, resident, slots=3, eviction=policy, prefetch=True).generate(PROMPT, GREEDY)[0]
    off = tiered(path, resident, slots=3, eviction=policy, prefetch=False).generate(PROMPT, GREEDY)[0]
    assert on.token_ids == off.token_ids == expected
    s = on.stats.experts
    assert s["prefetch_issued"] > 0 and s["predicted"] > 0
    # every prefetch is used, wasted (evicted unused), or still waiting in its slot at the end
    assert s["prefetch_hits"] + s["prefetch_wasted"] <= s["prefetch_issued"]
    assert s["predicted_correct"] <= min(s["predicted"], s["routed"])
    assert 0 < s["predicted_correct"] < s["predicted"]  # router lookahead on a tiny model: some right
    assert s["prefetch_precision"] == round(s["predicted_correct"] / s["predicted"], 4)
    assert s["prefetch_recall"] == round(s["predicted_correct"] / s["routed"], 4)
    assert off.stats.experts["prefetch_issued"] == 0 and off.stats.experts["prefetch_precision"] is None


@pytest.mark.parametrize("miss_path", ["copy", "in-place"])
def test_fewer_slots_than_top_k_decode_in_waves(tiny_checkpoint, miss_path):
    """Top-4 routing over 2 slots a layer (what DeepSeek-V3 gets at 24 GB): every decode step runs its
    layer in waves of one expert (copy path), or reads what misses in place; the tokens stay the
    resident ones."""
    if miss_path == "in-place":
        pytest.importorskip("triton")
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4, num_experts_per_tok=4)
    resident = LLM(path, device="cpu")
    llm = tiered(path, resident, slots=2, miss_path=miss_path)
    assert all(len(part.slots) == 2 for part in llm.provider.pool.layers.values())
    out = llm.generate(PROMPT, GREEDY)[0]
    assert out.token_ids == resident.generate(PROMPT, GREEDY)[0].token_ids
    d = out.stats.experts_decode
    assert d["gpu_hits"] + d["gpu_misses"] == (len(out.token_ids) - 1) * 4 * 4  # top-4 a layer, 4 layers
    assert d["gpu_misses"] >= (len(out.token_ids) - 1) * 4 * 2  # at least 2 of the 4 miss in every layer


def test_budget_too_small_names_the_minimum(model):
    path, resident = model
    with pytest.raises(BudgetError, match=r"need at least [0-9.e-]+ GiB; raise --gpu-budget"):
        tiered(path, resident, slots=1)  # top-2 routing needs 2 slots per layer


def test_truncated_expert_file_fails_clearly_mid_run(model, tmp_path):
    path, resident = model
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    llm = tiered(copy, resident, slots=2, host=2)  # experts keep coming from disk while generating
    victim = copy / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        llm.generate(PROMPT, GREEDY)


def test_cli_generate_with_budget_prints_expert_stats(model, capsys):
    from tiermoe.cli import main

    path, resident = model
    budget = budget_for(resident, 2)
    rc = main(
        [
            "generate",
            "--model",
            str(path),
            "--device",
            "cpu",
            "--gpu-budget",
            f"{budget + 1e-7:.9f}",
            "--prompt",
            "hello",
            "--max-tokens",
            "5",
            "--ignore-eos",
        ]
    )
    assert rc == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("[length] prompt ") and "completion 5 tok" in line
    assert "experts: GPU hits " in line and "prefetch precision " in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA test_offload_store_gpu.py runs it compiled")
def test_in_place_misses_give_the_resident_tokens_and_admit_after_the_step(model):
    """miss_path in-place (the decode kernels in Triton's interpreter, host memory standing for pinned
    memory): decode reads missed experts where they lie through the address table, admission after each
    step moves them into slots, and the tokens are the all-resident ones."""
    pytest.importorskip("triton")
    path, resident = model
    llm = tiered(path, resident, slots=2, miss_path="in-place")
    store = llm.provider
    assert store.graph_safe(1) and not store.graph_safe(16)  # decode one graph; a prefill the copy path
    expected = resident.generate(PROMPT, GREEDY)[0]
    out = llm.generate(PROMPT, GREEDY)[0]
    assert out.token_ids == expected.token_ids
    s, d = out.stats.experts, out.stats.experts_decode
    assert s["miss_path"] == "in-place"
    steps, layers = len(out.token_ids) - 1, 4  # the first token comes from the prefill
    assert d["gpu_hits"] + d["gpu_misses"] == steps * layers * 2  # top-2 of distinct experts at batch 1
    assert d["gpu_misses"] > 0 and d["gpu_hits"] > 0
    assert d["bytes_in_place"] == d["gpu_misses"] * resident.plan.expert_bytes  # one token: one read each
    # admitted: only misses routed more often lately than the expert they would evict (TinyLFU's test)
    assert 0 < d["bytes_h2d"] < d["gpu_misses"] * resident.plan.expert_bytes
    assert d["bytes_h2d"] % resident.plan.expert_bytes == 0
    batch = [PROMPT, PROMPT[:4]]  # two rows: four pairs a layer, an expert two rows share read twice
    assert [o.token_ids for o in llm.generate(batch, GREEDY)] == [
        o.token_ids for o in resident.generate(batch, GREEDY)
    ]
    assert_table_follows(store)


def assert_table_follows(store) -> None:
    """The in-place table: each layer's resident experts point at their slots, every other expert at its
    host copy; staged, the GPU's slot owners are the host's."""
    in_place = store.in_place
    for layer, row in in_place.row.items():
        part = store.pool.layers[layer]
        for e in range(store.num_experts):
            slot = part.slot_of.get(e)
            expected_addr = (
                in_place.slot_addr[slot] if e in in_place.resident[layer] else in_place.host_addr[row, e]
            )
            assert int(in_place.table[row, e]) == int(expected_addr)
        assert not in_place.staged or in_place.owner[part.slots.start : part.slots.stop].tolist() == [
            part.expert_of.get(slot, -1) for slot in part.slots
        ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA test_offload_store_gpu.py runs it compiled")
def test_staged_misses_are_admitted_as_the_copy_path_admits_them(model):
    """Staged in place, the copy into a victim slot is the admission, made on the GPU: one sequence's
    decode then hits and misses exactly as the copy path's does (the same victims, in the same order), its
    misses cross PCIe once each and nothing more is copied; the table, the owners and the host's view
    agree after every step."""
    pytest.importorskip("triton")
    path, resident = model
    copied = tiered(path, resident, slots=2, prefetch=False)
    staged = tiered(path, resident, slots=2, miss_path="staged")
    expected = resident.generate(PROMPT, GREEDY)[0].token_ids
    runs = {name: llm.generate(PROMPT, GREEDY)[0] for name, llm in (("copied", copied), ("staged", staged))}
    assert runs["copied"].token_ids == runs["staged"].token_ids == expected
    c, d = runs["copied"].stats.experts_decode, runs["staged"].stats.experts_decode
    assert (d["gpu_hits"], d["gpu_misses"]) == (c["gpu_hits"], c["gpu_misses"]) and d["gpu_hits"] > 0
    assert d["bytes_in_place"] == c["bytes_h2d"] == c["gpu_misses"] * resident.plan.expert_bytes
    assert d["bytes_h2d"] == 0
    assert_table_follows(staged.provider)
    assert_slots_hold_their_experts(staged.provider)
    batch = [PROMPT, PROMPT[:4]]  # two rows: an expert both route is copied once
    assert [o.token_ids for o in staged.generate(batch, GREEDY)] == [
        o.token_ids for o in resident.generate(batch, GREEDY)
    ]
    assert_table_follows(staged.provider)


def test_a_fresh_staged_store_admits_the_misses_of_a_short_first_prompt(model):
    """A first prompt of one token runs staged from the start (two pairs): the free slots are its victims,
    so it admits what the copy path admits (it once staged them into the buffer and admitted none)."""
    pytest.importorskip("triton")
    path, resident = model
    one = SamplingParams(max_tokens=1)
    copied, staged = (
        tiered(path, resident, slots=2, prefetch=False, miss_path=m) for m in ("copy", "staged")
    )
    for llm in (copied, staged):
        llm.generate(PROMPT[:1], one)
    held = [
        {layer: dict(p.slot_of) for layer, p in llm.provider.pool.layers.items()} for llm in (copied, staged)
    ]
    assert held[0] == held[1] and all(held[1].values())
    assert_slots_hold_their_experts(staged.provider)


def assert_slots_hold_their_experts(store) -> None:
    """Each GPU slot's bytes are those of the expert the host says it holds."""
    for layer, part in store.pool.layers.items():
        for slot, e in part.expert_of.items():
            assert torch.equal(store.pool.flat[slot], store.host.buffer(store.host.get(layer, e)[0])), (
                layer,
                e,
            )


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA test_offload_store_gpu.py runs it compiled")
def test_staged_admissions_of_short_prompts_are_taken_in_before_the_copy_path_reads_the_slots(model):
    """A prompt of a few tokens prefills in place (few pairs), so staged it admits experts on the GPU in a
    step with no decode (no after_step); the copy path of the next long prompt must see them (it read a
    stale view and computed with another expert's bytes, found by a review)."""
    pytest.importorskip("triton")
    path, resident = model
    llm = tiered(path, resident, slots=2, miss_path="staged")
    llm.generate(PROMPT, SamplingParams(max_tokens=1))  # the copy path's prefill fills every slot
    for prompt in ([200, 31, 8], [1, 2, 3], [250, 251, 252, 253]):
        llm.generate(prompt, SamplingParams(max_tokens=1))  # prefill only, in place
    assert llm.generate(PROMPT, GREEDY)[0].token_ids == resident.generate(PROMPT, GREEDY)[0].token_ids
    assert_slots_hold_their_experts(llm.provider)
    assert_table_follows(llm.provider)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA test_offload_store_gpu.py runs it compiled")
def test_two_staged_forwards_that_move_an_expert_are_taken_in_at_once(model):
    """Two staged forwards of a layer before the host takes them in (a prompt chunk and the decode rows of
    one step): the first evicts X from a slot for V, the second admits X again into another slot. The host's
    view then holds both, and every other layer its own (taking the slots in one by one lost X)."""
    pytest.importorskip("triton")
    path, resident = model
    llm = tiered(path, resident, slots=2, miss_path="staged")
    store, in_place = llm.provider, llm.provider.in_place
    llm.generate(PROMPT, SamplingParams(max_tokens=1))  # the copy path fills every slot
    x = torch.randn(1, resident.args.hidden_size, dtype=torch.bfloat16)
    w = torch.full((1, 2), 0.5)
    layer0 = next(iter(in_place.row))
    part = store.pool.layers[layer0]
    first, second = in_place.listed[in_place.row[layer0]][:2].tolist()  # the victims, in order
    q, victim_x = part.expert_of[first], part.expert_of[second]
    v = next(e for e in range(store.num_experts) if e not in (q, victim_x))
    held = {layer: torch.tensor([list(store.pool.layers[layer].slot_of)[:2]]) for layer in in_place.row}
    for ids in ([q, v], [victim_x, v]):  # 1: v into `second` (x out); 2: x into `first` (q out)
        for layer in in_place.row:
            in_place.forward(layer, x, torch.tensor([ids]) if layer == layer0 else held[layer], w)
    in_place.after_step(1)
    assert part.expert_of == {first: victim_x, second: v}
    assert part.slot_of == {victim_x: first, v: second}
    assert_table_follows(store)
    assert_slots_hold_their_experts(store)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA test_offload_store_gpu.py runs it compiled")
def test_in_place_needs_every_expert_in_host_memory(model):
    path, resident = model
    with pytest.raises(InvalidRequestError, match="all 32 must fit the host cache"):
        tiered(path, resident, slots=2, host=6, miss_path="in-place")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA test_offload_store_gpu.py runs it compiled")
def test_in_place_admits_a_miss_only_over_a_less_routed_victim(model):
    pytest.importorskip("triton")
    path, resident = model
    llm = tiered(path, resident, slots=2, miss_path="in-place")
    llm.generate(PROMPT, SamplingParams(max_tokens=1))  # the prefill fills every slot
    store = llm.provider
    in_place, part = store.in_place, store.pool.layers[0]
    assert not part.free and len(part.slot_of) == 2
    victim = part.expert_of[part.policy.victim(set())]
    newcomer = next(e for e in range(resident.args.num_experts) if e not in part.slot_of)
    in_place.recent.freq[0, victim] = 3.0
    in_place.recent.freq[0, newcomer] = 5.0
    assert admits(in_place.recent.freq[0], newcomer, part, set())
    in_place.recent.freq[0, newcomer] = 3.0  # as often as the victim: not enough
    assert not admits(in_place.recent.freq[0], newcomer, part, set())
    in_place.recent.freq[0, newcomer] = 9.0
    assert not admits(in_place.recent.freq[0], newcomer, part, set(part.slots))  # every slot in use this step


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA test_offload_store_gpu.py runs it compiled")
def test_in_place_misses_staged_into_the_gpu_give_the_same_tokens(model):
    """The in-place path's other way to read a miss: a copy kernel stages the step's missed experts into
    a GPU buffer and the expert kernels read every pair from the GPU. Same tokens as all-resident, and the
    staged rows hold exactly the missed experts' host bytes."""
    pytest.importorskip("triton")
    path, resident = model
    llm = tiered(path, resident, slots=2, miss_path="staged")
    in_place = llm.provider.in_place
    assert llm.generate(PROMPT, GREEDY)[0].token_ids == resident.generate(PROMPT, GREEDY)[0].token_ids
    from tiermoe.formats import triton_kernels

    row, store = in_place.table[0], llm.provider
    part = store.pool.layers[0]
    missing = [e for e in range(resident.args.num_experts) if e not in in_place.resident[0]][:2]
    ids = torch.tensor([[missing[0], missing[1]], [missing[1], next(iter(in_place.resident[0]))]])
    in_place.staging.zero_()
    addresses = triton_kernels.stage(row, ids, store.pool.flat, in_place.staging).tolist()
    staging = in_place.staging.data_ptr() + torch.arange(4) * in_place.staging.shape[1]
    assert addresses[:3] == staging[[0, 1, 1]].tolist()  # the misses: their first pair's staged row
    assert addresses[3] == in_place.slot_addr[part.slot_of[ids[1, 1].item()]]  # a hit: its slot
    for p, e in enumerate(missing):
        assert torch.equal(in_place.staging[p], store.host.buffer(store.host.get(0, e)[0]))
    assert not in_place.staging[2:4].any()  # a repeated miss's row and a hit's are not written
