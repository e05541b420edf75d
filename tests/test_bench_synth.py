"""synth writes checkpoints that transformers loads with the published configs and the Hub tensor names,
and a tokenizer whose vocabulary and special-token ids match the preset's config."""

import argparse
import json
from hashlib import sha256
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tiermoe.bench import synth, synth_tokenizer
from tiermoe.bench.presets import PRESETS, get_preset
from tiermoe.bench.shapes import checkpoint_size, expert_bytes_per_token, tensor_specs
from tiermoe.bench.synth import INIT_STD, read_synth_info, synth_checkpoint
from tiermoe.bench.synth_tokenizer import (
    get_style,
    prepare_tokenizer,
    special_ids,
    train_bpe,
    with_generation_ids,
)
from tiermoe.errors import InvalidRequestError, UnsupportedArchitectureError
from tiermoe.models.registry import from_config

TINY = [name for name in PRESETS if name.startswith("tiny-")]


def _on_disk(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return tensors


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_matches_transformers_names_and_loads(preset, tmp_path):
    synth_checkpoint(preset, tmp_path / "ckpt", progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors

    cfg = get_preset(preset).config
    assert model.config.hidden_size == cfg["hidden_size"] == 64
    assert model.config.vocab_size == 512
    experts = (
        getattr(model.config, "num_experts", None) or model.config.num_local_experts
    )  # DeepSeek-V3's name
    assert experts == from_config(cfg)[2].num_experts == 8
    assert model.generation_config.eos_token_id == 2

    # transformers' own save_pretrained of the loaded model writes exactly our names and shapes.
    model.save_pretrained(tmp_path / "ref")
    ours = {k: tuple(v.shape) for k, v in _on_disk(tmp_path / "ckpt").items()}
    ref = {k: tuple(v.shape) for k, v in _on_disk(tmp_path / "ref").items()}
    assert ours == ref

    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_weights_are_seeded_normal_with_init_std_and_norms_are_ones(tmp_path):
    synth_checkpoint("tiny-qwen3-moe", tmp_path / "a", seed=7, progress=False)
    synth_checkpoint("tiny-qwen3-moe", tmp_path / "b", seed=7, shard_gib=0.0001, progress=False)
    synth_checkpoint("tiny-qwen3-moe", tmp_path / "c", seed=8, progress=False)
    a, b, c = (_on_disk(tmp_path / d) for d in "abc")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 1
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    assert a[name].dtype == torch.bfloat16
    assert torch.equal(a[name], b[name])  # same seed, different sharding: same values
    assert not torch.equal(a[name], c[name])
    emb = a["model.embed_tokens.weight"].float()
    assert abs(emb.std().item() - INIT_STD) < 0.1 * INIT_STD
    assert abs(emb.mean().item()) < 0.1 * INIT_STD
    assert torch.equal(a["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(a["model.layers.0.self_attn.q_norm.weight"], torch.ones(16, dtype=torch.bfloat16))


def test_sharded_checkpoint_has_complete_index_and_loads(tmp_path):
    synth_checkpoint("tiny-mixtral", tmp_path, shard_gib=0.00003, progress=False)  # more shards, overwritten
    result = synth_checkpoint("tiny-mixtral", tmp_path, shard_gib=0.00005, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == result.files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(result.files) > 2
    assert set(index["weight_map"].values()) == set(result.files)
    specs = tensor_specs(get_preset("tiny-mixtral").config)
    assert set(index["weight_map"]) == {s.name for s in specs}
    assert index["metadata"]["total_size"] == sum(s.numel for s in specs) * 2 == result.total_bytes
    on_disk = _on_disk(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    # The loaded model holds experts fused [E, 2I, H]: expert 3's w1 is the first half of its slice.
    fused = model.model.layers[1].mlp.experts.gate_up_proj[3]
    assert torch.equal(fused[:32], on_disk["model.layers.1.block_sparse_moe.experts.3.w1.weight"])
    assert torch.equal(fused[32:], on_disk["model.layers.1.block_sparse_moe.experts.3.w3.weight"])


def test_files_written_describe_the_checkpoint(tmp_path):
    synth_checkpoint("tiny-olmoe", tmp_path, seed=3, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["OlmoeForCausalLM"]
    assert config["torch_dtype"] == "bfloat16"
    assert config["eos_token_id"] == 2
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    info = read_synth_info(tmp_path)
    assert (info["preset"], info["seed"], info["dtype"]) == ("tiny-olmoe", 3, "bf16")
    assert read_synth_info(tmp_path / "nowhere") == {}


# Parameter counts of the published models (model cards: OLMoE 6.9B, Qwen3-30B-A3B 30.5B, Mixtral 46.7B).
@pytest.mark.parametrize(
    ("preset", "params", "experts", "top_k"),
    [
        ("olmoe-1b-7b", 6_919_161_856, 64, 8),
        ("qwen3-30b-a3b", 30_532_122_624, 128, 8),
        ("mixtral-8x7b", 46_702_792_704, 8, 2),
    ],
)
def test_published_presets_have_the_real_shapes(preset, params, experts, top_k):
    cfg = get_preset(preset).config
    hf_config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in model.parameters()) == sum(s.numel for s in tensor_specs(cfg)) == params
    assert from_config(cfg)[2].num_experts == experts
    assert hf_config.num_experts_per_tok == top_k


def test_qwen3_preset_fields_and_expert_bytes():
    cfg = get_preset("qwen3-30b-a3b").config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (48, 2048, 128)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (32, 4, 151936)
    assert cfg["moe_intermediate_size"] == 768 and cfg["norm_topk_prob"] is True
    # 8 experts × 48 layers × 3 matrices of 2048×768 in bf16.
    assert expert_bytes_per_token(cfg) == 8 * 48 * 3 * 2048 * 768 * 2
    size = checkpoint_size(cfg)
    assert size.expert_bytes == 128 * 48 * 3 * 2048 * 768 * 2
    assert size.dense_bytes == size.total_bytes - size.expert_bytes > 0


def test_dense_layers_from_mlp_only_layers_match_transformers(tmp_path):
    cfg = get_preset("tiny-qwen3-moe").config | {"num_hidden_layers": 3, "mlp_only_layers": [1]}
    synth_checkpoint(cfg, tmp_path, progress=False)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    names = set(_on_disk(tmp_path))
    assert "model.layers.1.mlp.gate_proj.weight" in names
    assert not any(n.startswith("model.layers.1.mlp.experts") for n in names)
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in names


def test_clear_errors(tmp_path):
    with pytest.raises(InvalidRequestError, match=r"unknown preset 'nope'.*olmoe-1b-7b.*tiny-mixtral"):
        synth_checkpoint("nope", tmp_path, progress=False)
    with pytest.raises(
        InvalidRequestError,
        match=r"unknown dtype .fp8.; choose bf16 \(quantized experts: --experts int4, fp8, nvfp4 or mxfp4\)",
    ):
        synth_checkpoint("tiny-olmoe", tmp_path, dtype="fp8", progress=False)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        synth_checkpoint({"architectures": ["LlamaForCausalLM"]}, tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("preset", TINY)
def test_tiermoe_loads_synth_checkpoints_and_agrees_with_transformers(preset, tmp_path):
    from tiermoe import LLM, SamplingParams

    synth_checkpoint(preset, tmp_path, seed=1, progress=False)
    prompt = torch.randint(3, 512, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    # natural: the checkpoint's own routers, as transformers routes (synthetic ones default to szd)
    ours = LLM(tmp_path, device="cpu", dtype="fp32", routing="natural").generate(
        prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    )[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=5, min_new_tokens=5)
    assert ours.token_ids == ref[0, len(prompt) :].tolist()


@pytest.mark.gpu
def test_synth_draws_on_cuda(tmp_path):
    synth_checkpoint("tiny-mixtral", tmp_path / "gpu", seed=4, device="cuda", progress=False)
    synth_checkpoint("tiny-mixtral", tmp_path / "gpu2", seed=4, device="cuda", progress=False)
    a, b = _on_disk(tmp_path / "gpu"), _on_disk(tmp_path / "gpu2")
    emb = a["model.embed_tokens.weight"]
    assert emb.device.type == "cpu" and torch.equal(emb, b["model.embed_tokens.weight"])
    assert abs(emb.float().std().item() - INIT_STD) < 0.1 * INIT_STD
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "gpu", output_loading_info=True)
    assert not any(info.values()), info


# --- tokenizers ---------------------------------------------------------------------------------------

# One tiny preset per tokenizer style: ChatML, OLMoE's Tülu, Mixtral's [INST].
TINY_STYLES = {"tiny-qwen3-moe": "chatml", "tiny-olmoe": "olmo", "tiny-mixtral": "mistral"}


def _ids_named(config: dict, generation_config: dict, key: str) -> set:
    ids = set()
    for value in (config.get(key), generation_config.get(key)):
        ids.update(value if isinstance(value, list) else [value])
    return ids - {None}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_a_tokenizer_whose_special_ids_match_its_config(preset):
    p = get_preset(preset)
    style = get_style(p.tokenizer)
    # no build: ids come from the configs or the published vocabulary
    ids = special_ids(style, with_generation_ids(p.config, p.generation_config))
    token_id = {t: i for i, t in ids.items()}
    assert max(ids) < p.config["vocab_size"]
    gen = synth._generation_config(p.config, p.generation_config)
    for role, token in style.roles.items():
        named = _ids_named(p.config, gen, f"{role}_token_id")
        assert token_id[token] in named or not named, (role, token)
    assert token_id[style.roles["eos"]] in _ids_named(p.config, gen, "eos_token_id")


@pytest.mark.parametrize("preset", TINY_STYLES)
def test_tiny_checkpoint_generates_from_text_and_chat(preset, tmp_path):
    from tiermoe import LLM, SamplingParams

    synth_checkpoint(preset, tmp_path, progress=False)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {f.name for f in tmp_path.iterdir()}
    assert read_synth_info(tmp_path)["tokenizer"] == TINY_STYLES[preset]
    config = json.loads((tmp_path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == config["vocab_size"] == 512  # trained (or reserved) tokens fill every id
    assert tok.eos_token_id == config["eos_token_id"] == 2
    assert tok.pad_token_id == config["pad_token_id"]
    assert tok.bos_token_id in {None, config["bos_token_id"]}  # Qwen's and OLMo's tokenizers have no bos
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    text = "def add(a, b):\n    return a + b  # ünïcode"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text

    llm = LLM(tmp_path, device="cpu", dtype="fp32")
    assert llm.engine.eos_token_ids == {2}  # config, generation_config and tokenizer agree
    out = llm.generate("Hello world", SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert out.prompt_token_ids == tok.encode("Hello world") and len(out.token_ids) == 6
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = llm.chat(messages, SamplingParams(max_tokens=4, ignore_eos=True))
    assert reply.prompt_token_ids == llm.encode(reply.prompt, add_special_tokens=False)
    assert len(reply.token_ids) == 4 and reply.text == tok.decode(reply.token_ids, skip_special_tokens=True)
    expected = {
        "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "olmo": "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n",
        "mistral": "<s>[INST] Be brief.\n\nHi [/INST]",
    }[TINY_STYLES[preset]]
    assert reply.prompt == expected
    if preset == "tiny-mixtral":  # one bos either way: the tokenizer adds it to text, the template to chats
        assert out.prompt_token_ids[0] == 1 and reply.prompt_token_ids.count(1) == 1


def test_no_tokenizer_keeps_the_old_layout_and_removes_a_stale_one(tmp_path):
    synth_checkpoint("tiny-olmoe", tmp_path, progress=False)
    assert (tmp_path / "tokenizer.json").exists()
    parser = argparse.ArgumentParser()
    synth.add_parser(parser.add_subparsers())
    args = parser.parse_args(["synth", "--preset", "tiny-olmoe", "--out", str(tmp_path), "--no-tokenizer"])
    assert args.func(args) == 0
    assert not any(tmp_path.glob("tokenizer*")) and read_synth_info(tmp_path)["tokenizer"] is None


def test_train_bpe_places_specials_and_reserves_what_training_leaves():
    specials = {0: "<unk>", 300: "</s>", 7: "<s>"}
    tok = train_bpe(["tiny corpus, tiny corpus"], 320, specials)
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(320))  # no holes: every id the model can emit decodes
    assert all(vocab[t] == i for i, t in specials.items())
    reserved = [t for t in vocab if t.startswith("<|reserved_special_token_")]
    assert reserved and len(vocab) - len(reserved) < 320
    with pytest.raises(InvalidRequestError, match="needs at least 259 ids; vocab_size is 200"):
        train_bpe(["tiny corpus"], 200, specials)


def test_tokenizers_are_built_once_into_the_cache(tmp_path, monkeypatch):
    p = get_preset("tiny-olmoe")
    first = prepare_tokenizer("olmo", p.config, p.generation_config, tmp_path)
    assert sorted(f.name for f in first.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    monkeypatch.setattr(synth_tokenizer, "build", lambda *a: pytest.fail("rebuilt a cached tokenizer"))
    assert prepare_tokenizer("olmo", p.config, p.generation_config, tmp_path) == first
    assert [d.name for d in tmp_path.iterdir()] == [first.name]  # no partial folder left behind


def test_special_ids_that_contradict_the_config_are_refused(tmp_path):
    p = get_preset("qwen3-30b-a3b")
    with pytest.raises(
        InvalidRequestError, match=r"eos <\|im_end\|> is id 151645, config.json says \[151643\]"
    ):
        prepare_tokenizer("qwen", p.config | {"eos_token_id": 151643}, {}, tmp_path)
    with pytest.raises(InvalidRequestError, match="does not fit the vocabulary of 512"):
        prepare_tokenizer("olmo", get_preset("tiny-olmoe").config | {"eos_token_id": 600}, {}, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before building anything


# llama.cpp's convert_hf_to_gguf.py identifies a pre-tokenizer by the hash of this text's token ids;
# this one is its hash for the published Qwen2/Qwen3 tokenizer ("qwen2").
LLAMACPP_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
LLAMACPP_QWEN2_HASH = "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"


@pytest.mark.slow
def test_qwen_preset_gets_the_published_qwen_tokenizer():
    # About 3 s to build the first time, then read from ~/.cache/tiermoe/tokenizers.
    p = get_preset("qwen3-30b-a3b")
    tok = AutoTokenizer.from_pretrained(prepare_tokenizer("qwen", p.config, p.generation_config))
    assert len(tok) == 151_669 <= p.config["vocab_size"] == 151_936
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    assert tok.convert_tokens_to_ids(specials) == [151643, 151644, 151645, 151667, 151668]
    assert (
        tok.eos_token_id == p.config["eos_token_id"]
        and tok.pad_token_id == p.generation_config["pad_token_id"]
    )
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert sha256(str(tok.encode(LLAMACPP_CHECK_TEXT)).encode()).hexdigest() == LLAMACPP_QWEN2_HASH
    # <think> is not special in the published tokenizer: it stays in decoded text.
    assert tok.decode([151667, 87, 151668, 151645], skip_special_tokens=True) == "<think>x</think>"
    assert tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    ).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["olmoe-1b-7b", "mixtral-8x7b"])
def test_published_shapes_get_a_trained_tokenizer_of_their_full_vocabulary(preset):
    # 3-4 s each to train the first time, then read from ~/.cache/tiermoe/tokenizers.
    p = get_preset(preset)
    tok = AutoTokenizer.from_pretrained(prepare_tokenizer(p.tokenizer, p.config, p.generation_config))
    assert len(tok) == p.config["vocab_size"]
    assert tok.eos_token_id == p.config["eos_token_id"]
    assert tok.pad_token_id == p.config.get("pad_token_id")  # OLMoE 1, Mixtral none
    assert tok.bos_token_id == p.config.get("bos_token_id")  # OLMoE none, Mixtral 1
    reserved = [t for t in tok.get_vocab() if t.startswith("<|reserved_special_token_")]
    assert len(reserved) < 100  # the stdlib corpus trains (almost) the whole vocabulary
