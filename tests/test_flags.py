"""The engine flags are generated from EngineConfig: one flag per setting, its default the field's own."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from tiermoe.config import EngineConfig
from tiermoe.flags import add_engine_args, engine_kwargs


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p.parse_args(["--model", "m", *argv])


def test_no_flags_keep_every_default():
    assert EngineConfig(**engine_kwargs(parse())) == EngineConfig(show_progress=True)


def test_every_setting_has_a_flag_with_its_units():
    args = parse(
        "--gpu-budget", "8", "--cpu-budget", "64", "--workspace", "0.5", "--kv-reserve-tokens", "1024",
        "--eviction", "lru", "--prefetch", "--no-cuda-graphs", "--routing", "uniform", "--routing-seed", "3",
        "--record-routing", "t.npz", "--prefetch-accuracy", "0.5", "--prefill-chunk", "512",
        "--max-model-len", "2048", "--device", "cpu", "--dtype", "fp32",
    )  # fmt: skip
    config = EngineConfig(**engine_kwargs(args))
    assert (config.gpu_budget_gib, config.cpu_budget_gib, config.workspace_gib) == (8.0, 64.0, 0.5)
    assert (config.kv_reserve_tokens, config.eviction, config.prefetch, config.cuda_graphs) == (
        1024,
        "lru",
        True,
        False,
    )
    assert (config.routing, config.routing_seed, config.record_routing) == ("uniform", 3, "t.npz")
    assert (config.prefetch_accuracy, config.prefill_chunk, config.max_model_len) == (0.5, 512, 2048)
    given = {f.name for f in fields(EngineConfig)} - {"show_progress"}
    assert given <= set(vars(args))


def test_choices_come_from_the_registry():
    with pytest.raises(SystemExit):
        parse("--eviction", "fifo")
