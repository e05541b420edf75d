"""`tiermoe profile`: measure the ceilings the engine lives under, and the decode floor they imply.

A decode step cannot finish before the expert bytes that miss the GPU have crossed PCIe (or, when a
miss is computed on the CPU, before the CPU has streamed those weights from RAM). Measuring the
bandwidths here turns a checkpoint and a budget into the best tok/s any offload engine can reach.
GB are 10^9 bytes, as bandwidths are usually quoted; budgets are GiB.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import EngineConfig
from .offload.budget import MemoryPlan
from .offload.placement import plan_from_config
from .provenance import RESULTS_DIR, run_metadata, timestamp, write_json

GB = 1e9
GIB = 1 << 30
# Expert-sized chunks: one Qwen3-30B-A3B expert is 9.4 MB, an OLMoE expert 12.6 MB, a 4-bit one ~2.5 MB.
H2D_CHUNKS = {"2.5MB": 2_500_000, "9.4MB": 9_400_000, "48MB": 48_000_000, "1GiB": GIB}
QUICK_H2D_CHUNKS = {"2.5MB": 2_500_000, "9.4MB": 9_400_000}


@dataclass
class Measurement:
    """One measured ceiling; value is None when skipped, with the reason in note."""

    name: str
    value: float | None
    unit: str
    note: str = ""


def time_cpu(fn: Callable[[], None], min_s: float) -> float:
    """Seconds per call of fn, after one warm-up call, repeated until min_s has passed."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / calls


def time_cuda(fn: Callable[[], None], iters: int) -> float:
    """Seconds per call measured with CUDA events, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def h2d_bandwidth(chunk_bytes: int, pinned: bool, total_bytes: int = 4 * GIB) -> float:
    """GB/s of host-to-device copies of one chunk size, pinned or pageable source."""
    src = torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)  # touch the pages so the first copy does not pay for faulting them in
    dst = torch.empty(chunk_bytes, dtype=torch.uint8, device="cuda")
    iters = max(3, total_bytes // chunk_bytes)
    return chunk_bytes / time_cuda(lambda: dst.copy_(src, non_blocking=pinned), iters) / GB


def zero_copy_bandwidth(nbytes: int) -> float:
    """GB/s of a kernel reading pinned host memory in place, no copy engine (miss_path in-place's path)."""
    from .formats.triton_kernels import read_in_place

    src = torch.ones(nbytes // 4, dtype=torch.int32, pin_memory=True)
    out = torch.empty_like(src, device="cuda")
    address = torch.tensor([src.data_ptr()], device="cuda")
    return nbytes / time_cuda(lambda: read_in_place(address, out), 10) / GB


def gpu_copy_bandwidth(nbytes: int) -> float:
    """GB/s of device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / time_cuda(lambda: dst.copy_(src), 10) / GB


def gpu_gemm_tflops(n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / time_cuda(lambda: torch.mm(a, b), 20) / 1e12


def cpu_copy_bandwidth(nbytes: int, min_s: float = 0.3) -> float:
    """GB/s of a RAM-to-RAM copy, counting bytes read plus bytes written."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_cpu(lambda: dst.copy_(src), min_s) / GB


CPU_EXPERT_SHAPE = (2048, 768)  # Qwen3-30B-A3B's experts: hidden, intermediate


def cpu_expert_bandwidth(experts: str, compiled: bool, nbytes: int, min_s: float = 0.3) -> float:
    """GB/s of expert bytes the CPU share computes for one token (offload/cpu_compute.compute), 8 experts a
    call as a top-8 layer's misses, over distinct experts of nbytes in all (from RAM, as decode reads
    them): experts "bf16" or "int4" (group 128), with tiermoe's compiled kernel or torch's path."""
    from .formats.dense import DenseFormat
    from .formats.int4 import Int4Format
    from .offload import cpu_compute

    hidden, inter = CPU_EXPERT_SHAPE
    fmt = (
        DenseFormat(hidden, inter, torch.bfloat16)
        if experts == "bf16"
        else Int4Format(hidden, inter, torch.bfloat16, 128)
    )
    count = max(8, nbytes // fmt.nbytes // 8 * 8)
    bank = torch.randint(
        0, 256, (count, fmt.nbytes), dtype=torch.uint8
    )  # the speed does not depend on values
    views = fmt.views(bank)
    for v in views.values():  # finite values where they are floats (bf16 weights, int4 scales)
        if v.is_floating_point():
            v.copy_(torch.randn(v.shape, dtype=torch.float32) * 0.02)
    x = torch.randn(1, hidden, dtype=torch.bfloat16)
    layers = [{e: ([0], [0.125]) for e in range(start, start + 8)} for start in range(0, count, 8)]

    def run():
        for pairs in layers:
            cpu_compute.compute(fmt, x, pairs, {e: bank[e] for e in pairs}, compiled)

    return count * fmt.nbytes / time_cpu(run, min_s) / GB


def cpu_matmul_gflops(n: int, dtype: torch.dtype, min_s: float = 0.3) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return 2 * n**3 / time_cpu(lambda: torch.mm(a, b), min_s) / 1e9


def _read_all(path: Path, chunk_bytes: int, direct: bool) -> float:
    """Seconds to read the whole file in chunk_bytes reads into a page-aligned buffer."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, chunk_bytes)  # anonymous mmap: page aligned, as O_DIRECT requires
    try:
        start = time.perf_counter()
        while os.readv(fd, [buf]) > 0:
            pass
        return time.perf_counter() - start
    finally:
        buf.close()
        os.close(fd)


def disk_bandwidth(directory: str | Path, file_bytes: int, chunk_bytes: int = 16 << 20) -> list[Measurement]:
    """Write a scratch file in `directory` (fsync'd), then read it back with O_DIRECT so the page cache
    is bypassed. Where O_DIRECT is refused (tmpfs, some overlay filesystems) the read is buffered after
    asking the kernel to drop the file's pages, and the note says so."""
    file_bytes = max(chunk_bytes, file_bytes // chunk_bytes * chunk_bytes)
    block = os.urandom(chunk_bytes)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".tiermoe-profile-", delete=False) as f:
        path = Path(f.name)
        start = time.perf_counter()
        for _ in range(file_bytes // chunk_bytes):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        write_s = time.perf_counter() - start
    try:
        where = f"{file_bytes >> 20} MiB file in {directory}"
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        try:
            read_s, note = (
                _read_all(path, chunk_bytes, direct=True),
                f"O_DIRECT, {chunk_bytes >> 20} MiB reads, {where}",
            )
        except OSError as e:
            read_s = _read_all(path, chunk_bytes, direct=False)
            note = f"O_DIRECT unsupported here ({e.strerror}): buffered read after dropping the page cache, {where}"
        return [
            Measurement("disk read", file_bytes / read_s / GB, "GB/s", note),
            Measurement("disk write", file_bytes / write_s / GB, "GB/s", f"buffered + fsync, {where}"),
        ]
    finally:
        path.unlink()


def cpu_expert_measurements(nbytes: int) -> list[Measurement]:
    """The CPU share's speed on Qwen3-30B-A3B's experts, one token, 8 a layer: bf16 through torch and
    through tiermoe's kernel, int4 through the kernel (torch's dequantizing path is 30x slower)."""
    from .offload import cpu_kernels

    status = cpu_kernels.status()
    shape = f"{CPU_EXPERT_SHAPE[0]} x {CPU_EXPERT_SHAPE[1]}, 8 a call, {nbytes >> 20} MiB of distinct experts"
    m = [Measurement("CPU experts bf16, torch", cpu_expert_bandwidth("bf16", False, nbytes), "GB/s", shape)]
    for experts in ("bf16", "int4"):
        label = f"CPU experts {experts}, tiermoe kernel"
        if cpu_kernels.kernel() is None:
            m.append(Measurement(label, None, "GB/s", status))
        else:
            m.append(
                Measurement(
                    label,
                    cpu_expert_bandwidth(experts, True, nbytes),
                    "GB/s",
                    f"{status}; {shape}; {torch.get_num_threads()} threads",
                )
            )
    if cpu_kernels.kernel() is not None:
        m += cpu_thread_scaling(nbytes)
    return m


def thread_counts(most: int) -> list[int]:
    """1, 2, 4, ... below `most`: the thread counts a scaling curve is measured at (`most` is the
    profile's own figure)."""
    return [1 << i for i in range(most.bit_length()) if 1 << i < most]


def cpu_thread_scaling(nbytes: int) -> list[Measurement]:
    """The bf16 and int4 kernels and a RAM copy at fewer threads than torch's: how the CPU share scales
    with cores (16 cores read RAM at 99 GB/s, the bf16 kernel made 47: bench/NOTES.md section 37; the int4
    one 8.7, what one core of the CPU machine does: section 47). Where each thread adds as much as the
    first, the kernel is bound per core (its instructions); where the copy flattens too, by memory."""
    most = torch.get_num_threads()
    m = []
    try:
        for n in thread_counts(most):
            torch.set_num_threads(n)
            for experts in ("bf16", "int4"):
                m.append(
                    Measurement(
                        f"CPU experts {experts}, tiermoe kernel, {n} threads",
                        cpu_expert_bandwidth(experts, True, nbytes),
                        "GB/s",
                    )
                )
            m.append(Measurement(f"CPU copy (read+write), {n} threads", cpu_copy_bandwidth(nbytes), "GB/s"))
    finally:
        torch.set_num_threads(most)
    return m


def profile(quick: bool = False, disk_dir: str | Path = ".") -> list[Measurement]:
    """Every ceiling; GPU ones are skipped with a reason when there is no CUDA device. quick: small
    sizes, for tests and a first look (figures are then lower bounds)."""
    m: list[Measurement] = []
    cuda = torch.cuda.is_available()
    for name, chunk in (QUICK_H2D_CHUNKS if quick else H2D_CHUNKS).items():
        for pinned in (True, False):
            label = f"H2D {'pinned' if pinned else 'pageable'} {name}"
            if cuda:
                m.append(
                    Measurement(label, h2d_bandwidth(chunk, pinned, 256 << 20 if quick else 4 * GIB), "GB/s")
                )
            else:
                m.append(Measurement(label, None, "GB/s", "skipped: no CUDA device"))
    m += disk_bandwidth(disk_dir, (32 << 20) if quick else GIB, (4 << 20) if quick else (16 << 20))
    m.append(Measurement("CPU copy (read+write)", cpu_copy_bandwidth((64 << 20) if quick else GIB), "GB/s"))
    n = 256 if quick else 2048
    m.append(Measurement("CPU matmul fp32", cpu_matmul_gflops(n, torch.float32), "GFLOP/s", f"{n}^3"))
    m.append(Measurement("CPU matmul bf16", cpu_matmul_gflops(n, torch.bfloat16), "GFLOP/s", f"{n}^3"))
    m += cpu_expert_measurements((64 << 20) if quick else (512 << 20))
    if cuda:
        m.append(
            Measurement("GPU copy (read+write)", gpu_copy_bandwidth((64 << 20) if quick else GIB), "GB/s")
        )
        m.append(
            Measurement("zero-copy read pinned", zero_copy_bandwidth((64 << 20) if quick else GIB), "GB/s")
        )
        g = 1024 if quick else 8192
        m.append(Measurement("GPU GEMM bf16", gpu_gemm_tflops(g), "TFLOP/s", f"{g}^3"))
    else:
        m.append(Measurement("GPU copy (read+write)", None, "GB/s", "skipped: no CUDA device"))
        m.append(Measurement("zero-copy read pinned", None, "GB/s", "skipped: no CUDA device"))
        m.append(Measurement("GPU GEMM bf16", None, "TFLOP/s", "skipped: no CUDA device"))
    return m


@dataclass(frozen=True)
class DecodeFloor:
    """Best decode tok/s reachable when the missed expert bytes must cross PCIe (pcie_tok_s), or be
    computed on the CPU from RAM (cpu_tok_s, bound by memory bandwidth or by matmul rate). None: no
    expert misses, so no such bound."""

    missed_bytes_per_token: float
    pcie_tok_s: float | None
    cpu_tok_s: float | None


def decode_floor(
    missed_expert_bytes_per_token: float,
    h2d_gb_s: float | None,
    cpu_mem_gb_s: float | None,
    cpu_gflop_s: float | None = None,
    bytes_per_param: float = 2.0,
) -> DecodeFloor:
    """Floors from the bytes of experts each token misses on the GPU. The CPU path streams the same
    bytes from RAM and spends 2 FLOPs per weight; the slower of the two bounds it."""
    if missed_expert_bytes_per_token <= 0:
        return DecodeFloor(0.0, None, None)
    pcie = h2d_gb_s * GB / missed_expert_bytes_per_token if h2d_gb_s else None
    cpu_bounds = []
    if cpu_mem_gb_s:
        cpu_bounds.append(cpu_mem_gb_s * GB / missed_expert_bytes_per_token)
    if cpu_gflop_s:
        flops_per_token = 2 * missed_expert_bytes_per_token / bytes_per_param
        cpu_bounds.append(cpu_gflop_s * 1e9 / flops_per_token)
    return DecodeFloor(missed_expert_bytes_per_token, pcie, min(cpu_bounds) if cpu_bounds else None)


def uniform_hit_rate(plan: MemoryPlan) -> float:
    """Share of routed experts found in a GPU slot under uniform routing: a layer holding q of its E
    experts finds a uniformly routed expert with chance q/E, whatever the eviction policy."""
    per_layer = plan.total_experts // len(plan.quotas)
    return sum(min(q, per_layer) for q in plan.quotas.values()) / plan.total_experts


def missed_expert_bytes_per_token(
    plan: MemoryPlan, top_k: int, batch: int = 1, hit_rate: float | None = None
) -> float:
    """Expected expert bytes each token must bring over PCIe, given the engine's memory plan and a GPU
    hit rate (None: uniform routing's, from the plan's slots; real routing is skewed, so a good cache
    does better). A batch shares loads: B tokens touch E·(1-(1-k/E)^B) distinct experts per layer,
    which is also what the store counts its hits over."""
    hit = uniform_hit_rate(plan) if hit_rate is None else hit_rate
    layers = len(plan.quotas)
    per_layer = plan.total_experts // layers
    distinct = per_layer * (1 - (1 - top_k / per_layer) ** batch)
    return layers * distinct * plan.expert_bytes * (1 - hit) / batch


@dataclass(frozen=True)
class MeasuredFloor:
    """Best decode tok/s at the expert traffic a run measured. floor_tok_s overlaps the PCIe transfer of
    the missed bytes with the all-resident step (the uncapped run's time per token), so a token takes
    the longer of the two; floor_serial_tok_s adds them (no overlap). None where no term was available."""

    floor_tok_s: float | None
    floor_serial_tok_s: float | None
    floor_note: str


def measured_floor(
    h2d_bytes_per_token: float | None, h2d_gb_s: float | None, resident_s_per_token: float | None
) -> MeasuredFloor:
    """h2d_bytes_per_token: bytes a run moved over PCIe per decoded token; h2d_gb_s: the pinned H2D
    bandwidth measured on the machine; resident_s_per_token: 1 / decode tok/s of the uncapped run."""
    terms, notes = [], []
    if h2d_bytes_per_token is not None and h2d_gb_s:
        terms.append(h2d_bytes_per_token / (h2d_gb_s * GB))
        notes.append(f"PCIe {h2d_bytes_per_token / 1e6:,.2f} MB/token at {h2d_gb_s:.1f} GB/s")
    else:
        why = "no decode H2D bytes" if h2d_bytes_per_token is None else "no H2D bandwidth"
        notes.append(f"no PCIe term ({why})")
    if resident_s_per_token:
        terms.append(resident_s_per_token)
        notes.append(f"all-resident compute {1 / resident_s_per_token:,.1f} tok/s (uncapped run)")
    else:
        notes.append("no all-resident term (no uncapped tiermoe run of this routing that moved no experts)")
    slowest, total = max(terms, default=0.0), sum(terms)
    return MeasuredFloor(
        1 / slowest if slowest > 0 else None, 1 / total if total > 0 else None, "; ".join(notes)
    )


def load_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def _value(measurements: list[Measurement], name: str) -> float | None:
    return next((m.value for m in measurements if m.name == name), None)


def h2d_near(measurements: list[Measurement], nbytes: int) -> tuple[str, float] | None:
    """The pinned H2D measurement whose chunk size is nearest (by ratio) to nbytes, the size the expert
    loader moves at a time, as (chunk label, GB/s); None when none was measured."""
    pinned = {
        m.name.removeprefix("H2D pinned "): m.value for m in measurements if m.name.startswith("H2D pinned ")
    }
    measured = [(label, gb_s) for label, gb_s in pinned.items() if gb_s]
    if not measured:
        return None
    return min(measured, key=lambda item: abs(math.log(H2D_CHUNKS[item[0]] / nbytes)))


def checkpoint_plan(model_dir: str | Path, gpu_budget_gib: float | None, dtype: str | None) -> tuple:
    """(config.json dict, the engine's EngineConfig, its MemoryPlan) for a checkpoint on this machine.
    Raises BudgetError, as the engine would, when the budget cannot run the model."""
    config = load_config(model_dir)
    engine = EngineConfig(gpu_budget_gib=gpu_budget_gib, dtype=dtype)
    return config, engine, plan_from_config(config, engine)


def floor_at(
    plan: MemoryPlan,
    top_k: int,
    batch: int,
    measurements: list[Measurement],
    hit_rate: float | None = None,
    bytes_per_param: float = 2.0,
) -> dict:
    """Missed bytes per token and the PCIe and CPU floors at one GPU hit rate (None: uniform routing's)."""
    h2d = h2d_near(measurements, plan.expert_bytes)
    floor = decode_floor(
        missed_expert_bytes_per_token(plan, top_k, batch, hit_rate),
        h2d[1] if h2d else None,
        _value(measurements, "CPU copy (read+write)"),
        _value(measurements, "CPU matmul bf16"),
        bytes_per_param,
    )
    hit = uniform_hit_rate(plan) if hit_rate is None else hit_rate
    return {"hit_rate": hit, "h2d_chunk": h2d[0] if h2d else None, "h2d_gb_s": h2d[1] if h2d else None,
            **asdict(floor)}  # fmt: skip


def floor_for_checkpoint(
    model_dir: str | Path,
    config: dict,
    engine: EngineConfig,
    plan: MemoryPlan,
    batch: int,
    measurements: list[Measurement],
    hit_rate: float | None = None,
) -> dict:
    """The profile's decode-floor record: the plan, the floor under uniform routing (top-level keys, as
    before) and, when asked, the floor at a given GPU hit rate (`at_hit_rate`)."""
    top_k = int(config["num_experts_per_tok"])
    itemsize = engine.torch_dtype.itemsize
    layers = len(plan.quotas)
    record = {
        "model": str(model_dir),
        "gpu_budget_gib": engine.gpu_budget_gib,
        "batch": batch,
        "dtype": str(engine.torch_dtype).removeprefix("torch."),
        "plan": {
            **{k: v for k, v in asdict(plan).items() if k != "quotas"},
            "slots_per_layer": [min(plan.quotas.values()), max(plan.quotas.values())],
        },
        "expert_bytes_per_token": top_k * layers * plan.expert_bytes,
        "expert_bytes_per_expert": plan.expert_bytes,
        "uniform_hit_rate": uniform_hit_rate(plan),
        **floor_at(plan, top_k, batch, measurements, None, itemsize),
    }
    if hit_rate is not None:
        record["at_hit_rate"] = floor_at(plan, top_k, batch, measurements, hit_rate, itemsize)
    return record


def _floor_line(floor: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:,.2f} tok/s"  # noqa: E731
    return (
        f"GPU hit rate {floor['hit_rate']:.1%}: {floor['missed_bytes_per_token'] / 2**20:,.1f} MiB of experts "
        f"missed per token -> PCIe path {fmt(floor['pcie_tok_s'])}, CPU-compute path {fmt(floor['cpu_tok_s'])}"
    )


def print_floor(console, floor: dict) -> None:
    plan = floor["plan"]
    budget = "engine default" if floor["gpu_budget_gib"] is None else f"{floor['gpu_budget_gib']:g} GiB"
    lo, hi = plan["slots_per_layer"]
    console.print(
        f"decode floor for {floor['model']} at GPU budget {budget}, batch {floor['batch']}, {floor['dtype']}: "
        f"plan: dense {plan['dense_bytes'] / GIB:.2f} GiB + KV {plan['kv_bytes'] / GIB:.2f} GiB + workspace "
        f"{plan['workspace_bytes'] / GIB:.2f} GiB, {plan['gpu_slots']} of {plan['total_experts']} experts "
        f"in GPU slots ({lo}-{hi} per layer)"
    )
    console.print(f"  uniform routing, {_floor_line(floor)}")
    if "at_hit_rate" in floor:
        console.print(f"  given {_floor_line(floor['at_hit_rate'])}")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    # The plan first: a budget the engine would refuse fails here, not after a minute of measuring.
    checkpoint = checkpoint_plan(args.model, args.gpu_budget, args.dtype) if args.model else None
    disk_dir = args.disk_dir or args.model or "."
    measurements = profile(quick=args.quick, disk_dir=disk_dir)
    table = Table(title="tiermoe profile" + (" (quick)" if args.quick else ""))
    for col in ("measurement", "value", "unit", "note"):
        table.add_column(col)
    for m in measurements:
        table.add_row(m.name, "-" if m.value is None else f"{m.value:,.2f}", m.unit, m.note)
    console.print(table)
    payload = {**run_metadata(), "quick": args.quick, "measurements": [asdict(m) for m in measurements]}
    if checkpoint:
        floor = floor_for_checkpoint(args.model, *checkpoint, args.batch, measurements, args.hit_rate)
        payload["decode_floor"] = floor
        print_floor(console, floor)
    out = write_json(args.out or RESULTS_DIR / f"profile-{timestamp()}.json", payload)
    console.print(f"saved {out}")
    return 0


def _hit_rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a hit rate is within [0, 1], got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile")
    p.add_argument("--quick", action="store_true", help="small sizes: seconds instead of a minute")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/profile-<date>.json)")
    p.add_argument("--model", default=None, help="checkpoint directory to compute the decode floor for")
    p.add_argument(
        "--gpu-budget", type=float, default=None, help="GPU budget for the floor, GiB (default: the engine's)"
    )
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together, for the floor")
    p.add_argument(
        "--hit-rate", type=_hit_rate, default=None, help="also the floor at this GPU hit rate (0-1)"
    )
    p.add_argument(
        "--dtype", default=None, help="engine compute dtype for the plan (default: bf16 on cuda, fp32 on cpu)"
    )
    p.add_argument("--disk-dir", default=None, help="where to measure disk reads (default: --model or .)")
    p.set_defaults(func=main)
    return p
