"""tie_word_embeddings checkpoints whose lm_head.weight on disk disagrees with the config, loaded as
transformers 5 loads them (PreTrainedModel.tie_weights during from_pretrained):

- embed_tokens and a different lm_head: not tied, each used, a warning;
- embed_tokens and an equal lm_head (a tied weight stored twice): tied;
- lm_head only: tied the other way round, embed_tokens is the head.

Each case is checked against transformers loading the same edited files (fp32 logits parity as in
test_models.py), and transformers' own choice is asserted too, so a change there shows up here."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tiermoe import LLM, SamplingParams

from .conftest import build_hf_model, save
from .test_models import PROMPTS, REL_TOL, hf_greedy, hf_logits, our_logits, rel_err

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


def random_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=t.dtype) * 0.08


def edit(tied_dir, out_dir, case: str):
    """A copy of the tied checkpoint with its head tensors as in `case`."""
    shutil.copytree(tied_dir, out_dir)
    file = out_dir / "model.safetensors"
    tensors = load_file(file)
    assert HEAD not in tensors  # save_pretrained writes a tied weight once
    embed = tensors[EMBED]
    if case == "head_differs":
        tensors[HEAD] = random_like(embed, seed=1)
    elif case == "head_equal":
        tensors[HEAD] = embed.clone()
    elif case == "head_only":
        tensors[HEAD] = random_like(embed, seed=2)
        del tensors[EMBED]
    save_file(tensors, str(file), metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    made = {}

    def make(arch: str, case: str):
        if arch not in made:
            model = build_hf_model(arch, tie_word_embeddings=True)
            made[arch] = save(model, tmp_path_factory.mktemp(f"{arch}-tied"))
        path = edit(made[arch], tmp_path_factory.mktemp(f"{arch}-{case}") / "ckpt", case)
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return path, ref

    return make


def shares_storage(ref) -> bool:
    return ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_different_head_is_used_untied_with_a_warning(tied, arch, caplog):
    path, ref = tied(arch, "head_differs")
    assert ref.config.tie_word_embeddings and not shares_storage(ref)  # transformers unties
    with caplog.at_level(logging.WARNING, logger="tiermoe.weights.loader"):
        llm = LLM(path, device="cpu", dtype="fp32")
    assert any("tie_word_embeddings" in r.getMessage() and HEAD in r.getMessage() for r in caplog.records)
    assert llm.model.lm_head is not None
    assert torch.equal(llm.model.lm_head.weight, ref.lm_head.weight)
    assert torch.equal(llm.model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(ref, PROMPTS)) < REL_TOL
    ours = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
    assert ours == hf_greedy(ref, PROMPTS[0], 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_equal_head_stays_tied_without_a_warning(tied, arch, caplog):
    path, ref = tied(arch, "head_equal")
    assert shares_storage(ref)
    with caplog.at_level(logging.WARNING, logger="tiermoe.weights.loader"):
        llm = LLM(path, device="cpu", dtype="fp32")
    assert not caplog.records
    assert llm.model.lm_head is None
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(ref, PROMPTS)) < REL_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_a_head_without_embeddings_is_tied_the_other_way_round(tied, arch):
    path, ref = tied(arch, "head_only")
    assert shares_storage(ref)
    llm = LLM(path, device="cpu", dtype="fp32")
    assert llm.model.lm_head is None
    assert torch.equal(llm.model.model.embed_tokens.weight, ref.lm_head.weight)
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(ref, PROMPTS)) < REL_TOL
    ours = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
    assert ours == hf_greedy(ref, PROMPTS[0], 16)
