"""The timeline's overlap arithmetic on a hand-made Chrome trace (the profiling itself needs a GPU)."""

from __future__ import annotations

import pytest

from tiermoe.bench.timeline import kernel_census, overlap_summary


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


def test_census_counts_launches_a_step_and_ranks_kernels_by_time():
    trace = {
        "traceEvents": [
            event("kernel", 6, 9, "gemv"),  # traces list events by stream, not by time
            event("kernel", 0, 2, "rms_norm"),
            event("kernel", 3, 2, "rms_norm"),
            event("kernel", 20, 1, "rms_norm"),
            event("gpu_memcpy", 0, 50, "Memcpy HtoD (Pinned -> Device)"),  # a copy, not a kernel
        ]
    }
    census = kernel_census(trace, steps=2)
    assert census["kernels_per_step"] == 2
    assert census["top_kernels"] == [
        {"name": "gemv", "launches": 1, "us": 9.0},
        {"name": "rms_norm", "launches": 3, "us": 5.0},
    ]
    assert census["first_launches"] == ["rms_norm", "rms_norm", "gemv", "rms_norm"]  # in time order


def test_start_decoding_leaves_only_decode_steps(tiny_checkpoint):
    from tiermoe import LLM
    from tiermoe.bench.timeline import start_decoding

    llm = LLM(tiny_checkpoint("qwen3_moe")[0], device="cpu", dtype="fp32", prefill_chunk=8)
    # Prompts longer than a prefill chunk: the first token of each comes after several steps.
    prompts = [list(range(5, 25)), list(range(30, 42)), [7, 8, 9]]
    requests = start_decoding(llm.engine, prompts, tokens=3)
    assert all(r.output_ids for r in requests)
    assert min(len(r.output_ids) for r in requests) == 1  # the last one to start: no step more than needed
    for _ in range(3):  # each step now decodes one token of every request
        assert sorted(e.request_id for e in llm.engine.step()) == sorted(r.id for r in requests)
    assert all(not r.finished for r in requests)
    for r in requests:
        llm.engine.abort(r)
    assert not llm.engine.has_unfinished()
