"""The shipped demo MoE (tiermoe/data/demo-moe): it loads offline, matches transformers, has learnt its
text, and `tiermoe demo` writes real words with it.

Held-out text: docs/demo-model/heldout_*.txt, the files scripts/train_demo.py kept out of training.
"""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path

import pytest
import torch

from tiermoe import LLM
from tiermoe.cli import main
from tiermoe.demo import trained_checkpoint
from tiermoe.evaluate import perplexity

from .test_evaluate import hf_perplexity
from .test_models import REL_TOL, hf_logits, our_logits, rel_err

HELD_OUT = Path(__file__).resolve().parents[1] / "docs" / "demo-model"
SCORED_TOKENS = 8192  # of each held-out text: ~2 s of CPU each
# Perplexity bounds on those tokens. The model measured 58.8 (plays) and 40.9 (Python) at context 1024,
# stride 512; a unigram model fitted to the very text it is scored on (the best any context-free model
# can do there) scores 356 and 362. The bounds leave 12-20 % for retraining noise.
MAX_PERPLEXITY = {"plays": 70.0, "python": 46.0}
UNIGRAM_RATIO = 5  # and at least 5x under that unigram


def held_out_ids(llm: LLM, name: str) -> list[int]:
    return llm.encode((HELD_OUT / f"heldout_{name}.txt").read_text(), False, False)[:SCORED_TOKENS]


def unigram_perplexity(ids: list[int]) -> float:
    counts, n = collections.Counter(ids), len(ids)
    return math.exp(-sum(k * math.log(k / n) for k in counts.values()) / n)


@pytest.fixture(scope="module")
def demo_llm():
    return LLM(trained_checkpoint(), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def hf_demo():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(trained_checkpoint(), dtype=torch.float32).eval()


def test_the_checkpoint_is_complete_small_and_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = trained_checkpoint()
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(files)
    assert sum(files.values()) < 32 * 2**20
    llm = LLM(path, device="cpu")
    assert llm.source.arch.name == "Qwen3MoeForCausalLM"
    a = llm.args
    assert (a.num_layers, a.num_experts, a.top_k, a.vocab_size) == (4, 32, 4, len(llm.tokenizer))
    assert "<|im_start|>assistant" in llm.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_logits_match_transformers(demo_llm, hf_demo):
    prompts = [
        demo_llm.encode("KING HENRY.\nWhat say you, my lord?", False),
        demo_llm.encode("def f(x):", False),
    ]
    assert rel_err(our_logits(demo_llm, prompts), hf_logits(hf_demo, prompts)) < REL_TOL


@pytest.mark.parametrize("name", ["plays", "python"])
def test_held_out_perplexity_is_far_under_a_unigram_model(demo_llm, name):
    ids = held_out_ids(demo_llm, name)
    assert len(ids) == SCORED_TOKENS
    ours = perplexity(demo_llm, ids, context=1024, stride=512).perplexity
    assert ours < MAX_PERPLEXITY[name]
    assert ours * UNIGRAM_RATIO < unigram_perplexity(ids)


def test_eval_equals_transformers_perplexity(demo_llm, hf_demo):
    ids = held_out_ids(demo_llm, "plays")[:1500]
    ours = perplexity(demo_llm, ids, context=512, stride=256)
    assert ours.tokens_scored == len(ids) - 1
    assert ours.perplexity == pytest.approx(hf_perplexity(hf_demo, ids, 512, 256), rel=1e-3)


def real_word_share(text: str) -> float:
    """Share of the text's words (letter runs of 3 or more) that occur in the held-out texts: words the
    model never saw there count against it, so the share is a floor."""
    vocabulary = set(
        re.findall(r"[a-z]{3,}", " ".join(p.read_text().lower() for p in HELD_OUT.glob("heldout_*")))
    )
    words = re.findall(r"[a-z]{3,}", text.lower())
    assert len(words) >= 15, text
    return sum(w in vocabulary for w in words) / len(words)


def test_demo_writes_mostly_real_words_and_the_random_one_does_not(tmp_path, monkeypatch, capsys):
    assert main(["demo", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "Qwen3MoeForCausalLM: 4 layers, hidden 256, 32 experts (top-4), vocab 4096\n" in err
    assert out.startswith("KING HENRY.\n") and "\nimport os\n\n\ndef " in out
    assert err.count(" decode ") == 2  # one stats line per prompt
    assert real_word_share(out) > 0.8  # measured 0.89: the misses are mostly made-up Python names
    # The control: the same check fails on the random-weight demo (its vocabulary is fully printable).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["demo", "--random", "--device", "cpu", "--max-tokens", "120"]) == 0
    out, err = capsys.readouterr()
    assert "The weights are RANDOM" in err and "completion 120 tok" in err
    assert real_word_share(out) < 0.5  # measured 0.27
