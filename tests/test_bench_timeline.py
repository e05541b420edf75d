"""The timeline's overlap arithmetic on a hand-made Chrome trace (the profiling itself needs a GPU)."""

from __future__ import annotations

import pytest

from tiermoe.bench.timeline import overlap_summary


def event(cat: str, ts: float, dur: float, name: str = "k") -> dict:
    return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "name": name}


def test_overlap_counts_copy_time_under_any_kernel_once():
    trace = {
        "traceEvents": [
            event("kernel", 0, 10),
            event("kernel", 5, 10),  # concurrent with the first: 0..15 once
            event("kernel", 30, 5),
            event("gpu_memcpy", 10, 10, "Memcpy HtoD (Pinned -> Device)"),  # 10..20: 5 under kernels
            event("gpu_memcpy", 32, 10, "Memcpy HtoD (Pinned -> Device)"),  # 32..42: 3 under kernels
            event("gpu_memcpy", 0, 50, "Memcpy DtoH (Device -> Pinned)"),  # not a host-to-device copy
            {"ph": "i", "cat": "kernel", "ts": 1},  # an instant: no duration
        ]
    }
    s = overlap_summary(trace)
    assert s["kernel_us"] == 20 and s["h2d_copy_us"] == 20 and s["h2d_overlapped_us"] == 8
    assert s["h2d_overlap_share"] == pytest.approx(0.4)
    assert overlap_summary({"traceEvents": []})["h2d_overlap_share"] is None
