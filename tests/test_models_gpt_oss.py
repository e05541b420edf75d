"""gpt-oss beyond the parity cases of test_models.py: its published MXFP4 layout, its experts' biases
through convert and through every tier, and the routing override on its router."""

from __future__ import annotations

import copy
import json
import shutil

import torch
import transformers
from safetensors.torch import load_file, save_file

from tiermoe import LLM, SamplingParams
from tiermoe.convert import convert, writer_for
from tiermoe.formats.mxfp4 import Mxfp4Format, quantize_mxfp4
from tiermoe.models.experts import ExpertKind

from .conftest import budget_gib
from .test_models import PROMPTS, hf_greedy, hf_logits, our_logits, rel_err

# What the published checkpoints leave unquantized (their config.json's modules_to_not_convert)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def published_mxfp4(src, out):
    """`src` (transformers' bf16 layout: [E, in, out], gate and up interleaved) rewritten as gpt-oss is
    published: `<fused>_blocks` uint8 [E, out, in / 32, 16] and `_scales` [E, out, in / 32], rows as
    interleaved as they were, quant_method mxfp4."""
    shutil.copytree(src, out)
    (file,) = out.glob("*.safetensors")
    tensors = load_file(file)
    for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
        blocks, scales = quantize_mxfp4(tensors.pop(name).mT.contiguous())  # [E, out, in]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (out / "config.json").write_text(json.dumps(config))


def test_published_mxfp4_matches_transformers_own_dequantization(tiny_checkpoint, tmp_path):
    """The reference is transformers loading the same MXFP4 checkpoint (Mxfp4Config(dequantize=True):
    its own unpacking, scales and de-interleaving), so a wrong nibble order, scale bias or row order
    shows."""
    src, _ = tiny_checkpoint("gpt_oss", "fused")
    published_mxfp4(src, tmp_path / "mxfp4")
    llm = LLM(tmp_path / "mxfp4", device="cpu", dtype="fp32")
    fmt = llm.source.format
    assert isinstance(fmt, Mxfp4Format) and fmt.kind == ExpertKind(bias=True, limit=7.0, alpha=1.702)
    # 4-bit values 2 x 96 x 64 / 2 and 64 x 96 / 2 bytes, 192 x 2 and 64 x 3 scales, the biases in fp32
    # (192 + 64 values), each part padded to 256 bytes
    assert llm.plan.expert_bytes == 6144 + 512 + 3072 + 256 + 768 + 256
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "mxfp4", dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)
    ).eval()
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < 1e-4
    ours = llm.generate(PROMPTS[0], SamplingParams(max_tokens=32, ignore_eos=True))[0].token_ids
    assert ours == hf_greedy(hf, PROMPTS[0], 32)


def test_biased_experts_generate_the_same_from_every_tier(tiny_checkpoint):
    path, _ = tiny_checkpoint("gpt_oss", "fused")
    resident = LLM(path, device="cpu", dtype="fp32")
    tiered = LLM(path, device="cpu", dtype="fp32", gpu_budget_gib=budget_gib(resident.plan, 12))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    a, b = (m.generate(PROMPTS[0], params)[0] for m in (resident, tiered))
    assert a.token_ids == b.token_ids and b.stats.experts["gpu_misses"] > 0


def test_convert_carries_the_biases_and_deinterleaves(tiny_checkpoint, tmp_path):
    """int4 from the fused, interleaved [E, in, out] layout: per-expert gate/up/down with their biases.
    The reference is transformers with its experts set to the int4 values, interleaved back."""
    src, hf = tiny_checkpoint("gpt_oss", "fused")
    out = convert(src, tmp_path / "int4", writer_for("int4", group_size=32))
    tensors = load_file(next(out.glob("*.safetensors")))
    gate_bias = tensors["model.layers.0.mlp.experts.3.gate_proj.bias"]
    assert torch.equal(gate_bias, hf.model.layers[0].mlp.experts.gate_up_proj_bias[3, 0::2])
    llm = LLM(out, device="cpu", dtype="fp32")
    fmt = llm.source.format
    assert fmt.name.startswith("int4") and fmt.kind.bias
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for layer, bank in llm.provider.banks.items():
            gate_up, down = fmt.dequantize(bank, torch.arange(8))  # [E, 2I, H] gate rows then up rows
            experts = ref.model.layers[layer].mlp.experts
            experts.gate_up_proj.copy_(gate_up.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2).mT)
            experts.down_proj.copy_(down.mT)
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(ref, PROMPTS)) < 1e-4


def test_routing_override_keeps_the_softmax_over_the_chosen_logits(tiny_checkpoint):
    """uniform routing chooses other experts than the router; the weights stay a softmax over the
    chosen experts' logits, so they sum to one."""
    from tiermoe.models.gpt_oss import BiasedTopKRouter

    router = BiasedTopKRouter(8, 6, 2)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.normal_()

    class Last:
        def route(self, layer, probs):
            return probs.argsort(-1)[:, :2]  # the two least likely

    x = torch.randn(5, 8)
    weights, ids = router(x, Last(), 0)
    logits = torch.nn.functional.linear(x, router.weight, router.bias)
    assert torch.equal(ids, logits.argsort(-1)[:, :2])
    assert torch.allclose(weights, logits.gather(-1, ids).softmax(-1)) and torch.allclose(
        weights.sum(-1), torch.ones(5)
    )
