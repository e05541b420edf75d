"""HF peers run in a child process on a synth checkpoint, report consistent figures, and turn every
failure into a recorded error."""

import json
import statistics

import pytest
import torch

from tiermoe.bench import peers
from tiermoe.bench.measure import run_isolated
from tiermoe.bench.presets import get_preset
from tiermoe.bench.synth import synth_checkpoint
from tiermoe.bench.workload import Workload, median_figures, random_prompts


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    synth_checkpoint("tiny-qwen3-moe", path, progress=False)
    return path


@pytest.mark.slow  # over 4 s on CI's 2 cores
def test_hf_peer_reports_consistent_figures(tiny_dir):
    workload = Workload(prompt_len=12, gen_len=6, batch=2, repeat=2)
    result = run_isolated("hf", tiny_dir, workload, timeout_s=300)
    assert result["error"] is None, result
    samples = result["samples"]
    assert len(samples) == 2
    for s in samples:
        assert s["ttft_s"] > 0
        assert s["prefill_tok_s"] == pytest.approx(2 * 12 / s["ttft_s"])
        assert s["decode_tok_s"] > 0
    assert result["decode_tok_s"] == pytest.approx(statistics.median(s["decode_tok_s"] for s in samples))
    assert result["ttft_s"] == pytest.approx(statistics.median(s["ttft_s"] for s in samples))
    # A process that imported torch and transformers holds a few hundred MiB, not tens of GiB.
    assert 0.1 < result["peak_host_gib"] < 8
    if not torch.cuda.is_available():
        assert result["peak_gpu_gib"] == 0.0
    assert result["load_s"] > 0


@pytest.mark.slow  # over 4 s on CI's 2 cores
def test_failures_become_errors(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(get_preset("tiny-olmoe").config))  # no weights
    result = run_isolated("hf", broken, Workload(4, 2, 1, 1), timeout_s=300)
    assert "Error" in result["error"]
    assert run_isolated("hf", tiny_dir, Workload(4, 2, 1, 1), timeout_s=0.2) == {
        "error": "timed out after 0.2 s"
    }


def test_skip_reasons():
    if torch.cuda.is_available():
        assert "needs a GPU cap" in peers.skip_reason("hf-offload", "unused", None)
        assert peers.skip_reason("hf-offload", "unused", 4.0) is None
    else:
        assert "no CUDA device" in peers.skip_reason("hf-offload", "unused", 4.0)
        # Without CUDA, hf runs on the CPU whatever the model's size.
        assert peers.skip_reason("hf", "unused", None) is None
    skipped = run_isolated("hf-offload", "unused", Workload(4, 2), gpu_budget_gib=None)
    assert skipped["error"].startswith("skipped: ")


def test_prompts_are_seeded_and_in_vocab():
    w = Workload(prompt_len=32, gen_len=1, batch=3, seed=5)
    a, b = random_prompts(512, w), random_prompts(512, w)
    assert a == b and len(a) == 3 and all(len(p) == 32 for p in a)
    assert all(0 <= t < 512 for p in a for t in p)
    assert a != random_prompts(512, Workload(32, 1, 3, seed=6))
    with pytest.raises(ValueError):
        Workload(prompt_len=0, gen_len=1)


def test_median_figures_take_the_worst_peak():
    samples = [
        {"ttft_s": 1.0, "prefill_tok_s": 10, "decode_tok_s": 5, "peak_gpu_gib": 2.0, "peak_host_gib": 1.0},
        {"ttft_s": 3.0, "prefill_tok_s": 30, "decode_tok_s": 9, "peak_gpu_gib": 4.0, "peak_host_gib": 1.5},
        {"ttft_s": 2.0, "prefill_tok_s": 20, "decode_tok_s": 7, "peak_gpu_gib": 3.0, "peak_host_gib": None},
    ]
    assert median_figures(samples) == {
        "ttft_s": 2.0,
        "prefill_tok_s": 20,
        "decode_tok_s": 7,
        "peak_gpu_gib": 4.0,
        "peak_host_gib": 1.5,
    }


@pytest.mark.gpu
def test_hf_is_skipped_when_the_model_cannot_fit(tmp_path):
    config = get_preset("mixtral-8x7b").config
    config["num_hidden_layers"] *= 4  # 348 GiB of bf16: beyond any one GPU (Mixtral's 87 fit an H200)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "does not fit the GPU" in peers.skip_reason("hf", str(tmp_path), None)


@pytest.mark.gpu
def test_hf_offload_runs_under_a_cap(tiny_dir):
    result = run_isolated("hf-offload", tiny_dir, Workload(8, 4, 1, 1), gpu_budget_gib=0.0003, timeout_s=300)
    assert result["error"] is None, result
    assert result["decode_tok_s"] > 0
    assert "cpu" in result["placement"]


def test_hf_peer_builds_a_checkpoint_whose_experts_live_in_memory(tmp_path):
    from tiermoe.bench.peers import _load
    from tiermoe.bench.synth import synth_checkpoint

    synth_checkpoint("tiny-qwen3-moe", tmp_path / "m", progress=False, experts_in_memory=True)
    model = _load("hf", str(tmp_path / "m"), None, None, str(tmp_path))
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert abs(experts.float().std().item() - 0.02) < 0.002
    rotary = model.model.rotary_emb
    assert torch.isfinite(rotary.inv_freq).all() and rotary.inv_freq[0].item() == 1.0
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
