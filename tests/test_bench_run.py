"""`tiermoe bench` end to end on a tiny synth model on the CPU: valid JSON with every key, and a PNG."""

import argparse
import json
import shlex
import sys

import pytest

from tiermoe.bench import run
from tiermoe.bench.presets import get_preset
from tiermoe.bench.report import RUN_KEYS, plot_runs
from tiermoe.bench.shapes import checkpoint_size
from tiermoe.bench.synth import synth_checkpoint
from tiermoe.bench.workload import Workload
from tiermoe.errors import InvalidRequestError
from tiermoe.hardware import GIB

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_command_end_to_end(tmp_path, monkeypatch):
    model = tmp_path / "tiny"
    synth_checkpoint("tiny-olmoe", model, progress=False)
    argv = [
        "bench", "--model", str(model), "--gpu-budget", "none", "--prompt-len", "16", "--gen-len", "6",
        "--batch", "2", "--repeat", "2", "--peers", "hf,hf-offload", "--peer-gen-len", "4",
        "--out-dir", str(tmp_path / "results"), "--name", "t",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["/venv/bin/tiermoe", *argv])
    parser = argparse.ArgumentParser()
    run.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.func(args) == 0

    data = json.loads((tmp_path / "results" / "t.json").read_text())
    runs = {r["engine"]: r for r in data["runs"]}
    assert [r["engine"] for r in data["runs"]] == ["tiermoe", "hf", "hf-offload"]
    assert all(set(RUN_KEYS) <= set(r) for r in data["runs"])
    # Without a cap (and, on CPU, without a GPU) hf-offload is recorded as skipped, with the reason.
    assert runs["hf-offload"]["error"].startswith("skipped: ") and runs["hf-offload"]["decode_tok_s"] is None
    for r in (runs["tiermoe"], runs["hf"]):
        assert r["error"] is None, r["error"]
        assert (r["model_preset"], r["experts_dtype"], r["batch"], r["prompt_len"]) == (
            "tiny-olmoe",
            "bf16",
            2,
            16,
        )
        assert r["gpu_budget_gib"] is None and r["pcie_floor_tok_s"] is None
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and 0 < r["ttft_s"] < 60
        assert 0.05 < r["peak_host_gib"] < 8
        assert r["command"] == shlex.join(["tiermoe", *argv])
        assert r["git_rev"] and r["torch_version"] and r["device"] and r["date"].startswith("20")
        assert len(r["samples"]) == 2
    assert runs["tiermoe"]["gen_len"] == 6 and runs["tiermoe"]["repeat"] == 2
    assert runs["hf"]["gen_len"] == 4 and runs["hf"]["gen_len_requested"] == 6
    assert isinstance(runs["tiermoe"]["experts"], dict)

    png = (tmp_path / "results" / "t.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_pcie_floor_of_a_capped_run():
    cfg = get_preset("olmoe-1b-7b").config
    dense_only = checkpoint_size(cfg).dense_bytes / GIB
    per_token = 8 * 16 * 3 * 2048 * 1024 * 2  # every active expert misses
    assert run.pcie_floor(cfg, dense_only, 1, 50.0) == pytest.approx(50e9 / per_token)
    assert run.pcie_floor(cfg, None, 1, 50.0) is None
    assert run.pcie_floor(cfg, 4.0, 1, None) is None


def test_settings_pair_engines_with_budgets_and_variants():
    lru, lfu_off = {"eviction": "lru", "prefetch": True}, {"eviction": "lfu", "prefetch": False}
    assert run.parse_variants("lru,lfu+noprefetch") == [lru, lfu_off]
    assert run.parse_variants(None) == [lfu_off]  # the engine's defaults
    assert run._settings([4.0, None], ["hf", "hf-offload"], [lru, lfu_off]) == [
        ("tiermoe", 4.0, lru),
        ("tiermoe", 4.0, lfu_off),
        ("tiermoe", None, lru),  # uncapped: nothing moves, one variant is enough
        ("hf", None, None),
        ("hf-offload", 4.0, None),
    ]
    assert run._settings([None], ["hf-offload"], [lru]) == [
        ("tiermoe", None, lru),
        ("hf-offload", None, None),
    ]
    with pytest.raises(InvalidRequestError, match="POLICY or POLICY\\+noprefetch"):
        run.parse_variants("lru+fast")


def test_argument_parsing_and_errors(tmp_path):
    assert run.parse_budgets(["4,none", "8"]) == [4.0, None, 8.0]
    assert run.parse_budgets(None) == [None]
    assert run.parse_peers("hf, hf-offload") == ["hf", "hf-offload"]
    assert run.parse_peers("") == []
    with pytest.raises(InvalidRequestError, match="GiB numbers or 'none'"):
        run.parse_budgets(["four"])
    with pytest.raises(InvalidRequestError, match=r"unknown peer.*vllm.*peers are: hf, hf-offload"):
        run.parse_peers("hf,vllm")
    with pytest.raises(InvalidRequestError, match=r"no config\.json"):
        run.bench(tmp_path, Workload(4, 2), [None], [])


def test_plot_marks_failed_runs_and_floors(tmp_path):
    base = {"batch": 1, "pcie_floor_tok_s": None, "error": None}
    runs = [
        {**base, "engine": "tiermoe", "gpu_budget_gib": 4.0, "decode_tok_s": 20.0, "pcie_floor_tok_s": 35.0},
        {
            **base,
            "engine": "hf",
            "gpu_budget_gib": None,
            "decode_tok_s": None,
            "error": "skipped: does not fit",
        },
        {**base, "engine": "hf-offload", "gpu_budget_gib": 4.0, "decode_tok_s": 0.4},
    ]
    path = plot_runs(runs, tmp_path / "p.png", "title")
    assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.gpu
def test_bench_on_gpu_with_both_peers_and_a_floor(tmp_path):
    model = tmp_path / "tiny"
    synth_checkpoint("tiny-qwen3-moe", model, progress=False)
    payload = run.bench(model, Workload(16, 6, 2, 1), [0.0003, None], ["hf", "hf-offload"], timeout_s=300)
    runs = {(r["engine"], r["gpu_budget_gib"]): r for r in payload["runs"]}
    assert set(runs) == {("tiermoe", 0.0003), ("tiermoe", None), ("hf", None), ("hf-offload", 0.0003)}
    assert payload["h2d_gb_s"] > 1
    for key in (("tiermoe", None), ("hf", None), ("hf-offload", 0.0003)):
        assert runs[key]["error"] is None, runs[key]["error"]
        assert runs[key]["decode_tok_s"] > 0 and runs[key]["peak_gpu_gib"] > 0
    assert "cpu" in runs[("hf-offload", 0.0003)]["placement"]
    assert runs[("tiermoe", 0.0003)]["pcie_floor_tok_s"] > 0
    assert runs[("tiermoe", None)]["pcie_floor_tok_s"] is None
