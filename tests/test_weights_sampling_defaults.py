"""generation_config.json's sampling fields: what the file says and nothing more, checked at load, and
applied to the fields a request leaves unset, as transformers (do_sample) and vLLM (the rest) do."""

from __future__ import annotations

import json

import pytest
import torch

from tiermoe import LLM, SamplingParams
from tiermoe.errors import CheckpointError
from tiermoe.weights.tokenizer import sampling_defaults

PROMPT = [3, 17, 42, 9, 100, 5]


def _with_generation_config(tiny_checkpoint, tmp_path, **fields):
    src, _ = tiny_checkpoint("qwen3_moe")
    dst = tmp_path / "model"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "generation_config.json").unlink()
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, **fields}))
    return dst


def test_generation_config_supplies_unset_sampling_fields(tiny_checkpoint, tmp_path):
    path = _with_generation_config(
        tiny_checkpoint,
        tmp_path,
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
        repetition_penalty=1.1,
    )
    engine = LLM(path, device="cpu").engine
    p = engine.resolve(PROMPT, SamplingParams())
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.6, 0.95, 20, 1.1)
    p = engine.resolve(PROMPT, SamplingParams(temperature=0.0, top_k=0, max_tokens=5))
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.0, 0, 0.95, 5)  # the request's own win


def test_do_sample_false_decodes_greedily_as_in_transformers(tiny_checkpoint, tmp_path):
    """transformers' generate() ignores temperature, top_p and top_k when do_sample is false; so do we."""
    path = _with_generation_config(tiny_checkpoint, tmp_path, do_sample=False, temperature=0.7, top_p=0.8)
    _, hf = tiny_checkpoint("qwen3_moe")
    llm = LLM(path, device="cpu")
    assert llm.sampling_defaults == {"temperature": 0.0}
    ours = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(PROMPT) :]
    assert ours == ref.tolist()


@pytest.mark.parametrize(
    "fields, defaults",
    [
        # silent: nothing, so the caller's default holds (the API's temperature 1, the Python API's greedy)
        ({}, {}),
        # what the file sets without do_sample applies, as in vLLM; null counts as unset
        ({"temperature": 0.7, "top_p": None}, {"temperature": 0.7}),
        # do_sample true: transformers' temperature 1 and top_k 50 where unset
        ({"do_sample": True, "top_p": 0.9}, {"temperature": 1.0, "top_k": 50, "top_p": 0.9}),
        ({"do_sample": False, "repetition_penalty": 1.2}, {"temperature": 0.0, "repetition_penalty": 1.2}),
    ],
)
def test_sampling_defaults_are_what_the_file_says(fields, defaults, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, **fields}))
    assert sampling_defaults(tmp_path) == defaults


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": -1}, "temperature is -1; it must be >= 0"),
        ({"top_p": 0}, r"top_p is 0; it must be in \(0, 1\]"),
        ({"top_k": 2.5}, "top_k is 2.5; it must be an integer >= 0"),
        ({"temperature": "hot"}, "temperature is 'hot'"),
        ({"do_sample": "yes"}, "do_sample is 'yes'; it must be true or false"),
    ],
)
def test_bad_sampling_values_fail_at_load(fields, message, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(fields))
    with pytest.raises(CheckpointError, match=message):
        sampling_defaults(tmp_path)
