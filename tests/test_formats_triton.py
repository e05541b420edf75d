"""The quantized formats' Triton decode kernels against their torch reference: compiled on a GPU, and
without one in Triton's interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1 before triton is
imported)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from tiermoe.bench.kernels import random_bank
from tiermoe.formats import triton_kernels
from tiermoe.formats.dense import DenseFormat
from tiermoe.formats.fp4 import Nvfp4Format
from tiermoe.formats.fp8 import Fp8BlockFormat
from tiermoe.formats.int4 import Int4Format
from tiermoe.formats.mxfp4 import Mxfp4Format
from tiermoe.formats.quantized import DequantizingFormat
from tiermoe.formats.swiglu import accumulate_pairs, expert_mlp
from tiermoe.models.experts import SWIGLU, ExpertKind

from .conftest import budget_gib

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def make(cls, shape, dtype, kind=SWIGLU):
    """The format of (hidden, inter, block): block None for the formats without one (dense, fp4)."""
    hidden, inter, block = shape
    return (
        cls(hidden, inter, dtype, kind=kind) if block is None else cls(hidden, inter, dtype, block, kind=kind)
    )


def float32_weights(cls, shape, views, slots) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [n, 2I, H] and down [n, H, I] of the experts at slots [n], in float32, by torch alone."""
    fmt = make(cls, shape, torch.float32)
    if isinstance(fmt, DequantizingFormat):
        return fmt.dequantize(views, slots)
    return views["gate_up"][slots].float(), views["down"][slots].float()


CASES = [
    (DenseFormat, (64, 40, None), triton_kernels.bank_mlp),
    (DenseFormat, (256, 128, None), triton_kernels.bank_mlp),
    (Int4Format, (64, 32, 16), triton_kernels.bank_mlp),
    (Int4Format, (128, 96, -1), triton_kernels.bank_mlp),
    (Int4Format, (256, 128, 128), triton_kernels.bank_mlp),
    (Fp8BlockFormat, (64, 40, (16, 16)), triton_kernels.bank_mlp),  # 40 rows: a partial block of scales
    (Fp8BlockFormat, (256, 128, (128, 128)), triton_kernels.bank_mlp),
    (Nvfp4Format, (64, 32, None), triton_kernels.bank_mlp),
    (Nvfp4Format, (256, 96, None), triton_kernels.bank_mlp),
    (Mxfp4Format, (64, 32, None), triton_kernels.bank_mlp),
    (Mxfp4Format, (256, 96, None), triton_kernels.bank_mlp),
    (Mxfp4Format, (256, 128, None), triton_kernels.bank_mlp),
]


def gemv_error(cls, shape, kernel) -> tuple[torch.Tensor, float]:
    """The kernel's decode step (3 tokens, top-2 of 5 experts) and its relative error against the
    experts dequantized to float32 in torch."""
    hidden = shape[0]
    fmt = make(cls, shape, DTYPE)
    views = random_bank(fmt, DEVICE, 5, 0.05)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    slots = torch.tensor([[0, 4], [2, 2], [1, 3]], device=DEVICE)
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]], device=DEVICE, dtype=DTYPE)
    got = kernel(fmt, x, slots, weights, views).float()
    gate_up, down = float32_weights(cls, shape, views, slots.reshape(-1))
    ref = expert_mlp(x.float(), torch.arange(6, device=DEVICE).view(3, 2), weights.float(), gate_up, down)
    if CUDA:  # the format's own decode path is this kernel
        assert torch.equal(fmt.mlp(x, slots, weights, views).float(), got)
    return got, ((got - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(("cls", "shape", "kernel"), CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_grouped_gemv_matches_the_torch_reference(cls, shape, kernel):
    rel = gemv_error(cls, shape, kernel)[1]
    assert rel < (1e-5 if not CUDA else 1e-2), rel


@pytest.mark.parametrize(
    "config",
    [
        triton_kernels.GemvConfig(block_n=32, block_k=32, split=4, warps=2),
        triton_kernels.GemvConfig(block_n=128, block_k=64, split=2, warps=8),
    ],
    ids=str,
)
@pytest.mark.parametrize(
    ("cls", "shape", "kernel"),
    [CASES[4], CASES[6], CASES[-1], CASES[1]],
    ids=lambda c: getattr(c, "__name__", str(c)),
)
def test_split_k_and_other_tiles_give_the_same_outputs(monkeypatch, config, cls, shape, kernel):
    """Every launch the sweep may pick computes the same step: K split across programs (the partial sums
    added in torch) and other tile sizes, against the default launch and the reference."""
    default = gemv_error(cls, shape, kernel)[0]
    monkeypatch.setattr(triton_kernels, "gemv_config", lambda *args: config)
    got, rel_config = gemv_error(cls, shape, kernel)
    assert rel_config < (1e-5 if not CUDA else 1e-2), rel_config
    assert torch.allclose(got, default, rtol=1e-5, atol=1e-5 * default.abs().max().item())


GEMM_CASES = [
    (DenseFormat, (64, 40, None), triton_kernels.grouped_accumulate),  # 40 outputs: a partial block of 64
    (DenseFormat, (256, 128, None), triton_kernels.grouped_accumulate),
    (Int4Format, (64, 32, 16), triton_kernels.grouped_accumulate),
    (Int4Format, (128, 96, -1), triton_kernels.grouped_accumulate),
    (Fp8BlockFormat, (64, 40, (16, 16)), triton_kernels.grouped_accumulate),
    (Nvfp4Format, (64, 96, None), triton_kernels.grouped_accumulate),
    (Mxfp4Format, (64, 96, None), triton_kernels.grouped_accumulate),
]


@pytest.mark.parametrize(("cls", "shape", "kernel"), GEMM_CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_grouped_gemm_matches_the_torch_reference(cls, shape, kernel):
    """Prefill: 40 tokens x top-2 over 5 experts, so an expert's pairs span several blocks of 16."""
    hidden = shape[0]
    fmt = make(cls, shape, DTYPE)
    views = random_bank(fmt, DEVICE, 5, 0.05)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, hidden, generator=gen).to(DEVICE, DTYPE)
    tokens = torch.arange(40, device=DEVICE).repeat_interleave(2)
    slots = torch.randint(0, 5, (80,), generator=gen).to(DEVICE)
    weights = torch.rand(80, generator=gen).to(DEVICE, DTYPE)
    got = kernel(fmt, x, tokens, slots, weights, views, torch.zeros_like(x)).float()
    gate_up, down = float32_weights(cls, shape, views, torch.arange(5, device=DEVICE))
    ref = accumulate_pairs(
        x.float(), tokens, slots, weights.float(), gate_up, down, torch.zeros_like(x, dtype=torch.float32)
    )
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if not CUDA else 2e-2), rel


@pytest.mark.parametrize("one_launch", [True, False], ids=["kernel", "tensor-ops"])
def test_gemm_blocks_cover_each_live_pair_once_with_no_host_sync(monkeypatch, one_launch):
    """The GEMM's blocks, found on the device (one Triton program for a decode step's pairs, tensor ops for
    more): each pair with a slot >= 0 in exactly one block of its own slot, at most BLOCK_M a block, the
    blocks past the last empty; pairs with a negative slot in none."""
    if not one_launch:
        monkeypatch.setattr(triton_kernels, "FIND_BLOCKS_MAX_PAIRS", 0)
    gen = torch.Generator().manual_seed(3)
    for pairs, num_slots, served in [
        (80, 5, 0),
        (40, 64, 7),
        (3, 9, 0),
        (37, 3, 37 - 1),
        (200, 300, 50),
        (1, 4, 0),
        (5, 3, 5),
    ]:
        slots = torch.randint(0, num_slots, (pairs,), generator=gen)
        slots[:served] = -1
        s_sorted = slots.sort().values
        blocks = triton_kernels._blocks(s_sorted.to(DEVICE), num_slots)
        slot, start, end = (t.long().cpu() for t in blocks)
        assert len(slot) == -(-pairs // triton_kernels.BLOCK_M) + min(pairs, num_slots)
        covered = torch.zeros(pairs, dtype=torch.long)
        for b in range(len(slot)):
            assert 0 <= end[b] - start[b] <= triton_kernels.BLOCK_M
            covered[start[b] : end[b]] += 1
            assert (s_sorted[start[b] : end[b]] == slot[b]).all()
        assert torch.equal(covered, (s_sorted >= 0).long())
        real = end > start
        assert real.sum() == sum(
            -(-int((s_sorted == e).sum()) // triton_kernels.BLOCK_M) for e in range(num_slots)
        )
        assert not real[int(real.sum()) :].any()  # the empty blocks come last


@pytest.mark.parametrize(
    ("cls", "shape", "kernel"), GEMM_CASES[::2], ids=lambda c: getattr(c, "__name__", str(c))
)
def test_the_grouped_gemm_skips_pairs_served_elsewhere(cls, shape, kernel):
    """Pairs with slot -1 (another wave's, the CPU's) add nothing, even where the slot the GEMM would read
    for them holds NaN: the result is that of the other pairs alone."""
    fmt = make(cls, shape, DTYPE)
    views = random_bank(fmt, DEVICE, 5, 0.05)
    views[fmt.parts[0].name][4].view(torch.uint8).fill_(0xFF)  # slot 4: NaN (bf16) or garbage, never routed
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, shape[0], generator=gen).to(DEVICE, DTYPE)
    tokens = torch.arange(20, device=DEVICE).repeat_interleave(2)
    slots = torch.randint(0, 4, (40,), generator=gen).to(DEVICE)
    weights = torch.rand(40, generator=gen).to(DEVICE, DTYPE)
    served = torch.rand(40, generator=gen).to(DEVICE) < 0.4
    got = kernel(fmt, x, tokens, slots.masked_fill(served, -1), weights, views, torch.zeros_like(x))
    keep = ~served
    want = kernel(fmt, x, tokens[keep], slots[keep], weights[keep], views, torch.zeros_like(x))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tuned_launches_are_saved_merged_and_used(monkeypatch, tmp_path):
    """A sweep's saved winners become the launch of that GPU and shape (the CPU is "cpu" here); a file
    that cannot be read leaves the rule in charge, with a warning, never an error."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(triton_kernels, "SHIPPED_TUNED", tmp_path / "none.json")
    triton_kernels.tuned.cache_clear()
    rule = triton_kernels.gemv_config("int4", 256, 128, 2, 6, 128)
    won = triton_kernels.GemvConfig(block_n=32, block_k=64, split=2, warps=2)
    gpu = torch.cuda.get_device_name() if CUDA else "cpu"
    entry = {"gpu": gpu, "kernel": "int4", "k": 256, "n": 128, "m": 2, "pairs": 6}
    triton_kernels.save_tuned([{**entry, "config": {**won.__dict__, "split": 4}}])
    path = triton_kernels.save_tuned([{**entry, "config": won.__dict__}])  # the same key: replaced
    assert len(json.loads(path.read_text())["entries"]) == 1
    assert triton_kernels.gemv_config("int4", 256, 128, 2, 6, 128) == won != rule
    assert triton_kernels.gemv_config("int4", 256, 128, 2, 8, 128) == rule  # another shape: the rule
    path.write_text("{not json")
    triton_kernels.tuned.cache_clear()
    with pytest.warns(UserWarning, match="ignored, not a tuned-launch file"):
        assert triton_kernels.gemv_config("int4", 256, 128, 2, 6, 128) == rule
    triton_kernels.tuned.cache_clear()


@pytest.mark.parametrize("cls", [DenseFormat, Int4Format, Mxfp4Format], ids=lambda c: c.__name__)
def test_experts_read_in_place_from_two_memories_through_one_address_table(cls):
    """The decode path without host round trips: a layer's table holds each expert's address, some in the
    GPU's slot bank, the rest in the pinned host cache (both host memory here, as in the interpreter);
    the kernel reads each where it lies and computes what the experts, gathered in one bank, give."""
    shape = {Int4Format: (128, 64, 32)}.get(cls, (128, 64, None))
    fmt = make(cls, shape, DTYPE)
    bank = fmt.empty(6, DEVICE)  # experts 0..5 side by side: the reference
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for e in range(6):
        fmt.fill_random(bank[e], g, 0.05)
    table, _memories = two_memories(fmt, bank)
    x = torch.randn(3, shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    ids = torch.tensor([[0, 4], [2, 5], [1, 3]], device=DEVICE)
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]], device=DEVICE, dtype=DTYPE)
    got = triton_kernels.mlp_at(fmt, x, ids, weights, table)
    expected = triton_kernels.bank_mlp(fmt, x, ids, weights, fmt.views(bank))
    assert torch.equal(got, expected)


def two_memories(fmt, bank: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A bank's 6 experts copied apart, experts 4 and 1 into a bank of GPU slots, the rest into host
    memory (both host memory without a GPU, as in the interpreter): the address table, and the two
    memories (kept while the table is read)."""
    gpu, host = fmt.empty(2, DEVICE), fmt.empty(4, DEVICE)
    placement = {4: (gpu, 0), 1: (gpu, 1), 0: (host, 3), 2: (host, 0), 3: (host, 2), 5: (host, 1)}
    for e, (memory, index) in placement.items():
        memory[index].copy_(bank[e])
    table = torch.tensor(
        [memory[index].data_ptr() for _, (memory, index) in sorted(placement.items())], device=DEVICE
    )
    return table, (gpu, host)


def test_staging_copies_each_missed_expert_once_into_a_victim_slot_or_a_staging_row():
    """The in-place path's staging of a layer's misses (one planning program, one wide copy): each missed
    expert is copied once from host memory and every pair of it reads that copy; with admission, the misses
    take the candidate slots in order, skipping a slot whose expert this step routes, and the table and
    the slots' owners follow (the evicted expert back to its host copy); misses past the candidates go to
    staging rows, as every miss does without admission. Hits read their slot, never copied."""
    fmt = make(DenseFormat, (128, 64, None), DTYPE)
    experts, slots = 12, 6
    host = fmt.empty(experts, "cpu")
    host = host.pin_memory() if CUDA else host  # the GPU reads it through its device-visible address
    g = torch.Generator().manual_seed(0)
    for e in range(experts):
        fmt.fill_random(host[e], g, 0.05)
    host_addr = torch.tensor([host[e].data_ptr() for e in range(experts)], device=DEVICE)
    pool, staging = fmt.empty(slots, DEVICE), fmt.empty(16, DEVICE)

    def state(resident: dict[int, int]):  # slot -> expert
        table, owner = host_addr.clone(), torch.full((slots,), -1, dtype=torch.long, device=DEVICE)
        for slot, e in resident.items():
            pool[slot].copy_(host[e])
            table[e], owner[slot] = pool[slot].data_ptr(), e
        return table, owner

    def where(address: int) -> tuple[str, int]:
        for name, memory in (("slot", pool), ("staged", staging)):
            if 0 <= address - memory.data_ptr() < memory.numel():
                return name, (address - memory.data_ptr()) // memory.shape[1]
        raise AssertionError(f"{address:#x} is neither a slot nor a staging row")

    def read(address: int) -> torch.Tensor:
        name, row = where(address)
        return (pool if name == "slot" else staging)[row]

    ids = torch.tensor([[3, 7], [9, 7], [3, 10]], device=DEVICE)  # 3 resident; 7 (twice), 9, 10 missed
    # Admission: slot 0 holds 3 (routed: skipped), 2 and 3 are free, 1 holds 5 (evicted for the third miss).
    table, owner = state({0: 3, 1: 5})
    candidates = torch.tensor([0, 2, 1, 4] + [-1] * 12, device=DEVICE)
    got = triton_kernels.stage(table, ids, pool, staging, (host_addr, candidates, owner)).tolist()
    assert [where(a) for a in got] == [
        ("slot", 0),
        ("slot", 2),
        ("slot", 1),
        ("slot", 2),
        ("slot", 0),
        ("slot", 4),
    ]
    assert owner.tolist() == [3, 9, 7, -1, 10, -1]
    placed = {3: 0, 7: 2, 9: 1, 10: 4}
    assert table.tolist() == [
        pool[placed[e]].data_ptr() if e in placed else host_addr[e].item() for e in range(experts)
    ]  # 5 back to its host copy
    for a, e in zip(got, ids.reshape(-1).tolist(), strict=True):
        assert torch.equal(read(a).cpu(), host[e])
    # Fewer free candidates than misses: the first miss takes slot 3, the others their first pair's row.
    table, owner = state({0: 3})
    staging.zero_()
    candidates = torch.tensor([0, 3] + [-1] * 14, device=DEVICE)
    record = torch.full((8,), -5, dtype=torch.long, device=DEVICE)
    got = triton_kernels.stage(table, ids, pool, staging, (host_addr, candidates, owner), record).tolist()
    assert record.tolist() == [3, 7, 9, 7, 3, 10, -5, -5]  # the pairs' ids, in the same launch
    assert [where(a) for a in got] == [
        ("slot", 0),
        ("slot", 3),
        ("staged", 2),
        ("slot", 3),
        ("slot", 0),
        ("staged", 5),
    ]
    assert owner.tolist() == [3, -1, -1, 7, -1, -1]
    assert not staging[[0, 1, 3, 4]].any()  # copied once: no row for a hit or a repeated miss
    # Without admission: the table and the slots stay, every miss in a staging row.
    table, owner = state({0: 3})
    before = table.clone()
    got = triton_kernels.stage(table, ids, pool, staging).tolist()
    assert [where(a) for a in got] == [
        ("slot", 0),
        ("staged", 1),
        ("staged", 2),
        ("staged", 1),
        ("slot", 0),
        ("staged", 5),
    ]
    assert torch.equal(table, before)
    for a, e in zip(got, ids.reshape(-1).tolist(), strict=True):
        assert torch.equal(read(a).cpu(), host[e])


# gpt-oss's kind with a limit the activations cross (the biases below put about 20% of the gates and 40% of
# the ups past it), so the clamp acts; its alpha, gpt-oss's own.
KIND = ExpertKind(bias=True, limit=0.5, alpha=1.702)
UNCLAMPED = ExpertKind(bias=True, limit=float("inf"), alpha=1.702)

KIND_CASES = [
    (DenseFormat, None),
    (Int4Format, 16),
    (Fp8BlockFormat, (16, 16)),
    (Nvfp4Format, None),
    (Mxfp4Format, None),
]


def biased_bank(fmt, slots: int = 5) -> torch.Tensor:
    """A bank (uint8 [slots, nbytes]) of random experts with random nonzero biases (fill_random writes
    zeros, as synthetic checkpoints have): gate_up's about normal(0, 0.5), down's normal(0, 0.1), each
    about the size of its projection's output."""
    bank = fmt.empty(slots, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for s in range(slots):
        fmt.fill_random(bank[s], g, 0.05)
    views, g = fmt.views(bank), torch.Generator().manual_seed(3)
    for name, std in (("gate_up_bias", 0.5), ("down_bias", 0.1)):
        views[name].copy_(torch.randn(views[name].shape, generator=g) * std)
    return bank


def check_kind(got, reference, biases, tol: float) -> None:
    """got matches reference(KIND, biases) (the torch reference in float32) within tol, and the data make
    every piece of the kind count: without the gate_up bias, the down bias or the clamp it is far off."""
    gate_up, down = (b.float() for b in biases)

    def rel(kind, gate_up, down):
        ref = reference(kind, (gate_up, down))
        return ((got.float() - ref).norm() / ref.norm()).item()

    assert rel(KIND, gate_up, down) < tol
    for name, wrong in {
        "no gate_up bias": (KIND, 0 * gate_up, down),
        "no down bias": (KIND, gate_up, 0 * down),
        "no clamp": (UNCLAMPED, gate_up, down),
    }.items():
        assert rel(*wrong) > 0.1, name


def decode_step(hidden: int):
    """A decode step's inputs: 3 tokens, top-2 of 5 experts (one token routed twice to expert 2)."""
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    slots = torch.tensor([[0, 4], [2, 2], [1, 3]], device=DEVICE)
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]], device=DEVICE, dtype=DTYPE)
    return x, slots, weights


def decode_reference(cls, shape, views, x, slots, weights):
    """reference(kind, biases [S, 2I] and [S, H]): the step by swiglu.expert_mlp in float32."""
    flat = slots.reshape(-1)
    gate_up, down = float32_weights(cls, shape, views, flat)
    pairs = torch.arange(flat.numel(), device=DEVICE).view(slots.shape)
    return lambda kind, biases: expert_mlp(
        x.float(), pairs, weights.float(), gate_up, down, kind, (biases[0][flat], biases[1][flat])
    )


@pytest.mark.parametrize(("cls", "block"), KIND_CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_the_gemv_computes_biases_and_the_clamped_glu(monkeypatch, cls, block):
    """gpt-oss's experts in the decode GEMV, K split in two (the down projection sums gate and up's splits
    before its GLU; one split alone adds each bias), against the torch reference."""
    shape = (64, 64, block)
    fmt = make(cls, shape, DTYPE, KIND)
    assert fmt._kernel(_Cuda(), "mlp") is triton_kernels.bank_mlp  # on CUDA the format runs the kernel
    views = fmt.views(biased_bank(fmt))
    x, slots, weights = decode_step(shape[0])
    config = triton_kernels.GemvConfig(block_n=32, block_k=32 if cls is Mxfp4Format else 16, split=2, warps=2)
    monkeypatch.setattr(triton_kernels, "gemv_config", lambda *args: config)
    got = triton_kernels.bank_mlp(fmt, x, slots, weights, views)
    if CUDA:
        assert torch.equal(fmt.mlp(x, slots, weights, views), got)
    biases = (views["gate_up_bias"], views["down_bias"])
    check_kind(
        got, decode_reference(cls, shape, views, x, slots, weights), biases, 1e-5 if not CUDA else 1e-2
    )


@pytest.mark.parametrize(("cls", "block"), KIND_CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_the_address_table_path_computes_biases_and_the_clamped_glu(cls, block):
    """mlp_at over a table of addresses in two memories (as the in-place miss path reads them): the bias
    parts are found by their offset in each expert as the weights are. 96 intermediate outputs: gate_up's
    second block of 64 is partial, its biases' loads masked."""
    shape = (64, 96, block)
    fmt = make(cls, shape, DTYPE, KIND)
    bank = biased_bank(fmt, 6)
    (table, _memories), views = two_memories(fmt, bank), fmt.views(bank)
    x, slots, weights = decode_step(shape[0])
    ids = slots.clone()
    ids[1, 1] = 5  # a sixth expert, in host memory
    got = triton_kernels.mlp_at(fmt, x, ids, weights, table)
    biases = (views["gate_up_bias"], views["down_bias"])
    check_kind(got, decode_reference(cls, shape, views, x, ids, weights), biases, 1e-5 if not CUDA else 1e-2)


@pytest.mark.parametrize(("cls", "block"), KIND_CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_the_gemm_computes_biases_and_the_clamped_glu(cls, block):
    """Prefill's grouped GEMM (40 tokens x top-2 over 5 experts, blocks of 16 pairs) with gpt-oss's experts,
    against swiglu.accumulate_pairs."""
    shape = (64, 96, block)
    fmt = make(cls, shape, DTYPE, KIND)
    kernel = triton_kernels.grouped_accumulate
    assert fmt._kernel(_Cuda(), "accumulate") is kernel
    views = fmt.views(biased_bank(fmt))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, shape[0], generator=gen).to(DEVICE, DTYPE)
    tokens = torch.arange(40, device=DEVICE).repeat_interleave(2)
    slots = torch.randint(0, 5, (80,), generator=gen).to(DEVICE)
    weights = torch.rand(80, generator=gen).to(DEVICE, DTYPE)
    got = kernel(fmt, x, tokens, slots, weights, views, torch.zeros_like(x))
    gate_up, down = float32_weights(cls, shape, views, torch.arange(5, device=DEVICE))
    out = torch.zeros_like(x, dtype=torch.float32)

    def reference(kind, biases):
        return accumulate_pairs(
            x.float(), tokens, slots, weights.float(), gate_up, down, out.clone(), kind, biases
        )

    biases = (views["gate_up_bias"], views["down_bias"])
    check_kind(got, reference, biases, 1e-5 if not CUDA else 2e-2)


@pytest.mark.skipif(CUDA, reason="on CUDA every engine test decodes through the compiled kernels")
# gpt-oss resident only: tiered takes 45 s more in the interpreter, to read its slots as the bank is read
@pytest.mark.parametrize(("experts", "tiered"), [("bf16", True), ("int4", True), ("gpt-oss mxfp4", False)])
def test_the_engine_decodes_through_the_kernels_as_through_torch(
    monkeypatch, tiny_checkpoint, tmp_path, experts, tiered
):
    """The whole engine with the formats' decode kernels forced on the CPU (Triton's interpreter):
    resident and tiered, the tokens of the torch path. gpt-oss: its experts' biases and clamped GLU, as
    its checkpoints lay them out (fused, gate and up interleaved), in MXFP4."""
    from tiermoe import LLM, SamplingParams
    from tiermoe.convert import convert, writer_for
    from tiermoe.formats.base import ExpertFormat

    if experts == "gpt-oss mxfp4":
        two_layers = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
        path = convert(
            tiny_checkpoint("gpt_oss", "fused", **two_layers)[0], tmp_path / "mxfp4", writer_for("mxfp4")
        )
    else:
        path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=2)
    if experts == "int4":
        path = convert(path, tmp_path / "int4", writer_for("int4", group_size=32, scales="rtn"))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompt = [5, 17, 42, 99, 7, 11]
    torch_path = LLM(path, device="cpu", dtype="fp32").generate(prompt, params)[0].token_ids
    kernel = ExpertFormat._kernel
    monkeypatch.setattr(ExpertFormat, "_kernel", lambda self, x, what: kernel(self, _Cuda(), what))
    resident = LLM(path, device="cpu", dtype="fp32")
    assert resident.generate(prompt, params)[0].token_ids == torch_path
    if tiered:
        plan = resident.plan
        llm = LLM(
            path,
            device="cpu",
            dtype="fp32",
            gpu_budget_gib=budget_gib(plan, 5),
        )
        assert llm.generate(prompt, params)[0].token_ids == torch_path


class _Cuda:
    """A stand-in input that says it is on CUDA, so the format picks its kernel (run by the interpreter)."""

    is_cuda = True


@pytest.mark.parametrize(
    ("cls", "shape", "kernel"),
    [
        (Fp8BlockFormat, (64, 40, (16, 16)), triton_kernels.bank_mlp),
        (Nvfp4Format, (64, 32, None), triton_kernels.bank_mlp),
        (Fp8BlockFormat, (64, 40, (16, 16)), triton_kernels.grouped_accumulate),
        (Nvfp4Format, (64, 96, None), triton_kernels.grouped_accumulate),
    ],
    ids=["fp8-gemv", "nvfp4-gemv", "fp8-gemm", "nvfp4-gemm"],
)
def test_e4m3_decoded_from_its_bits_where_the_gpu_cannot_convert_it(monkeypatch, cls, shape, kernel):
    """GPUs before sm_89 (RTX 30 series, A100) have no e4m3 conversion: the kernels decode the bits,
    subnormals included, and compute what the native conversion does."""
    native = gemv_error(cls, shape, kernel) if kernel.__name__.endswith("mlp") else None
    monkeypatch.setattr(triton_kernels, "fp8_native", lambda: False)
    if native is not None:
        got, rel = gemv_error(cls, shape, kernel)
        assert torch.equal(got, native[0]) and rel == native[1]  # exactly what the native conversion gives
    else:
        test_grouped_gemm_matches_the_torch_reference(cls, shape, kernel)
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    finite = ~values.isnan()
    fmt = Fp8BlockFormat(16, 16, torch.float32, (16, 16))  # one expert whose weights are every e4m3 code
    bank = fmt.empty(1, DEVICE)
    views = fmt.views(bank)
    views["gate_up"].view(torch.uint8).view(-1)[:256] = torch.where(finite, codes, torch.zeros_like(codes))
    views["gate_up_scale"].fill_(1.0)
    x = torch.zeros(1, 16, device=DEVICE, dtype=DTYPE)
    table = triton_kernels.slot_table(fmt, views)
    ids = torch.zeros(16, dtype=torch.long, device=DEVICE)
    for col in range(16):  # one-hot inputs read the columns of gate_up's first 16 rows back out
        x.zero_()
        x[0, col] = 1.0
        out = triton_kernels.project(fmt, x, ids[:1], table, "gate_up", 16, 16, 2).sum(2)[0, 0]
        expected = torch.where(finite, values, torch.zeros_like(values)).view(16, 16)[:, col]
        assert torch.equal(out.cpu(), expected), col


@pytest.mark.parametrize("cls", [DenseFormat, Int4Format], ids=lambda c: c.__name__)
def test_a_batched_decode_step_runs_the_grouped_gemm_with_no_host_sync(monkeypatch, cls):
    """Above GATHER_MAX_PAIRS pairs (5 tokens x top-4) a format's mlp on CUDA is the grouped GEMM, whose
    blocks are found on the GPU: graph-safe up to GROUPED_MAX_PAIRS, where it was the per-expert loop
    (a host sync a layer) before. Same result as torch's."""
    from tiermoe.formats.swiglu import GROUPED_MAX_PAIRS

    fmt = make(cls, (64, 32, 16 if cls is Int4Format else None), DTYPE)
    assert fmt.graph_safe(20, "cuda") and fmt.graph_safe(GROUPED_MAX_PAIRS, "cuda")
    assert not fmt.graph_safe(20, "cpu") and not fmt.graph_safe(GROUPED_MAX_PAIRS + 1, "cuda")
    assert fmt.graph_safe(16, "cpu")
    views = random_bank(fmt, DEVICE, 6, 0.05)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 64, generator=gen).to(DEVICE, DTYPE)
    slots = torch.randint(0, 6, (5, 4), generator=gen).to(DEVICE)
    weights = torch.rand(5, 4, generator=gen).to(DEVICE, DTYPE)
    with monkeypatch.context() as torch_only:  # torch's path, also on CUDA
        torch_only.setattr(type(fmt), "_kernel", lambda self, x, what: None)
        want = fmt.mlp(x, slots, weights, views)
    # bf16 on CUDA: torch's path and the scatter-add below round each pair to bf16 before adding, the
    # decode sum once.
    tol = {"rtol": 1e-4, "atol": 1e-4} if not CUDA else {"rtol": 2e-2, "atol": 2e-3}
    calls = []

    def spy(*args):
        calls.append(args)
        return triton_kernels.grouped_mlp(*args)

    monkeypatch.setattr(type(fmt), "_kernel", lambda self, x, what: spy if what == "grouped" else None)
    got = fmt.mlp(x, slots, weights, views)
    assert len(calls) == 1
    torch.testing.assert_close(got.float(), want.float(), **tol)
    # The same as the scatter-add of the prefill path, each token's pairs summed in place instead.
    tokens = torch.arange(5, device=DEVICE).repeat_interleave(4)
    grouped = triton_kernels.grouped_accumulate
    scattered = grouped(fmt, x, tokens, slots.reshape(-1), weights.reshape(-1), views, torch.zeros_like(x))
    torch.testing.assert_close(got.float(), scattered.float(), **tol)


@pytest.mark.parametrize("cls", [DenseFormat, Int4Format], ids=lambda c: c.__name__)
def test_waves_pairs_added_apart_give_the_bits_of_one_grouped_mlp(monkeypatch, cls):
    """The copy path's waves (each with the others' pairs at slot -1) add their pairs' outputs apart and
    sum them once at the end: exactly one mlp over all the pairs, as the resident path computes it (a
    skipped pair is exactly 0, and a pair's row does not depend on the other rows of its block)."""
    from tiermoe.formats.base import ExpertFormat
    from tiermoe.formats.swiglu import GROUPED_MAX_PAIRS

    fmt = make(cls, (64, 32, 16 if cls is Int4Format else None), DTYPE)
    kernel = ExpertFormat._kernel
    monkeypatch.setattr(ExpertFormat, "_kernel", lambda self, x, what: kernel(self, _Cuda(), what))
    views = random_bank(fmt, DEVICE, 6, 0.05)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 64, generator=gen).to(DEVICE, DTYPE)
    slots = torch.randint(0, 6, (5, 4), generator=gen).to(DEVICE)
    weights = torch.rand(5, 4, generator=gen).to(DEVICE, DTYPE)
    first = slots < 3  # wave 1: slots 0-2, wave 2: 3-5
    waves = [fmt.mlp_pairs(x, slots.masked_fill(~w, -1), weights, views) for w in (first, ~first)]
    assert waves[0][~first].abs().max() == 0 and waves[1][first].abs().max() == 0
    summed = (waves[0] + waves[1]).sum(dim=1).to(DTYPE)
    assert torch.equal(summed, fmt.mlp(x, slots, weights, views))  # the format's own mlp: the grouped GEMM
    assert fmt.mlp_pairs(x[:4], slots[:4], weights[:4], views) is None  # 16 pairs: the GEMV's, not grouped
    many = torch.zeros(GROUPED_MAX_PAIRS // 4 + 1, 4, dtype=torch.long, device=DEVICE)  # 4100 pairs
    assert fmt.mlp_pairs(x[:1].expand(len(many), -1), many, many.to(DTYPE), views) is None


@pytest.mark.skipif(CUDA, reason="on CUDA every engine test decodes through the compiled kernels")
@pytest.mark.parametrize("experts", ["bf16", "int4"])
def test_a_batched_engine_step_decodes_through_the_grouped_gemm_as_through_torch(
    monkeypatch, tiny_checkpoint, tmp_path, experts
):
    """Nine sequences at top-2 (18 pairs a layer, above the GEMV's 16): the engine's prefill and decode
    steps run the grouped GEMM (Triton's interpreter) and every sequence gets the tokens torch's path gives
    it."""
    from tiermoe import LLM, SamplingParams
    from tiermoe.convert import convert, writer_for
    from tiermoe.formats.base import ExpertFormat

    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=2)
    if experts == "int4":
        path = convert(path, tmp_path / "int4", writer_for("int4", group_size=32, scales="rtn"))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [[5 + i, 17, 42 + 3 * i, 99, 7, 11 - i] for i in range(9)]
    torch_path = [o.token_ids for o in LLM(path, device="cpu", dtype="fp32").generate(prompts, params)]
    kernel, grouped, calls = ExpertFormat._kernel, triton_kernels.grouped_mlp, []

    def counted(fmt, x, slots, *rest):
        calls.append(slots.numel())
        return grouped(fmt, x, slots, *rest)

    monkeypatch.setattr(ExpertFormat, "_kernel", lambda self, x, what: kernel(self, _Cuda(), what))
    monkeypatch.setattr(triton_kernels, "grouped_mlp", counted)
    got = [o.token_ids for o in LLM(path, device="cpu", dtype="fp32").generate(prompts, params)]
    # the prefill's layers (9 prompts of 6 tokens x top-2) and every decode step's (9 sequences x top-2)
    assert set(calls) == {108, 18}
    assert got == torch_path


@pytest.mark.skipif(
    CUDA, reason="the interpreter against a model of the rule; on a GPU the store's tests run it"
)
@pytest.mark.parametrize("seed", range(60))
def test_staging_follows_its_rule_on_random_layers(seed):
    """_plan_stage against a plain model of its rule, on random layers (sizes, slots held, pairs with
    repeats, hits and misses, candidates free, routed or held, lists shorter than the misses, with and
    without admission): the addresses read, the table and the owners after, the bytes each pair reads, and
    no staging row written but a miss's first pair's. From a review's randomised check."""
    import random

    rng = random.Random(seed)
    experts, slots = rng.choice([(8, 4), (16, 6), (40, 12), (128, 24)])
    row_bytes = 4 * rng.choice([4, 16])
    host = torch.randint(
        0, 256, (experts, row_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    host_addr = [host[e].data_ptr() for e in range(experts)]
    pool, staging = (
        torch.zeros(slots, row_bytes, dtype=torch.uint8),
        torch.zeros(16, row_bytes, dtype=torch.uint8),
    )
    lo, st = pool.data_ptr(), staging.data_ptr()
    owner, table = [-1] * slots, list(host_addr)
    held = rng.sample(range(experts), k=rng.randint(0, min(slots, experts)))
    for slot, e in zip(rng.sample(range(slots), k=len(held)), held, strict=True):
        owner[slot], table[e] = e, lo + slot * row_bytes
        pool[slot].copy_(host[e])
    n = rng.randint(1, 16)
    ids = [rng.choice(list(range(rng.choice([3, 6, experts]))) + held) for _ in range(n)]
    width = rng.choice([16, 32])
    candidates = rng.sample(range(slots), k=rng.randint(0, min(slots, width)))
    candidates += [-1] * (width - len(candidates))
    admit = rng.random() < 0.8
    # the rule: each missed expert copied once, by its first pair; misses take the candidates, in order,
    # whose expert this step does not route; the rest go to their first pair's staging row
    want_table, want_owner, first = list(table), list(owner), {}
    for p, e in enumerate(ids):
        first.setdefault(e, p)
    misses = [e for e in first if not lo <= table[e] < lo + slots * row_bytes]
    usable = [s for s in candidates if s >= 0 and owner[s] not in set(ids)] if admit else []
    placed = {e: st + first[e] * row_bytes for e in misses}
    for e, slot in zip(misses, usable, strict=False):
        if want_owner[slot] >= 0:
            want_table[want_owner[slot]] = host_addr[want_owner[slot]]
        want_table[e] = placed[e] = lo + slot * row_bytes
        want_owner[slot] = e
    t, o = torch.tensor(table), torch.tensor(owner)
    args = (torch.tensor(host_addr), torch.tensor(candidates), o) if admit else None
    shape = rng.choice([(n,), (1, n)])
    got = triton_kernels.stage(t, torch.tensor(ids).view(shape), pool, staging, args).tolist()
    assert got == [placed.get(e, table[e]) for e in ids]
    assert t.tolist() == want_table and o.tolist() == want_owner
    for address, e in zip(got, ids, strict=True):
        memory, base = (pool, lo) if lo <= address < lo + pool.numel() else (staging, st)
        assert torch.equal(memory[(address - base) // row_bytes], host[e])
    written = {(a - st) // row_bytes for a in placed.values() if st <= a < st + staging.numel()}
    assert not staging[[r for r in range(16) if r not in written]].any()


def test_sum_rows_adds_each_tokens_rows_in_order_and_casts():
    x = torch.randn(3, 5, 700, device=DEVICE)
    expected = x[:, 0] + x[:, 1] + x[:, 2] + x[:, 3] + x[:, 4]  # in order, in float32
    assert torch.equal(triton_kernels.sum_rows(x, torch.float32), expected)
    got = triton_kernels.sum_rows(x, torch.bfloat16)  # the interpreter truncates where a GPU rounds
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=0)
    assert triton_kernels.sum_rows(x[:0], torch.float32).shape == (0, 700)
