"""Expert formats: byte layouts, quantization round trips and error bounds, and checkpoints written as the
published ones are, loaded and compared with a dequantize-then-compute reference (transformers on the
dequantized weights)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tiermoe import LLM, SamplingParams
from tiermoe.convert import convert, writer_for
from tiermoe.errors import CheckpointError, InvalidRequestError
from tiermoe.formats.base import ALIGN_BYTES
from tiermoe.formats.dense import DenseFormat
from tiermoe.formats.fp4 import (
    dequantize_nvfp4,
    e2m1_table,
    pack_nibbles,
    quantize_nvfp4,
    to_e2m1,
    unpack_nibbles,
)
from tiermoe.formats.fp8 import E4M3, E4M3_MAX, Fp8BlockFormat, dequantize_blocks, quantize_blocks
from tiermoe.formats.int4 import (
    AWQ_ORDER,
    dequantize_groups,
    pack_cols,
    pack_rows,
    quantize_groups,
    unpack_cols,
    unpack_rows,
)
from tiermoe.formats.mxfp4 import Mxfp4Format, dequantize_mxfp4, quantize_mxfp4
from tiermoe.formats.registry import format_for

from .conftest import budget_gib
from .test_models import PROMPTS, hf_logits, our_logits, rel_err


def test_parts_are_aligned_and_views_share_the_bank():
    fmt = Fp8BlockFormat(64, 40, torch.float32, (16, 16))
    assert [p.name for p in fmt.parts] == ["gate_up", "gate_up_scale", "down", "down_scale"]
    assert all(p.offset % ALIGN_BYTES == 0 for p in fmt.parts) and fmt.nbytes % ALIGN_BYTES == 0
    # 2 x 40 x 64 e4m3, 2 x 3 x 4 scales (40 rows in 3 blocks of 16), 64 x 40 e4m3, 4 x 3 scales
    assert [p.nbytes for p in fmt.parts] == [5120, 96, 2560, 48] and fmt.nbytes == 5120 + 256 + 2560 + 256
    bank = torch.zeros(3, fmt.nbytes, dtype=torch.uint8)
    views = fmt.views(bank)
    views["down_scale"][2].fill_(1.5)
    assert bank[2, 7936:7940].view(torch.float32).item() == 1.5 and not bank[:2, 7936:7940].any()
    assert DenseFormat(64, 32, torch.bfloat16).nbytes == 3 * 64 * 32 * 2


def test_fp8_blocks_round_trip_exactly_on_representable_values():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (40, 72), generator=g, dtype=torch.uint8).view(E4M3)
    codes = torch.where(codes.float().isnan(), torch.zeros_like(codes.float()), codes.float()).to(E4M3)
    codes[::16, ::16] = E4M3_MAX  # every 16 x 16 block holds e4m3's largest value: its scale is exact
    scale_inv = 2.0 ** torch.randint(-12, 0, (3, 5), generator=g).float()
    w = dequantize_blocks(codes, scale_inv, (16, 16), torch.float32)
    q, s = quantize_blocks(w, (16, 16))
    assert torch.equal(s, scale_inv) and torch.equal(q.float(), codes.float())


def test_fp8_error_is_within_half_an_e4m3_step():
    w = torch.randn(2, 96, 80, generator=torch.Generator().manual_seed(1)) * 0.02
    q, s = quantize_blocks(w, (32, 32))
    err = (dequantize_blocks(q, s, (32, 32), torch.float32) - w).abs()
    per_weight = s.repeat_interleave(32, -2)[..., :96, :].repeat_interleave(32, -1)[..., :80]
    # 3 mantissa bits: 2^-4 relative for normal values; below 2^-6 (scaled) the subnormal step is 2^-9
    assert (err <= 2**-4 * w.abs() + 2**-10 * per_weight + 1e-12).all()
    assert err.max() > 0  # it did round


def test_format_for_reads_quantization_config():
    assert isinstance(format_for({}, 64, 32, torch.bfloat16), DenseFormat)
    fp8 = format_for(
        {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}},
        2048, 768, torch.bfloat16,
    )  # fmt: skip
    # one byte a weight, 2 x 6 x 16 float32 gate/up scales (768 bytes), 16 x 6 down scales padded to 512
    assert isinstance(fp8, Fp8BlockFormat) and fp8.nbytes == 3 * 2048 * 768 + 768 + 512
    with pytest.raises(CheckpointError, match="quant_method 'bitsandbytes' is not supported"):
        format_for({"quantization_config": {"quant_method": "bitsandbytes"}}, 64, 32, torch.float32)
    with pytest.raises(CheckpointError, match="without weight_block_size"):
        format_for({"quantization_config": {"quant_method": "fp8"}}, 64, 32, torch.float32)


# ---------------------------------------------------------------------------------------- checkpoints

FP8_QUANTIZED = re.compile(r".*\.(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$")
# DeepSeek-V3's FP8 release: every linear layer of attention (MLA's too), dense MLP, shared and routed
# experts; not the embeddings, norms, router or lm_head.
DEEPSEEK_FP8_QUANTIZED = re.compile(r".*\.(self_attn\.\w+_proj\w*|mlp\.(\w+\.)*(gate|up|down)_proj)\.weight$")


def write_fp8_checkpoint(src: Path, out: Path, block: tuple[int, int], quantized_names=FP8_QUANTIZED) -> Path:
    """`src` as Qwen3-*-FP8 is published: every attention and expert projection's weight e4m3 with its
    float32 `weight_scale_inv` per block, the rest (embeddings, norms, routers, lm_head) as they were.
    Also writes `out`-dequantized, the same weights dequantized, as the reference's checkpoint."""
    shutil.copytree(src, out)
    ref = out.with_name(out.name + "-dequantized")
    shutil.copytree(src, ref)
    (file,) = out.glob("*.safetensors")
    tensors = load_file(file)
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        if quantized_names.match(name):
            q, s = quantize_blocks(t, block)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            dequantized[name] = dequantize_blocks(q, s, block, t.dtype)
        else:
            quantized[name] = dequantized[name] = t
    save_file(quantized, file, metadata={"format": "pt"})
    save_file(dequantized, ref / file.name, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return ref


@pytest.mark.parametrize("block", [(16, 16), (128, 128)])
def test_fp8_checkpoint_matches_transformers_on_its_dequantized_weights(tiny_checkpoint, tmp_path, block):
    src, _ = tiny_checkpoint("qwen3_moe", "per_expert", moe_intermediate_size=40)
    ref = write_fp8_checkpoint(src, tmp_path / "fp8", block)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    llm = LLM(tmp_path / "fp8", device="cpu", dtype="fp32")
    assert llm.source.format.name.startswith("fp8")
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < 1e-4
    # every tier holds the experts as fp8: a tiered run generates what the resident one does
    plan = llm.plan
    budget = (plan.dense_bytes + plan.kv_bytes + 3 * 2 * plan.expert_bytes) / 2**30
    tiered = LLM(tmp_path / "fp8", device="cpu", dtype="fp32", gpu_budget_gib=budget)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    out = tiered.generate(PROMPTS[0], params)[0]
    assert out.token_ids == llm.generate(PROMPTS[0], params)[0].token_ids
    assert out.stats.experts["format"].startswith("fp8") and out.stats.experts["gpu_misses"] > 0
    assert plan.expert_bytes == llm.source.format.nbytes < 3 * 64 * 40 * 4 / 3


def test_deepseek_v3_fp8_checkpoint_loads_with_its_block_scales(tiny_checkpoint, tmp_path):
    """DeepSeek-V3 as published in FP8: MLA's projections, the dense layer, the shared and routed experts
    all e4m3 with block scales; dense weights dequantized at load, experts kept in FP8."""
    src, _ = tiny_checkpoint("deepseek_v3", "per_expert")
    ref = write_fp8_checkpoint(src, tmp_path / "fp8", (16, 16), DEEPSEEK_FP8_QUANTIZED)
    (file,) = (tmp_path / "fp8").glob("*.safetensors")
    scaled = {n.removesuffix("_scale_inv") for n in load_file(file) if n.endswith("_scale_inv")}
    for name in ("self_attn.kv_b_proj", "self_attn.kv_a_proj_with_mqa", "mlp.shared_experts.down_proj"):
        assert f"model.layers.1.{name}.weight" in scaled
    assert "model.layers.0.mlp.gate_proj.weight" in scaled and "model.layers.1.mlp.gate.weight" not in scaled
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    llm = LLM(tmp_path / "fp8", device="cpu", dtype="fp32")
    assert llm.source.format.name.startswith("fp8")
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < 1e-4


def test_fp8_checkpoint_with_a_wrong_scale_names_the_tensor(tiny_checkpoint, tmp_path):
    src, _ = tiny_checkpoint("qwen3_moe", "per_expert")
    write_fp8_checkpoint(src, tmp_path / "fp8", (16, 16))
    (file,) = (tmp_path / "fp8").glob("*.safetensors")
    tensors = load_file(file)
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    tensors[name] = tensors[name].half()  # a scale stored in the wrong dtype
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} .* has dtype F16, expected F32"):
        LLM(tmp_path / "fp8", device="cpu", dtype="fp32")


# ---------------------------------------------------------------------------------------- int4


def test_int4_words_hold_gptq_and_awq_nibble_orders():
    rows = torch.arange(1, 9, dtype=torch.int32)[:, None]  # inputs 0..7 of one output: 1..8
    assert pack_rows(rows).item() == 0x87654321 - 2**32  # input j in bits 4j (the word is negative)
    cols = torch.arange(8, dtype=torch.int32)[None]  # outputs 0..7 of one input: 0..7
    assert pack_cols(cols).item() == 0x76543210
    assert pack_cols(cols, AWQ_ORDER).item() == 0x75316420  # AutoAWQ's order 0 2 4 6 1 3 5 7
    q = torch.randint(0, 16, (3, 32, 24), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(q)), q) and torch.equal(unpack_cols(pack_cols(q)), q)
    assert torch.equal(unpack_cols(pack_cols(q, AWQ_ORDER), AWQ_ORDER), q)


def test_int4_round_to_nearest_error_is_half_a_step():
    w = torch.randn(2, 48, 64, generator=torch.Generator().manual_seed(2)) * 0.02  # [.., N, K]
    q, zeros, scales = quantize_groups(w, 16)
    assert q.shape == (2, 64, 48) and zeros.shape == scales.shape == (2, 4, 48)
    err = (dequantize_groups(q, zeros, scales, torch.float32) - w).abs()
    step = scales.repeat_interleave(16, dim=-2).transpose(-1, -2)  # [.., N, K]
    assert (err <= step / 2 + 1e-7).all() and err.max() > step.max() / 8


INT4_QUANTIZED = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def write_int4_checkpoint(src: Path, out: Path, group: int, method: str) -> Path:
    """`src`'s experts as published 4-bit checkpoints store them, per projection P: GPTQ (AutoGPTQ's v1
    format: P.qweight [K/8, N], P.qzeros [K/G, N/8] holding each zero minus one, P.scales fp16, P.g_idx)
    or AWQ (AutoAWQ's GEMM format: P.qweight [K, N/8] and P.qzeros in the order 0 2 4 6 1 3 5 7). Also
    writes `out`-dequantized, the experts' dequantized weights, as the reference's checkpoint."""
    shutil.copytree(src, out)
    ref = out.with_name(out.name + "-dequantized")
    shutil.copytree(src, ref)
    (file,) = out.glob("*.safetensors")
    quantized, dequantized = {}, {}
    for name, t in load_file(file).items():
        if not INT4_QUANTIZED.match(name):
            quantized[name] = dequantized[name] = t
            continue
        p = name.removesuffix(".weight")
        q, zeros, scales = quantize_groups(t, group if group > 0 else t.shape[1])
        scales = scales.half()
        dequantized[name] = dequantize_groups(q, zeros, scales, t.dtype)
        if method == "gptq":
            quantized[p + ".qweight"] = pack_rows(q)
            quantized[p + ".qzeros"] = pack_cols((zeros - 1) & 15)
            quantized[p + ".g_idx"] = torch.arange(t.shape[1], dtype=torch.int32) // (
                group if group > 0 else t.shape[1]
            )
        else:
            quantized[p + ".qweight"] = pack_cols(q, AWQ_ORDER)
            quantized[p + ".qzeros"] = pack_cols(zeros, AWQ_ORDER)
        quantized[p + ".scales"] = scales
    save_file(quantized, file, metadata={"format": "pt"})
    save_file(dequantized, ref / file.name, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": False}
        if method == "gptq"
        else {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    )
    (out / "config.json").write_text(json.dumps(config))
    return ref


@pytest.mark.parametrize(("method", "group"), [("gptq", 16), ("gptq", -1), ("awq", 32)])
def test_int4_checkpoint_matches_transformers_on_its_dequantized_weights(
    tiny_checkpoint, tmp_path, method, group
):
    src, _ = tiny_checkpoint("qwen3_moe", "per_expert")
    ref = write_int4_checkpoint(src, tmp_path / method, group, method)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    llm = LLM(tmp_path / method, device="cpu", dtype="fp32")
    assert llm.source.format.name == f"int4 ({method}, group {group})"
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < 1e-4
    plan = llm.plan
    budget = (plan.dense_bytes + plan.kv_bytes + 3 * 2 * plan.expert_bytes) / 2**30
    tiered = LLM(tmp_path / method, device="cpu", dtype="fp32", gpu_budget_gib=budget)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert tiered.generate(PROMPTS[0], params)[0].token_ids == llm.generate(PROMPTS[0], params)[0].token_ids


def test_int4_configs_that_cannot_load_are_refused_clearly():
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    with pytest.raises(CheckpointError, match="act-order"):
        format_for({"quantization_config": {**gptq, "desc_act": True}}, 2048, 768, torch.bfloat16)
    with pytest.raises(CheckpointError, match="with 8 bits is not supported"):
        format_for({"quantization_config": {**gptq, "bits": 8}}, 2048, 768, torch.bfloat16)
    with pytest.raises(
        CheckpointError, match="moe_intermediate_size 96 is no multiple of 8 and of the group size 64"
    ):
        format_for({"quantization_config": {**gptq, "group_size": 64}}, 2048, 96, torch.bfloat16)
    with pytest.raises(
        CheckpointError, match="moe_intermediate_size 48 is no multiple of MXFP4's 32-value blocks"
    ):
        format_for({"quantization_config": {"quant_method": "mxfp4"}}, 2048, 48, torch.bfloat16)
    fmt = format_for({"quantization_config": gptq}, 2048, 768, torch.bfloat16)
    # 4 bits a weight, fp16 scales and 4-bit zeros per 128 inputs
    assert fmt.nbytes == 3 * 2048 * 768 // 2 + 2 * 16 * 768 * (2 + 0.5) + 6 * 2048 * (2 + 0.5)


# ---------------------------------------------------------------------------------------- nvfp4


def test_e2m1_codes_round_trip_and_round_to_nearest():
    codes = torch.arange(16)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    assert pack_nibbles(torch.tensor([1, 2])).item() == 0x21  # element 0 in the low nibble
    values = e2m1_table()[codes]
    assert torch.equal(to_e2m1(values)[values != 0], codes[values != 0])  # -0 and 0 are the same value
    assert to_e2m1(torch.tensor([0.7, 2.4, 2.6, 5.0, 9.0, -1.3])).tolist() == [1, 4, 5, 6, 7, 11]


def test_nvfp4_error_is_within_half_a_step_of_each_block():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)) * 0.02
    packed, scale, scale_2 = quantize_nvfp4(w)
    assert packed.shape == (32, 32) and scale.shape == (32, 4) and scale.dtype == E4M3 and scale_2.shape == ()
    err = (dequantize_nvfp4(packed, scale, scale_2, torch.float32) - w).abs()
    per_block = (scale.float() * scale_2).repeat_interleave(16, dim=-1)
    # the widest e2m1 step is 2 (4 to 6): half of it at each block's scale; values past 6 x scale clip
    # only by the e4m3 rounding of the block scale (3 mantissa bits: 1/16)
    assert (err <= per_block + w.abs() / 16 + 1e-9).all() and err.max() > 0


def test_nvfp4_checkpoint_converted_loads_and_matches_its_dequantized_weights(tiny_checkpoint, tmp_path):
    src, _ = tiny_checkpoint("qwen3_moe", "per_expert")
    out = convert(src, tmp_path / "nvfp4", writer_for("nvfp4"))
    llm = LLM(out, device="cpu", dtype="fp32")
    # 4-bit values 2048 + 1024 bytes; scales and global scales padded to 256 each at this tiny size
    assert llm.source.format.name.startswith("nvfp4") and llm.plan.expert_bytes == 2048 + 1024 + 4 * 256
    # the reference: the same checkpoint with each expert dequantized by the published formula
    ref = tmp_path / "ref"
    shutil.copytree(src, ref)
    (file,) = ref.glob("*.safetensors")
    (qfile,) = out.glob("*.safetensors")
    q, tensors = load_file(qfile), load_file(file)
    for name in tensors:
        if ".experts." in name:
            base = name.removesuffix(".weight")
            w = e2m1_table()[unpack_nibbles(q[f"{base}.weight"])]
            w = (
                w.unflatten(-1, (-1, 16))
                * (q[f"{base}.weight_scale"].float() * q[f"{base}.weight_scale_2"])[..., None]
            )
            tensors[name] = w.flatten(-2).to(tensors[name].dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < 1e-4


# ---------------------------------------------------------------------------------------- mxfp4


def test_mxfp4_round_trips_exactly_on_representable_values():
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (24, 4, 32), generator=g)
    codes[..., 0] = 7  # every block holds e2m1's largest value, 6: its power-of-two scale is exact
    scales = torch.randint(100, 140, (24, 4), generator=g, dtype=torch.uint8)
    blocks = pack_nibbles(codes).view(24, 4, 16)
    w = dequantize_mxfp4(blocks, scales, torch.float32)  # [24, 128]
    assert w[0, 0].item() == 6 * 2.0 ** (scales[0, 0].item() - 127)  # value 0 in byte 0's low nibble
    blocks2, scales2 = quantize_mxfp4(w)
    assert torch.equal(scales2, scales) and torch.equal(dequantize_mxfp4(blocks2, scales2, torch.float32), w)


def test_mxfp4_error_is_within_half_a_step_of_each_block():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(6)) * 0.02
    w[3, 32:64] = 0  # an all-zero block: scale 2^-127, values 0
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (16, 3, 16) and scales.shape == (16, 3) and scales.dtype == torch.uint8
    err = (dequantize_mxfp4(blocks, scales, torch.float32) - w).abs()
    per_block = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    # the widest e2m1 step is 2 (4 to 6): half of it at the block's scale; the scale keeps |w| <= 6 x scale
    assert (
        (err <= per_block + 1e-12).all() and err.max() > 0 and scales[3, 1] == 0 and not err[3, 32:64].any()
    )
    # half the block's largest magnitude at most: a power-of-two scale wastes up to a factor of 2
    assert (per_block * 6 < 2 * w.abs().unflatten(-1, (3, 32)).amax(-1).repeat_interleave(32, -1) + 1e-12)[
        w.unflatten(-1, (3, 32)).abs().amax(-1).repeat_interleave(32, -1) > 0
    ].all()


def test_mxfp4_checkpoint_as_gpt_oss_publishes_it_matches_transformers_on_its_dequantized_weights(
    tiny_checkpoint, tmp_path
):
    """gpt-oss's layout on a fused-expert checkpoint: `<fused>_blocks` uint8 [E, out, in / 32, 16] and
    `<fused>_scales` uint8 [E, out, in / 32], quant_method mxfp4; the reference is transformers on the
    same checkpoint with those experts dequantized by the published formula (2^(scale - 127) x e2m1)."""
    src, _ = tiny_checkpoint("qwen3_moe", "fused")
    published, ref = tmp_path / "mxfp4", tmp_path / "ref"
    shutil.copytree(src, published)
    shutil.copytree(src, ref)
    (file,) = published.glob("*.safetensors")
    tensors, dequantized = load_file(file), load_file(file)
    for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
        blocks, scales = quantize_mxfp4(tensors.pop(name))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        table = e2m1_table()[unpack_nibbles(blocks)]  # the published formula, written out
        w = (table * 2.0 ** (scales.float() - 127)[..., None]).flatten(-2)
        dequantized[name] = w.to(dequantized[name].dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    save_file(dequantized, next(ref.glob("*.safetensors")), metadata={"format": "pt"})
    config = json.loads((published / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    (published / "config.json").write_text(json.dumps(config))
    llm = LLM(published, device="cpu", dtype="fp32")
    assert isinstance(llm.source.format, Mxfp4Format)
    # 4-bit values 2 x 64 x 32 / 2 + 64 x 32 / 2 bytes; 128 + 64 scales, each part padded to 256
    assert llm.plan.expert_bytes == 2048 + 256 + 1024 + 256
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    assert rel_err(our_logits(llm, PROMPTS), hf_logits(hf, PROMPTS)) < 1e-4


def test_mxfp4_converted_checkpoint_loads_tiered_and_generates(tiny_checkpoint, tmp_path):
    src, _ = tiny_checkpoint("qwen3_moe", "per_expert")
    out = convert(src, tmp_path / "mxfp4", writer_for("mxfp4"))
    assert any(n.endswith("gate_proj.weight_blocks") for n in load_file(next(out.glob("*.safetensors"))))
    resident = LLM(out, device="cpu", dtype="fp32")
    plan = resident.plan
    tiered = LLM(
        out,
        device="cpu",
        dtype="fp32",
        gpu_budget_gib=budget_gib(plan, 7),
    )
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a, b = (m.generate([1, 2, 3, 4], params)[0] for m in (resident, tiered))
    assert a.token_ids == b.token_ids and b.stats.experts["gpu_misses"] > 0
    assert b.stats.experts["format"].startswith("mxfp4")


def test_fp8_dense_linears_stay_fp8_and_match_the_dequantized_ones(tiny_checkpoint, tmp_path):
    """DeepSeek-V3 in FP8 with its linear layers kept FP8 (dense_weights fp8): the same logits as
    dequantized at load (the same values, dequantized at each forward), fewer dense bytes, kv_b_proj
    (read by MLA's absorbed decode) left dequantized; auto keeps them FP8 only where a budget needs it."""
    src, _ = tiny_checkpoint("deepseek_v3", "per_expert")
    write_fp8_checkpoint(src, tmp_path / "fp8", (16, 16), DEEPSEEK_FP8_QUANTIZED)
    dequantized = LLM(tmp_path / "fp8", device="cpu", dtype="fp32")
    kept = LLM(tmp_path / "fp8", device="cpu", dtype="fp32", dense_weights="fp8")
    linears = {n: type(m).__name__ for n, m in kept.model.named_modules() if n.startswith("model.layers.1.")}
    assert linears["model.layers.1.self_attn.q_a_proj"] == "Fp8Linear"
    assert linears["model.layers.1.mlp.shared_expert.down_proj"] == "Fp8Linear"
    assert linears["model.layers.1.self_attn.kv_b_proj"] == "Linear"
    assert kept.model.model.layers[0].mlp.gate_proj.weight.dtype == E4M3
    assert rel_err(our_logits(kept, PROMPTS), our_logits(dequantized, PROMPTS)) < 1e-6
    # fp32 weights of 4 bytes become 1 byte and a scale per 16 x 16 block
    saved = dequantized.plan.dense_bytes - kept.plan.dense_bytes
    assert saved > 0.5 * (
        dequantized.plan.dense_bytes - 4 * 320 * 64 * 2
    )  # most bytes outside the embeddings
    # auto: dequantized where they fit, FP8 where only FP8 fits
    plan = dequantized.plan
    roomy = (plan.dense_bytes + plan.kv_bytes + 2 * 2 * plan.expert_bytes) / 2**30
    tight = (kept.plan.dense_bytes + plan.kv_bytes + 2 * 2 * plan.expert_bytes) / 2**30
    assert (
        LLM(tmp_path / "fp8", device="cpu", dtype="fp32", gpu_budget_gib=roomy).plan.dense_bytes
        == plan.dense_bytes
    )
    auto = LLM(tmp_path / "fp8", device="cpu", dtype="fp32", gpu_budget_gib=tight)
    assert auto.plan.dense_bytes == kept.plan.dense_bytes
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert (
        auto.generate(PROMPTS[0], params)[0].token_ids
        == dequantized.generate(PROMPTS[0], params)[0].token_ids
    )
    with pytest.raises(InvalidRequestError, match="dense_weights fp8 keeps an FP8 checkpoint's"):
        LLM(src, device="cpu", dense_weights="fp8")
