"""Missed experts computed on the CPU: the split follows the measured costs, CPU-computed experts give
the outputs GPU-resident ones give in every format, and the engine's tokens do not change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiermoe import LLM, SamplingParams
from tiermoe.formats.dense import DenseFormat
from tiermoe.formats.fp4 import Nvfp4Format
from tiermoe.formats.fp8 import Fp8BlockFormat
from tiermoe.formats.int4 import Int4Format
from tiermoe.formats.mxfp4 import Mxfp4Format
from tiermoe.models.experts import ExpertKind
from tiermoe.offload import cpu_compute
from tiermoe.offload.cpu_compute import MissCosts

from .conftest import budget_gib

US = 1e-6


def costs(stream_us: float, cpu_us: float, token_us: float = 0.0, layer_us: float = 0.0) -> MissCosts:
    return MissCosts(stream_us * US, cpu_us * US, token_us * US, layer_us * US)


def test_the_split_follows_the_costs():
    misses = {3: 1, 7: 1, 9: 1, 12: 1}
    assert cpu_compute.split(misses, costs(stream_us=100, cpu_us=10)) == set(misses)
    assert cpu_compute.split(misses, costs(stream_us=10, cpu_us=100)) == set()
    # Equal costs: two each way finish both queues at 200 us.
    assert len(cpu_compute.split(misses, costs(stream_us=100, cpu_us=100))) == 2
    # The CPU twice as fast: it takes the share that ends both queues together (3 x 50 vs 1 x 100).
    assert len(cpu_compute.split(misses, costs(stream_us=100, cpu_us=50))) == 3
    # A fixed per-layer cost on the CPU's side tips one expert back to the stream.
    assert len(cpu_compute.split(misses, costs(stream_us=100, cpu_us=50, layer_us=60))) == 2
    # An expert many tokens chose costs the CPU more; copies already in flight delay the stream.
    heavy = cpu_compute.split({1: 8, 2: 1}, costs(stream_us=100, cpu_us=60, token_us=20))
    assert heavy == {2}
    assert cpu_compute.split({1: 1}, costs(stream_us=100, cpu_us=150), stream_busy_s=100 * US) == {1}


GPT_OSS = ExpertKind(bias=True, limit=0.5, alpha=1.702)  # a low limit, so that the clamp bites
FORMATS = [
    DenseFormat(64, 40, torch.float32),
    DenseFormat(64, 40, torch.bfloat16),
    Int4Format(64, 32, torch.float32, 16),
    Fp8BlockFormat(64, 40, torch.float32, (16, 16)),
    Nvfp4Format(64, 32, torch.float32),
    Mxfp4Format(64, 32, torch.float32),
    DenseFormat(64, 40, torch.float32, kind=GPT_OSS),  # gpt-oss's experts: biases and the clamped GLU
    Mxfp4Format(64, 32, torch.float32, kind=GPT_OSS),
]


def int8_inputs() -> bool:
    """Whether the compiled kernel takes 4-bit experts' inputs in int8 (every build with AVX2 or AVX-512)."""
    from tiermoe.offload import cpu_kernels

    return cpu_kernels.status().startswith("compiled") and cpu_kernels.status() != "compiled (none)"


@pytest.mark.parametrize(
    "fmt", FORMATS, ids=lambda f: f"{f.name}-{f.dtype}{'-gpt-oss' if f.kind.bias else ''}"
)
def test_cpu_computed_experts_match_the_resident_ones_in_every_format(fmt):
    """Three tokens, top-2 of four experts, half the pairs' experts given to the CPU one by one from
    their own bytes: the sum matches the format's mlp over the whole bank."""
    bank = fmt.empty(4)
    g = torch.Generator().manual_seed(0)
    for s in range(4):
        fmt.fill_random(bank[s], g, 0.05)
    if fmt.kind.bias:  # fill_random leaves them 0
        for name in ("gate_up_bias", "down_bias"):
            v = fmt.views(bank)[name]
            v.copy_(torch.randn(v.shape, generator=g))
    x = torch.randn(3, fmt.hidden, generator=g).to(fmt.dtype)
    ids = torch.tensor([[0, 2], [2, 3], [1, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]], dtype=fmt.dtype)
    expected = fmt.mlp(x, ids, weights, fmt.views(bank))
    pairs: dict[int, tuple[list[int], list[float]]] = {}
    for t in range(3):
        for k in range(2):
            tokens, w = pairs.setdefault(int(ids[t, k]), ([], []))
            tokens.append(t)
            w.append(weights[t, k].item())
    got = cpu_compute.compute(fmt, x, pairs, {e: bank[e] for e in range(4)})
    tol = 2e-2 if fmt.dtype == torch.bfloat16 else 1e-5  # bf16: different summation orders
    if isinstance(fmt, Int4Format) and int8_inputs():
        tol = 1.5e-2  # int8 inputs (see the 4-bit kernel's test)
    assert (got.float() - expected.float()).abs().max() <= tol * expected.float().abs().max()


def test_costs_are_measured_with_real_experts_per_expert():
    fmt = DenseFormat(256, 128, torch.float32)
    experts = list(fmt.empty(16).zero_())
    one = cpu_compute.measure(fmt, experts[:1], fmt.empty(1)[0], torch.float32)
    many = cpu_compute.measure(fmt, experts, fmt.empty(1)[0], torch.float32)
    assert 0 < one.stream_s < 0.1 and 0 < one.cpu_s < 0.1 and one.cpu_layer_s > 0 and one.cpu_token_s >= 0
    # Per expert over 16 (these small ones sit in the cache either way): not 16 experts' time.
    assert many.cpu_s < 4 * one.cpu_s
    assert "stream" in one.describe()


def test_a_calls_fixed_cost_is_told_from_an_experts(monkeypatch):
    """On a clock that a call advances by 1 ms and each expert of it by 0.2 ms plus 0.05 ms a token: 0.2 ms
    an expert, 0.05 a further token, and the 1 ms once a layer (with the round trip, 0 on this clock)."""
    clock = [0.0]
    monkeypatch.setattr(cpu_compute.time, "perf_counter", lambda: clock[0])

    def fake(fmt, x, pairs, experts, compiled=True):
        clock[0] += 1e-3 + sum(2e-4 + 5e-5 * (len(tokens) - 1) for tokens, _ in pairs.values())
        return torch.zeros_like(x)

    monkeypatch.setattr(cpu_compute, "compute", fake)
    fmt = DenseFormat(64, 32, torch.float32)
    costs = cpu_compute.measure(fmt, list(fmt.empty(8)), fmt.empty(1)[0], torch.float32)
    assert costs.cpu_s == pytest.approx(2e-4) and costs.cpu_token_s == pytest.approx(5e-5)
    assert costs.cpu_layer_s == pytest.approx(1e-3) and costs.stream_s == 0


def test_the_cpu_is_timed_over_more_experts_than_a_cache_holds():
    qwen3 = 3 * 2048 * 768 * 2  # bytes of one Qwen3-30B-A3B bf16 expert
    assert cpu_compute.timing_experts(qwen3, 6144) * qwen3 >= cpu_compute.COLD_BYTES
    assert cpu_compute.timing_experts(qwen3, 10) == 10 and cpu_compute.timing_experts(2**40, 10) == 1


PROMPT = [5, 17, 42, 99, 7, 11, 120, 64, 3, 200, 31, 8]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe", "per_expert", num_hidden_layers=4)
    return path, LLM(path, device="cpu")


@pytest.mark.parametrize(("cpu_us", "on_cpu"), [(1, True), (1e6, False)])
def test_the_engine_gives_the_same_tokens_with_misses_on_the_cpu(model, cpu_us, on_cpu):
    path, resident = model
    llm = LLM(path, device="cpu", gpu_budget_gib=budget_gib(resident.plan, 2 * 4), cpu_compute=True)
    store = llm.provider
    assert store.cpu_costs is not None  # measured at load
    store.cpu_costs = costs(stream_us=100, cpu_us=cpu_us)
    out = llm.generate(PROMPT, GREEDY)[0]
    assert out.token_ids == resident.generate(PROMPT, GREEDY)[0].token_ids
    s = out.stats.experts
    assert s["cpu_compute"] is True
    if on_cpu:  # every decode miss on the CPU: only the prefill streamed
        assert s["cpu_computed"] > 0 and s["cpu_s"] > 0
        assert s["gpu_misses"] < s["cpu_computed"]
    else:
        assert s["cpu_computed"] == 0 and s["cpu_s"] == 0
    served = s["gpu_hits"] + s["prefetch_hits"] + s["gpu_misses"] + s["cpu_computed"]
    assert s["gpu_hit_rate"] == pytest.approx((s["gpu_hits"] + s["prefetch_hits"]) / served, abs=1e-4)


def test_cpu_compute_needs_the_copy_path():
    from tiermoe.config import EngineConfig
    from tiermoe.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="miss_path copy"):
        EngineConfig(cpu_compute=True, miss_path="in-place")


@pytest.mark.parametrize(("hidden", "inter"), [(64, 40), (72, 37), (40, 16)])
def test_the_compiled_kernel_computes_what_torch_does(monkeypatch, hidden, inter):
    """The CPU share's compiled kernel (bf16 SwiGLU experts) against torch's path: rows in fours and the
    rest one by one (72 inputs: not a multiple of 16; 37: an odd intermediate size), experts of one token
    and of several, every pair's routing weight. Built here: CI has a compiler, so a broken build fails."""
    from tiermoe.offload import cpu_kernels

    assert cpu_kernels.status().startswith("compiled")
    fmt = DenseFormat(hidden, inter, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    experts = {}
    for e in range(5):
        experts[e] = fmt.empty(1)[0]
        fmt.fill_random(experts[e], g, 0.05)
    x = torch.randn(4, hidden, generator=g).to(torch.bfloat16)
    pairs = {0: ([2], [0.7]), 3: ([0, 1, 3], [0.2, 0.5, 0.9]), 4: ([1, 2], [0.3, 0.3])}
    got = cpu_compute.compute(fmt, x, pairs, experts)
    monkeypatch.setattr(cpu_kernels, "kernel", lambda: None)
    want = cpu_compute.compute(fmt, x, pairs, experts)  # torch, in bf16
    assert got.dtype == torch.bfloat16 and want.abs().max() > 0
    assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize(("hidden", "inter", "group"), [(64, 48, 16), (128, 32, -1), (96, 128, 32)])
def test_the_compiled_kernel_computes_4_bit_experts_as_torch_does(monkeypatch, hidden, inter, group, threads):
    """The 4-bit kernel (GPTQ layout, zeros and fp16 scales per group; one group for all inputs too)
    against torch's dequantize-then-matmul, experts of one token and of several. Tasks of 4 blocks of 16
    outputs where they divide a matrix's outputs and leave each thread two tasks (one thread: inter 128,
    hidden 128), of one block elsewhere (inter 48 and 32, hidden 64 and 96; every matrix at 8 threads).
    Plain builds agree to 1e-4; AVX2 and AVX-512 builds take the inputs in int8 (one scale per 8, both
    projections): a review measured 0.75 % of the largest output off (median) and 1.35 % at most over 40
    seeds of these shapes: bound 1.5 %."""
    from tiermoe.offload import cpu_kernels

    assert cpu_kernels.status().startswith("compiled")
    fmt = Int4Format(hidden, inter, torch.float32, group)
    g = torch.Generator().manual_seed(2)
    experts = {}
    for e in range(4):
        experts[e] = fmt.empty(1)[0]
        fmt.fill_random(experts[e], g, 0.05)
    x = torch.randn(3, hidden, generator=g)
    pairs = {1: ([0, 2], [0.6, 0.4]), 3: ([1], [0.9]), 0: ([0, 1, 2], [0.1, 0.2, 0.3])}
    most = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_compute.compute(fmt, x, pairs, experts)
    finally:
        torch.set_num_threads(most)
    monkeypatch.setattr(cpu_kernels, "kernel", lambda: None)
    want = cpu_compute.compute(fmt, x, pairs, experts)  # torch, float32
    assert want.abs().max() > 0
    if int8_inputs():
        assert (got - want).abs().max() <= 1.5e-2 * want.abs().max()
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_the_4_bit_kernel_keeps_precision_beside_outlier_inputs_and_passes_nan_on():
    """int8 inputs beside outliers: four input channels 50x the rest whose weights the model shrank to
    match (here to nothing: their codes at the zero points), so the output rests on their 7 neighbours in
    each row of 8, which one scale per row would leave a few int8 levels (2.3 % of the largest output off,
    measured by a review; 7.9 % at 100x). The residual term of such rows keeps the usual bound. A NaN
    input gives its token NaN, as torch's path does, where int8 codes made it finite garbage."""
    from tiermoe.offload import cpu_kernels

    assert cpu_kernels.status().startswith("compiled")
    hidden, inter, group = 256, 64, 32
    fmt = Int4Format(hidden, inter, torch.float32, group)
    g = torch.Generator().manual_seed(5)
    outliers = [5, 77, 130, 201]
    experts = {}
    for e in range(3):
        experts[e] = fmt.empty(1)[0]
        fmt.fill_random(experts[e], g, 0.05)
        views = fmt.views(experts[e][None])
        qweight, qzeros = (
            views["gate_up_qweight"][0],
            views["gate_up_qzeros"][0],
        )  # [2, H / 8, I], [2, H / G, I / 8]
        for m in range(2):
            for k in outliers:
                for n in range(inter):
                    zero = (int(qzeros[m, k // group, n // 8]) >> (4 * (n % 8))) & 15
                    word = int(qweight[m, k // 8, n]) & ~(15 << (4 * (k % 8))) | zero << (4 * (k % 8))
                    qweight[m, k // 8, n] = word - (1 << 32) if word >= 1 << 31 else word
    x = torch.randn(2, hidden, generator=g)
    x[:, outliers] *= 50
    pairs = {0: ([0, 1], [0.5, 0.5]), 2: ([0], [0.7]), 1: ([1], [0.4])}
    got = cpu_compute.compute(fmt, x, pairs, experts)
    want = cpu_compute.compute(fmt, x, pairs, experts, compiled=False)
    assert want.abs().max() > 0
    assert (got - want).abs().max() <= 1.5e-2 * want.abs().max()
    x[0, 9] = float("nan")
    got = cpu_compute.compute(fmt, x, pairs, experts)
    assert got[0].isnan().all() and got[1].isfinite().all()


def test_the_compiled_kernel_takes_only_what_it_computes():
    """No pairs at all, or an expert no token chose: zeros, as torch's path gives. 4-bit groups that are
    not whole qweight rows (12 inputs) stay on torch's path; the kernel refuses routing it cannot read."""
    from tiermoe.offload import cpu_kernels

    fmt = DenseFormat(64, 48, torch.bfloat16)
    expert = fmt.empty(1)[0]
    fmt.fill_random(expert, torch.Generator().manual_seed(3), 0.05)
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert not cpu_compute.compute(fmt, x, {}, {}).any()
    assert not cpu_compute.compute(fmt, x, {0: ([], [])}, {0: expert}).any()
    assert not cpu_compute.compute(fmt, x, {0: ([], [])}, {0: expert}, compiled=False).any()  # torch's too
    assert cpu_compute._compiled_kind(Int4Format(48, 48, torch.float32, 16), "avx512")
    assert not cpu_compute._compiled_kind(Int4Format(48, 48, torch.float32, 12), "avx512")
    parts = [n for name in ("gate_up", "down") for n in (fmt.part(name).offset, fmt.part(name).nbytes)]
    routing = torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0])
    bf16 = cpu_kernels.kernel().swiglu_bf16
    with pytest.raises(RuntimeError, match="tokens out of range"):
        bf16(x.float(), [expert], parts, 64, 48, routing[0], torch.tensor([5]), routing[2])
    with pytest.raises(RuntimeError, match="a part beyond its expert's bytes"):  # an expert cut short
        bf16(x.float(), [expert[: fmt.nbytes // 2]], parts, 64, 48, *routing)
    with pytest.raises(RuntimeError, match="contiguous uint8"):  # a part's view, not the expert
        bf16(x.float(), [fmt.views(expert[None])["down"][0]], parts, 64, 48, *routing)
    with pytest.raises(RuntimeError, match="part 0 is 12288 bytes in the format, 6144 by the shapes"):
        bf16(x.float(), [expert], parts, 64, 24, *routing)  # an intermediate size the layout does not have
    with pytest.raises(RuntimeError, match="hidden size"):  # hidden states of another model
        bf16(x[:, :32].float().contiguous(), [expert], parts, 64, 48, *routing)


@pytest.mark.slow  # another build of the kernel, about 25 s each
@pytest.mark.parametrize(
    ("simd", "flags"),
    [
        ("avx512", ["-march=native", "-mno-avx512vnni"]),
        ("avx2-vnni", ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"]),
        ("avx2", ["-mavx2", "-mfma", "-mf16c"]),
        ("none", ["-mno-avx2", "-mno-avx512f"]),
    ],
)
def test_the_avx2_and_plain_builds_compute_what_torch_does(tmp_path, simd, flags):
    """The paths of machines without AVX-512 VNNI (Skylake servers), without AVX-512 (desktop CPUs: AVX2,
    with AVX-VNNI from Alder Lake on) and without AVX2 (plain loops), built here: bf16 (plain builds leave
    bf16 to torch) and 4-bit experts against torch's path, on one thread (4-block tasks where they divide
    the outputs) and on eight."""
    from tiermoe.offload import cpu_kernels

    needs = {"avx512": "avx512f", "avx2-vnni": "avx_vnni"}.get(simd)
    if needs and needs not in Path("/proc/cpuinfo").read_text():
        pytest.skip(f"this CPU has no {needs} to run the build on")

    build = cpu_kernels.build(flags, f"tiermoe_cpu_experts_{simd.replace('-', '_')}_test", tmp_path)
    assert build.simd() == simd
    g = torch.Generator().manual_seed(4)
    formats = [
        Int4Format(128, 48, torch.float32, 16),  # gate and up in tasks of one block, down of four (1 thread)
        Int4Format(96, 64, torch.float32, 32),  # gate and up of four (1 thread), down of one
    ]
    for fmt, threads in [
        (f, t)
        for f in ([DenseFormat(72, 48, torch.bfloat16)] if simd != "none" else []) + formats
        for t in (1, 8)
    ]:
        experts = {}
        for e in range(3):
            experts[e] = fmt.empty(1)[0]
            fmt.fill_random(experts[e], g, 0.05)
        x = torch.randn(2, fmt.hidden, generator=g).to(fmt.dtype)
        pairs = {0: ([0, 1], [0.6, 0.4]), 2: ([1], [0.9])}
        most = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = cpu_compute._compute_compiled(build, fmt, x, pairs, experts).float()
        finally:
            torch.set_num_threads(most)
        want = cpu_compute.compute(fmt, x, pairs, experts, compiled=False).float()
        assert want.abs().max() > 0
        assert (got - want).abs().max() <= 2e-2 * want.abs().max(), fmt.name
