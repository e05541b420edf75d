"""tiermoe eval: perplexity over sliding windows equals transformers' loss on the same windows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiermoe import LLM
from tiermoe.cli import main
from tiermoe.errors import InvalidRequestError
from tiermoe.evaluate import perplexity, windows

from .conftest import TOKENIZER

TEXT = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital. "
    "tiermoe runs mixture of experts language models that do not fit in the memory of one graphics card. "
) * 3


def test_windows_score_every_token_but_the_first_once():
    for n, context, stride in [(100, 32, 16), (100, 32, 31), (31, 32, 16), (64, 8, 3)]:
        ws = windows(n, context, stride)
        assert sum(count for *_, count in ws) == n - 1
        assert all(end - begin <= context and count <= end - begin - 1 for begin, end, count in ws)
        ends = [end for _, end, _ in ws]
        assert ends == sorted(set(ends)) and ends[-1] == n


def hf_perplexity(model, ids: list[int], context: int, stride: int) -> float:
    """transformers' perplexity guide: labels -100 except each window's new tokens, loss x their count."""
    nll, count = 0.0, 0
    for begin, end, scored in windows(len(ids), context, stride):
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, : x.shape[1] - scored] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss
        nll += float(loss) * scored
        count += scored
    return math.exp(nll / count)


@pytest.mark.parametrize(("arch", "capped"), [("qwen3_moe", False), ("olmoe", True)])
def test_perplexity_equals_transformers(tiny_checkpoint, arch, capped):
    path, hf = tiny_checkpoint(arch)
    options = {"gpu_budget_gib": 1_300_000 / 2**30} if capped else {}  # about half the experts on the "GPU"
    llm = LLM(path, device="cpu", kv_reserve_tokens=64, **options)
    ids = TOKENIZER.encode(TEXT)
    assert len(ids) > 150
    ours = perplexity(llm, ids, context=48, stride=20)
    ref = hf_perplexity(hf, ids, 48, 20)
    assert ours.tokens_scored == len(ids) - 1
    if capped:
        assert not llm.plan.all_resident and llm.store_stats()["gpu_misses"] > 0
    assert ours.perplexity == pytest.approx(ref, rel=1e-3)
    assert 1 < ours.perplexity < TOKENIZER.vocab_size * 2  # random weights: near-uniform, not absurd


def test_eval_command_prints_and_writes_the_figures(tiny_checkpoint, tmp_path, capsys):
    path, hf = tiny_checkpoint("qwen3_moe")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "ppl.json"
    argv = [
        "eval",
        "--model",
        str(path),
        "--device",
        "cpu",
        "--text",
        str(text),
        "--context",
        "40",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    ids = TOKENIZER.encode(TEXT)
    assert figures["perplexity"] == pytest.approx(hf_perplexity(hf, ids, 40, 20), rel=1e-3)
    assert f"perplexity {figures['perplexity']:.4f}" in capsys.readouterr().out


def test_bad_windows_are_clear_errors(tiny_checkpoint, capsys, tmp_path):
    path, _ = tiny_checkpoint("qwen3_moe")
    llm = LLM(path, device="cpu", kv_reserve_tokens=64)
    with pytest.raises(InvalidRequestError, match="context must be 2 to 64 tokens"):
        perplexity(llm, list(range(10)), context=100)
    with pytest.raises(InvalidRequestError, match="stride"):
        perplexity(llm, list(range(10)), context=8, stride=8)
    assert main(["eval", "--model", str(path), "--device", "cpu", "--text", str(tmp_path / "none.txt")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --text")
