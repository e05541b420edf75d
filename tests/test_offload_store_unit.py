"""TieredExpertStore on its own, against a fake expert source: outputs equal the experts computed
directly, and every counter follows from the routing (no model, no checkpoint)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiermoe.formats.dense import DenseFormat
from tiermoe.offload.budget import GIB, plan_memory
from tiermoe.offload.store import TieredExpertStore

H, INTER, E, K = 8, 4, 6, 2  # hidden, expert intermediate, experts per layer, top-k
LAYERS = [0, 1]
NUMEL = 3 * H * INTER
FMT = DenseFormat(H, INTER, torch.float32)
BYTES = FMT.nbytes


class FakeSource:
    """Seeded experts per (layer, expert); counts every read, as a disk would see them."""

    description = "fake"

    def __init__(self):
        self.reads: list[tuple[int, int]] = []

    @staticmethod
    def weights(layer: int, expert: int) -> torch.Tensor:
        return torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * layer + expert)) * 0.3

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        self.reads.append((layer, expert))
        views, flat = FMT.views(out[None]), self.weights(layer, expert)
        views["gate_up"].view(-1).copy_(flat[: 2 * INTER * H])
        views["down"].view(-1).copy_(flat[2 * INTER * H :])
        return BYTES


def reference(layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w * down(silu(gate(x)) * up(x)) with the source's weights: gate_up [2I, H], down [H, INTER]."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t], strict=True):
            flat = FakeSource.weights(layer, e)
            gate_up, down = flat[: 2 * INTER * H].view(2 * INTER, H), flat[2 * INTER * H :].view(H, INTER)
            gate, up = (gate_up @ x[t]).split(INTER)
            out[t] += w * (down @ (F.silu(gate) * up))
    return out


def store(
    slots_per_layer: int, host_experts: int, policy: str = "lru"
) -> tuple[TieredExpertStore, FakeSource]:
    plan = plan_memory(
        moe_layers=LAYERS, num_experts=E, top_k=K, expert_bytes=BYTES, dense_bytes=0, kv_bytes=0,
        workspace_bytes=0, device=torch.device("cpu"), gpu_budget_gib=slots_per_layer * len(LAYERS) * BYTES / GIB,
        cpu_budget_gib=host_experts * BYTES / GIB,
    )  # fmt: skip
    source = FakeSource()
    return TieredExpertStore(source, plan, FMT, E, torch.device("cpu"), policy, False), source


def test_outputs_equal_the_experts_and_the_counters_follow_the_routing():
    s, source = store(slots_per_layer=2, host_experts=E * len(LAYERS))
    assert len(source.reads) == E * len(LAYERS)  # preloaded: every expert read once into the host cache
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[0.7, 0.3]])
    steps = [[0, 1], [0, 1], [2, 3], [0, 2]]  # layer 0's routing, one token per step
    for ids in steps:
        ids = torch.tensor([ids])
        torch.testing.assert_close(s.forward(0, x, ids, w), reference(0, x, ids, w), rtol=1e-5, atol=1e-6)
    st = s.stats()
    # 2 slots, LRU: misses 0,1 | hits 0,1 | misses 2,3 (evict 0,1) | misses 0, hit 2
    assert (st["gpu_hits"], st["gpu_misses"]) == (3, 5)
    assert st["bytes_h2d"] == 5 * BYTES and st["host_hits"] == 5 and st["host_misses"] == 0
    assert st["gpu_hit_rate"] == round(3 / 8, 4) and len(source.reads) == E * len(LAYERS)


def test_a_host_cache_smaller_than_the_experts_reads_the_source_on_its_misses():
    s, source = store(slots_per_layer=2, host_experts=3)
    preloaded = len(source.reads)
    assert preloaded == 3
    x = torch.randn(1, H)
    w = torch.tensor([[0.5, 0.5]])
    for ids in ([4, 5], [0, 1], [4, 5]):
        s.forward(1, x, torch.tensor([ids]), w)
    st = s.stats()
    # Layer 1 was never preloaded (the host holds layer 0's first 3); 2 GPU slots: every step misses.
    # Five reads, not six: in the third step (1, 5) is still held, and the read of (1, 4) evicts the
    # least recent entry after the step's held experts were touched, (1, 0), not (1, 5).
    assert st["gpu_misses"] == 6 and st["host_misses"] == len(source.reads) - preloaded == 5
    assert source.reads[preloaded:] == [(1, 4), (1, 5), (1, 0), (1, 1), (1, 4)]
    assert st["bytes_disk"] == 5 * BYTES and st["host_hits"] == 1


def test_a_decode_step_wider_than_the_slots_never_syncs_to_pick_its_pairs(monkeypatch):
    """Decode over more experts than a layer's slots: each wave runs every pair, the other waves' with
    weight 0, so no nonzero() picks pairs out on the host (the prefill's accumulate is not called)."""
    s, _ = store(slots_per_layer=2, host_experts=E * len(LAYERS))
    monkeypatch.setattr(s.format, "accumulate", lambda *a: pytest.fail("decode took the prefill path"))
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[0, 1], [2, 3]])
    w = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    torch.testing.assert_close(s.forward(1, x, ids, w), reference(1, x, ids, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["lru", "lfu", "lru-protect"])
def test_a_batch_wider_than_the_slots_runs_in_waves(policy):
    s, _ = store(slots_per_layer=2, host_experts=E * len(LAYERS), policy=policy)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])  # 6 distinct experts through 2 slots
    w = torch.full((3, 2), 0.5)
    torch.testing.assert_close(s.forward(1, x, ids, w), reference(1, x, ids, w), rtol=1e-5, atol=1e-6)
    assert s.stats()["gpu_misses"] == 6


def test_waves_are_double_buffered_the_next_copies_issued_before_this_wave_computes(monkeypatch):
    s, _ = store(slots_per_layer=4, host_experts=E * len(LAYERS))
    events = []
    copy, accumulate = s.copier.copy, s.format.accumulate
    monkeypatch.setattr(
        s.copier, "copy", lambda dst, src, after=None: events.append("copy") or copy(dst, src, after)
    )

    def computed(x, tokens, slots, weights, bank, out):
        events.append(f"compute {len(set(slots.tolist()))}")
        return accumulate(x, tokens, slots, weights, bank, out)

    monkeypatch.setattr(s.format, "accumulate", computed)
    # A prefill (more pairs than a decode step's 16): 6 distinct experts, 4 slots: waves of 2
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]] * 3)
    w = torch.full((9, 2), 0.5)
    torch.testing.assert_close(s.forward(1, x, ids, w), reference(1, x, ids, w), rtol=1e-5, atol=1e-6)
    assert events == ["copy"] * 4 + ["compute 2", "copy", "copy", "compute 2", "compute 2"]


def test_a_failed_read_leaves_no_slot_claiming_an_expert_it_does_not_hold():
    s, source = store(slots_per_layer=2, host_experts=3)
    x = torch.randn(1, H)
    w = torch.tensor([[0.5, 0.5]])
    ids = torch.tensor([[4, 5]])
    read = source.read_into
    failing = {(1, 5)}

    def flaky(layer, expert, out):
        if (layer, expert) in failing:
            failing.discard((layer, expert))
            raise OSError("transient read error")
        return read(layer, expert, out)

    source.read_into = flaky
    with pytest.raises(OSError, match="transient"):
        s.forward(1, x, ids, w)
    assert 5 not in s.pool.layers[1].slot_of  # its slot was never handed out
    torch.testing.assert_close(s.forward(1, x, ids, w), reference(1, x, ids, w), rtol=1e-5, atol=1e-6)


def test_a_step_loads_the_union_of_its_tokens_experts_once():
    """Three tokens routed to six (token, expert) pairs over three experts: three loads, each expert then
    runs over all of its tokens (what batching many sequences gains from an offloaded MoE)."""
    s, _ = store(slots_per_layer=4, host_experts=E * len(LAYERS))
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[0, 1], [1, 2], [0, 2]])
    w = torch.full((3, 2), 0.5)
    torch.testing.assert_close(s.forward(1, x, ids, w), reference(1, x, ids, w), rtol=1e-5, atol=1e-6)
    st = s.stats()
    assert st["gpu_misses"] == 3 and st["bytes_h2d"] == 3 * BYTES


class _Cuda:
    """A stand-in input that says it is on CUDA, so a format picks its kernels (Triton's interpreter)."""

    is_cuda = True


class RandomSource:
    """Seeded random experts of any format."""

    description = "random"

    def __init__(self, fmt):
        self.fmt = fmt

    def read_into(self, layer: int, expert: int, out: torch.Tensor) -> int:
        self.fmt.fill_random(out, torch.Generator().manual_seed(100 * layer + expert), 0.05)
        return self.fmt.nbytes


@pytest.mark.parametrize("slots", [2, 3, 4])
@pytest.mark.parametrize("experts", ["bf16", "int4"])
def test_a_step_split_into_waves_gives_the_bits_of_one_grouped_mlp(monkeypatch, slots, experts):
    """18 pairs (9 tokens x top-2) over 2-4 slots: several waves, each through the grouped GEMM's pairs
    (Triton's interpreter, as on CUDA), added apart and rounded once: bit for bit the one grouped mlp the
    resident path runs over every pair."""
    from tiermoe.formats import triton_kernels
    from tiermoe.formats.base import ExpertFormat
    from tiermoe.formats.int4 import Int4Format

    hidden, inter = 64, 32
    fmt = (
        DenseFormat(hidden, inter, torch.bfloat16)
        if experts == "bf16"
        else Int4Format(hidden, inter, torch.bfloat16, 16)
    )
    kernel = ExpertFormat._kernel
    monkeypatch.setattr(ExpertFormat, "_kernel", lambda self, x, what: kernel(self, _Cuda(), what))
    plan = plan_memory(
        moe_layers=[0], num_experts=E, top_k=K, expert_bytes=fmt.nbytes, dense_bytes=0, kv_bytes=0,
        workspace_bytes=0, device=torch.device("cpu"), gpu_budget_gib=slots * fmt.nbytes / GIB,
        cpu_budget_gib=E * fmt.nbytes / GIB,
    )  # fmt: skip
    source = RandomSource(fmt)
    store = TieredExpertStore(source, plan, fmt, E, torch.device("cpu"), "lru", False)
    bank = fmt.empty(E)
    for e in range(E):
        source.read_into(0, e, bank[e])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, hidden, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(9)])
    weights = torch.rand(9, K, generator=gen).to(torch.bfloat16)
    waves, pairs = [], triton_kernels.grouped_pairs
    monkeypatch.setattr(triton_kernels, "grouped_pairs", lambda *a: waves.append(1) or pairs(*a))
    got = store.forward(0, x, ids, weights)
    assert len(waves) > 1  # a split step, every wave through the pairs
    want = fmt.mlp(x, ids, weights, fmt.views(bank))  # resident: one grouped mlp over the 18 pairs
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
