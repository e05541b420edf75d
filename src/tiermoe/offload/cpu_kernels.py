"""The CPU share's compiled kernel (csrc/cpu_experts.cpp): a layer's bf16 or 4-bit SwiGLU experts in three
parallel loops, built on first use by torch's C++ extension loader (a C++ compiler and ninja; about 30 s once,
cached in torch's extensions folder). Where it cannot be built, or with TIERMOE_CPU_KERNELS=0, the CPU share
runs in torch (offload/cpu_compute.py); `status()` says which and why."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "cpu_experts.cpp"
log = logging.getLogger(__name__)


@functools.cache
def _load() -> tuple[object | None, str]:
    if os.environ.get("TIERMOE_CPU_KERNELS", "1") == "0":
        return None, "off (TIERMOE_CPU_KERNELS=0)"
    log.info("loading the CPU kernel (built once for this machine: about 30 s)")
    try:
        # -march=native: the machine that builds it runs it. torch's build cache is keyed by the sources and
        # flags, not the CPU, so the name carries the CPU's: a home folder shared with another CPU (NFS, a
        # copied container) gets a build of its own instead of one that dies on an unknown instruction.
        module = build(["-march=native"], f"tiermoe_cpu_experts_{_cpu_key()}")
        return module, f"compiled ({module.simd()})"
    except Exception as e:  # no compiler, no ninja, no Python headers: torch's path instead
        reason = str(e).strip().splitlines()
        status = f"not built ({type(e).__name__}: {reason[0] if reason else 'no message'})"
        log.warning("CPU kernel %s: the CPU share runs in torch", status)
        return None, status


def build(target: list[str], name: str, folder: Path | None = None):
    """The kernel compiled for `target` (compiler flags naming the instruction sets, e.g. -march=native,
    or -mavx2 -mfma -mf16c to build a machine's fallback path), under `name` (in `folder`, or torch's
    extensions folder)."""
    from torch.utils.cpp_extension import load

    flags = ["-O3", *target, "-fopenmp"]
    where = {"build_directory": str(folder)} if folder else {}
    return load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False, **where)


def _cpu_key() -> str:
    """A short hash of this CPU's model and instruction-set flags (/proc/cpuinfo; the platform elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text = "\n".join(
            sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))})
        )
    except OSError:
        text = platform.processor() or platform.machine()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def kernel():
    """The compiled module (swiglu_bf16, swiglu_int4, simd), or None."""
    return _load()[0]


def status() -> str:
    """'compiled (avx512-vnni|avx512|avx2|none)', or why the CPU share runs in torch."""
    return _load()[1]
