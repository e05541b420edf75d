"""The kernel bench's measurement on the CPU (the GPU run is `python -m tiermoe.bench.kernels`): it runs
each format's decode path and its error against the float32 reference is the format's, not the bench's."""

from __future__ import annotations

import torch

from tiermoe.bench.kernels import measure
from tiermoe.formats.dense import DenseFormat
from tiermoe.formats.int4 import Int4Format


def test_measure_reports_bytes_speed_and_error():
    dense = measure(DenseFormat(128, 64, torch.float32), 4, device="cpu", iters=3)
    int4 = measure(Int4Format(128, 64, torch.float32, 32), 4, device="cpu", iters=3)
    assert (
        dense["bytes_read"] == 4 * 3 * 128 * 64 * 4
        and int4["bytes_read"] == 4 * Int4Format(128, 64, torch.float32, 32).nbytes
    )
    assert dense["rel_error"] < 1e-6 and int4["rel_error"] < 1e-5  # the same computation in float32
    assert dense["gb_s"] > 0 and int4["ms_per_layer"] > 0
