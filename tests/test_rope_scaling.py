"""Scaled rotary embeddings (linear, dynamic, yarn, llama3, longrope): the checkpoint loads and matches
transformers, given as `rope_parameters` or in a legacy `rope_scaling` (key `type` or `rope_type`).

Parity as in test_models.py: fp32 on CPU, ||ours - ref|| / ||ref|| of a batched, left-padded prompt's
logits below 1e-4 and the same 32 greedy tokens. The rotary tables themselves must be transformers' to
the bit. Sequences stay within max_position_embeddings here, except in the tests past it: there dynamic
NTK grows its base at every forward (transformers recomputes inv_freq from the longest position), which
DynamicNTKRotary does per row. longrope's switch to its long factors (past original_max_position_embeddings
= 16) falls inside the 8 prompt + 32 generated tokens of every case.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from tiermoe import LLM, SamplingParams
from tiermoe.errors import CheckpointError
from tiermoe.models.base import build_rotary
from tiermoe.models.qwen3_moe import Qwen3MoeArgs

from .conftest import hf_config, runner_greedy
from .test_models import PROMPTS, REL_TOL, hf_greedy, hf_logits, our_logits, rel_err

HALF = 8  # head_dim / 2 of the tiny qwen3_moe: the length of longrope's factor lists

# rope_type -> (rope parameters, other config fields)
ROPES = {
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, {"max_position_embeddings": 64}),
    "linear": ({"rope_type": "linear", "factor": 4.0}, {}),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, {}),
    # wavelengths 6.3, 20, 63, 199, ...: below 64 / 4, between, above 64: all three llama3 bands
    "llama3": (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {},
    ),
    # no factor: transformers takes max_position_embeddings / original = 4 for the attention factor
    "longrope": (
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
            "long_factor": [1.0 + 2.0 * i for i in range(HALF)],
            "original_max_position_embeddings": 16,
        },
        {"max_position_embeddings": 64},
    ),
}  # fmt: skip
SPELLINGS = ["rope_parameters", "rope_scaling.type", "rope_scaling.rope_type"]


def overrides(rope: str, **more) -> dict:
    params, fields = ROPES[rope]
    # a deep copy: transformers writes defaults into the dict it is given
    return {"rope_parameters": {**json.loads(json.dumps(params)), "rope_theta": 10000.0}, **fields, **more}


def respell(src, dst, spelling: str):
    """A copy of checkpoint `src` whose config.json states its rope the way `spelling` says."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    params = config.pop("rope_parameters")
    if spelling != "rope_parameters":
        config["rope_theta"] = params.pop("rope_theta")
        key = spelling.split(".")[1]
        config["rope_scaling"] = {key: params.pop("rope_type"), **params}
    else:
        config["rope_parameters"] = params
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def with_rope(src, dst, **rope_fields):
    """A copy of checkpoint `src` with config.json's rope fields replaced."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.pop("rope_parameters", None)
    (dst / "config.json").write_text(json.dumps({**config, **rope_fields}))
    return dst


def assert_tables_match(llm: LLM, hf) -> None:
    """The rotary frequencies at load (below any pivot) and the cos/sin scaling equal transformers'."""
    ours, theirs = llm.model.model.rotary, hf.model.rotary_emb
    assert torch.equal(
        ours.frequencies(torch.zeros(1, 1, dtype=torch.long)).flatten(), theirs.original_inv_freq
    )
    assert ours.attention_scaling == theirs.attention_scaling


CASES = [("qwen3_moe", rope, spelling) for rope in ROPES for spelling in SPELLINGS] + [
    ("olmoe", "yarn", "rope_parameters"),
    ("qwen2_moe", "longrope", "rope_scaling.type"),
    ("mixtral", "llama3", "rope_parameters"),
]


@pytest.mark.parametrize(("arch", "rope", "spelling"), CASES)
def test_scaled_rope_loads_and_matches_transformers(tiny_checkpoint, tmp_path, arch, rope, spelling):
    path, hf = tiny_checkpoint(arch, **overrides(rope))
    path = respell(path, tmp_path / "ckpt", spelling)
    # transformers reads the respelled config.json as the rope its reference model was built with
    read = transformers.AutoConfig.from_pretrained(path).rope_parameters
    assert {k: v for k, v in read.items() if k != "type"} == hf.config.rope_parameters
    llm = LLM(path, device="cpu", dtype="fp32")
    assert llm.args.rope_parameters["rope_type"] == rope
    assert_tables_match(llm, hf)
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < REL_TOL
    ours = llm.generate(PROMPTS[0], SamplingParams(max_tokens=32, ignore_eos=True))[0].token_ids
    assert ours == hf_greedy(hf, PROMPTS[0], 32)


@pytest.mark.parametrize("rope", ["dynamic", "longrope", "yarn"])
def test_past_max_position_embeddings_matches_transformers(tiny_checkpoint, rope):
    """max_position_embeddings 16 and a 24-token prompt with 16 more tokens: dynamic NTK grows its base
    at every forward past 16, longrope switches to its long factors. transformers picks those over the
    whole batch and tiermoe per row, so this is one sequence (see DynamicNTKRotary)."""
    fields = {"max_position_embeddings": 16}
    if rope != "dynamic":
        fields["rope_parameters"] = {
            **overrides(rope)["rope_parameters"],
            "original_max_position_embeddings": 8,
        }
    path, hf = tiny_checkpoint("qwen3_moe", **{**overrides(rope), **fields})
    llm = LLM(path, device="cpu", dtype="fp32", kv_reserve_tokens=40)  # past the context: 24 + 16 tokens
    prompt = [(7 * i + 3) % 300 for i in range(24)]
    assert rel_err(our_logits(llm, [prompt]), hf_logits(hf, [prompt])) < REL_TOL
    assert runner_greedy(llm, prompt, 16) == hf_greedy(hf, prompt, 16)


def test_dynamic_rope_differs_from_plain_past_max_position_embeddings(tiny_checkpoint):
    """The test above can fail: past max_position_embeddings plain rotary gives other logits."""
    prompt = [(7 * i + 3) % 300 for i in range(24)]
    dynamic, _ = tiny_checkpoint("qwen3_moe", **overrides("dynamic", max_position_embeddings=16))
    _, hf = tiny_checkpoint("qwen3_moe", max_position_embeddings=16)
    ours = our_logits(LLM(dynamic, device="cpu", dtype="fp32", kv_reserve_tokens=24), [prompt])
    assert rel_err(ours, hf_logits(hf, [prompt])) > 100 * REL_TOL


@pytest.mark.parametrize(
    "fields",
    [
        {"rope_parameters": {"rope_type": "foo", "factor": 2.0, "rope_theta": 10000.0}},
        {"rope_scaling": {"type": "foo", "factor": 2.0}, "rope_theta": 10000.0},
        {"rope_scaling": {"rope_type": "foo", "factor": 2.0}, "rope_theta": 10000.0},
    ],
    ids=SPELLINGS,
)
def test_unknown_rope_type_is_a_clear_checkpoint_error(tiny_checkpoint, tmp_path, fields):
    path, _ = tiny_checkpoint("qwen3_moe")
    path = with_rope(path, tmp_path / "ckpt", **fields)
    with pytest.raises(CheckpointError) as e:
        LLM(path, device="cpu", dtype="fp32")
    message = str(e.value)
    assert str(path / "config.json") in message
    assert "'foo'" in message and "rope_parameters.rope_type" in message and "rope_scaling.type" in message
    assert "default, linear, dynamic, yarn, llama3, longrope" in message


def test_missing_rope_field_is_a_clear_checkpoint_error(tiny_checkpoint, tmp_path):
    """llama3 without low_freq_factor: transformers' own check as it reads config.json, not a bare
    KeyError from its rope function at load."""
    path, _ = tiny_checkpoint("qwen3_moe")
    params = {k: v for k, v in ROPES["llama3"][0].items() if k != "low_freq_factor"}
    path = with_rope(path, tmp_path / "ckpt", rope_parameters={**params, "rope_theta": 10000.0})
    with pytest.raises(CheckpointError, match=r"config\.json.*'llama3'.*low_freq_factor"):
        LLM(path, device="cpu", dtype="fp32")


@pytest.mark.parametrize(
    ("rope", "extends", "max_len"),
    [
        ({"rope_type": "default"}, False, 512),
        ({"rope_type": "default", "factor": 4.0, "original_max_position_embeddings": 512}, False, 512),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, True, 1024),
        ({"rope_type": "yarn", "factor": 4.0}, True, 2048),  # original defaults to max_position_embeddings
        ({"rope_type": "linear", "factor": 4.0}, True, 512),  # no original length: no more than stated
        ({"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 256}, True, 1024),
        ({"rope_type": "dynamic", "factor": 2.0}, True, 512),
        ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 512}, True, 1024),
        (dict(ROPES["llama3"][0]), True, 512),  # 64 x 8: max_position_embeddings is the longer
        ({**ROPES["llama3"][0], "original_max_position_embeddings": 128}, True, 1024),
        (dict(ROPES["longrope"][0]), True, 512),  # no factor: max_position_embeddings
    ],
)
def test_rope_max_len(rope, extends, max_len):
    args = Qwen3MoeArgs.from_hf(hf_config("qwen3_moe", rope_parameters={**rope, "rope_theta": 10000.0}))
    assert args.max_position_embeddings == 512
    assert args.rope_extends_context is extends
    assert args.rope_max_len == max_len


@pytest.mark.gpu
@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_length_dependent_rope_replays_in_a_cuda_graph(rope):
    """Decode steps run as captured CUDA graphs: the per-row frequencies must follow the positions
    copied in before each replay (no host sync, nothing baked in at capture)."""
    hf = hf_config("qwen3_moe", **overrides(rope, max_position_embeddings=16))
    rotary = build_rotary(hf, 16).to("cuda")
    rotary.reset()
    positions = torch.tensor([[3], [5]], device="cuda")
    rotary(positions, torch.float32)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cos, sin = rotary(positions, torch.float32)
    for step in ([[3], [5]], [[20], [7]], [[40], [41]]):  # below and past the pivot, per row
        positions.copy_(torch.tensor(step))
        graph.replay()
        eager = rotary(positions, torch.float32)
        assert torch.equal(cos, eager[0]) and torch.equal(sin, eager[1])
    below, past = (rotary.frequencies(torch.tensor([[p]], device="cuda")) for p in (5, 40))
    assert not torch.equal(below, past)  # the frequencies do change at the pivot
