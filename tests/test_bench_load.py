"""The load test against the real server (a tiny model on the CPU, a few seconds)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")

from tiermoe import LLM
from tiermoe.bench import load
from tiermoe.demo import write_random_checkpoint
from tiermoe.server.app import create_app
from tiermoe.server.serve import serving


def test_percentiles_interpolate():
    assert load.percentile([], 0.5) is None and load.percentile([3.0], 0.99) == 3.0
    assert load.percentile([float(i) for i in range(101)], 0.5) == pytest.approx(50, abs=0.1)
    assert load.percentile([float(i) for i in range(101)], 0.99) == pytest.approx(99, abs=0.2)


@pytest.mark.slow  # about 10 s on CI's 2 cores
def test_concurrent_streaming_clients_all_complete_with_their_token_counts(tmp_path, capsys):
    path = write_random_checkpoint(tmp_path / "tiny-qwen3-moe")
    llm = LLM(path, device="cpu", dtype="fp32", max_model_len=512, gpu_budget_gib=0.02)
    with serving(create_app(llm)) as url:
        argv = ["--url", url, "--model", llm.model_name, "--clients", "6", "--duration-s", "4"]
        argv += ["--prompt-words", "8", "--max-tokens", "8", "--out-dir", str(tmp_path / "results")]
        assert load.main(argv) == 0
    (result_file,) = (tmp_path / "results").glob("load-*.json")
    r = json.loads(result_file.read_text())
    assert r["failed"] == 0 and r["completed"] >= 6 and r["completion_tokens"] == 8 * r["completed"]
    assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 < r["itl_p50_s"] <= r["itl_p99_s"]
    assert r["server_rss_bytes"] and all(b > 1e7 for _, b in r["server_rss_bytes"])
    assert r["command"].startswith("python -m tiermoe.bench.load --url") and r["git_rev"]
    assert "0 failed" in capsys.readouterr().out
