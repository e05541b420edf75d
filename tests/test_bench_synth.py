"""synth writes checkpoints that transformers loads with the published configs and the Hub tensor names."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from tiermoe.bench.presets import PRESETS, get_preset
from tiermoe.bench.shapes import checkpoint_size, expert_bytes_per_token, num_experts, tensor_specs
from tiermoe.bench.synth import INIT_STD, read_synth_info, synth_checkpoint
from tiermoe.errors import InvalidRequestError, UnsupportedArchitectureError

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
    assert num_experts(model.config.to_dict()) == num_experts(cfg) == 8
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
    assert num_experts(cfg) == experts
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
    with pytest.raises(InvalidRequestError, match="quantization issue"):
        synth_checkpoint("tiny-olmoe", tmp_path, dtype="fp8", progress=False)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        synth_checkpoint({"architectures": ["LlamaForCausalLM"]}, tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("preset", TINY)
def test_tiermoe_loads_synth_checkpoints_and_agrees_with_transformers(preset, tmp_path):
    from tiermoe import LLM, SamplingParams

    synth_checkpoint(preset, tmp_path, seed=1, progress=False)
    prompt = torch.randint(3, 512, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = LLM(tmp_path, device="cpu", dtype="fp32").generate(
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
