"""Bad input gives one clear error naming the file or field, never a traceback from inside torch."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tiermoe import LLM, SamplingParams
from tiermoe.cli import main
from tiermoe.errors import CheckpointError, InvalidRequestError, UnsupportedArchitectureError


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    src, _ = tiny_checkpoint("qwen3_moe", "per_expert", shard="100KB")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def shards(path):
    return sorted(path.glob("*.safetensors"))


def test_missing_shard_names_the_file(ckpt):
    victim = shards(ckpt)[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        LLM(ckpt, device="cpu")


def test_truncated_shard_names_the_file(ckpt):
    victim = shards(ckpt)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{victim.name}: .*truncated or corrupt"):
        LLM(ckpt, device="cpu")


def test_wrong_shape_names_tensor_and_file(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.q_proj.weight"
    file = ckpt / index[name]
    tensors = load_file(file)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"{name} in .*{file.name} has shape \[64, 63\], expected \[64, 64\]"
    ):
        LLM(ckpt, device="cpu")


def test_wrong_expert_shape_is_caught(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    file = ckpt / index[name]
    tensors = load_file(file)
    tensors[name] = tensors[name][:-2].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj\.weight .*has shape \[30, 64\]"):
        LLM(ckpt, device="cpu")


def test_unknown_architecture_lists_supported(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"LlamaForCausalLM.*supported: DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, GptOssForCausalLM, MixtralForCausalLM",
    ):
        LLM(ckpt, device="cpu")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        LLM(ckpt, device="cpu")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("config.json", "[1, 2]", r"config\.json holds a JSON list, not an object"),
        ("config.json", "{oops", r"config\.json is not valid JSON"),
        ("generation_config.json", '"greedy"', r"generation_config\.json holds a JSON str, not an object"),
        ("generation_config.json", "{", r"generation_config\.json is not valid JSON"),
    ],
)
def test_json_files_that_are_not_objects_name_the_file(ckpt, name, text, message):
    (ckpt / name).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        LLM(ckpt, device="cpu")


def test_config_not_matching_weights(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not use.*model\.layers\.2"):
        LLM(ckpt, device="cpu")


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("qwen3_moe")[0], device="cpu")


def test_empty_prompt(llm):
    with pytest.raises(InvalidRequestError, match="prompt is empty") as e:
        llm.generate([[]])
    assert e.value.param == "prompt"


def test_max_tokens_beyond_context(llm):
    with pytest.raises(InvalidRequestError, match=r"exceeds the model's context of 512 tokens") as e:
        llm.generate([1, 2, 3], SamplingParams(max_tokens=510))
    assert e.value.param == "max_tokens"


def test_token_outside_vocabulary(llm):
    with pytest.raises(InvalidRequestError, match="token id 999 is outside the vocabulary"):
        llm.generate([1, 999])


@pytest.mark.parametrize(
    ("field", "value"), [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2)]
)
def test_bad_sampling_values(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_cli_prints_one_line_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint directory not found: {tmp_path / 'nowhere'}"]


def test_serve_without_the_server_extra_says_what_to_install(monkeypatch, capsys):
    import sys

    import tiermoe.server

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    monkeypatch.delitem(sys.modules, "tiermoe.server.serve", raising=False)
    monkeypatch.delattr(tiermoe.server, "serve", raising=False)
    assert main(["serve", "--model", "anything"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: tiermoe serve needs the package uvicorn: pip install 'tiermoe[serve]'"
    )


def test_chat_url_without_the_client_package_says_what_to_install(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    assert main(["chat", "--url", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: tiermoe chat --url needs the package openai: pip install 'tiermoe[serve]'"
    )
