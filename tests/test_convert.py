"""tiermoe convert: a converted checkpoint loads and generates, its experts in the published layout and
page-aligned; an interrupted convert leaves nothing that loads; bad input gets one clear error."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from tiermoe import LLM, SamplingParams
from tiermoe.cli import main as cli
from tiermoe.convert import convert, writer_for
from tiermoe.errors import CheckpointError, InvalidRequestError
from tiermoe.formats.int4 import GptqWriter, dequantize_groups, unpack_cols, unpack_rows
from tiermoe.offload.sources import open_expert_source

from .test_models import PROMPTS, our_logits, rel_err


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


@pytest.mark.parametrize(
    ("arch", "layout", "experts", "bound"),
    [
        ("qwen3_moe", "per_expert", "int4", 0.1),
        ("mixtral", "fused", "int4", 0.1),
        ("olmoe", "per_expert", "fp8", 0.05),
    ],
)
def test_converted_checkpoint_loads_generates_and_stays_close(
    tiny_checkpoint, tmp_path, arch, layout, experts, bound
):
    src, _ = tiny_checkpoint(arch, layout)
    out = convert(src, tmp_path / "q", writer_for(experts, 16, "mse", 16))
    llm, ref = LLM(out, device="cpu", dtype="fp32"), LLM(src, device="cpu", dtype="fp32")
    assert llm.source.format.name.startswith(experts) and llm.plan.expert_bytes < ref.plan.expert_bytes / 3
    # random tiny weights: only the experts changed, by the format's rounding
    assert 0 < rel_err(our_logits(llm, PROMPTS), our_logits(ref, PROMPTS)) < bound
    assert len(llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids) == 8
    start, h = header(out / "model.safetensors")
    assert start % 4096 == 0
    firsts = [k for k in h if k.endswith((".0.gate_proj.qweight", ".0.w1.qweight", ".0.gate_proj.weight"))]
    firsts = [k for k in firsts if "experts" in k]
    assert firsts and all(h[k]["data_offsets"][0] % 4096 == 0 for k in firsts)
    reader = open_expert_source(llm.source)
    assert {len(spans) for spans in reader.spans.values()} == {1}  # one read an expert
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("gptq" if experts == "int4" else "fp8")
    assert (out / "tokenizer.json").exists()


def test_mse_scales_beat_round_to_nearest_on_the_weights():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    errs = {}
    for scales in ("rtn", "mse"):
        t = GptqWriter(32, scales).quantize("p", w)
        zeros = (unpack_cols(t["p.qzeros"]) + 1) & 15  # stored minus one, as GPTQ does
        deq = dequantize_groups(unpack_rows(t["p.qweight"]), zeros, t["p.scales"], torch.float32)
        errs[scales] = (deq - w).square().sum().item()
    assert errs["mse"] < 0.97 * errs["rtn"]  # measured 0.948 on gaussian weights


def test_interrupted_convert_leaves_nothing_that_loads(tiny_checkpoint, tmp_path, monkeypatch):
    src, _ = tiny_checkpoint("qwen3_moe")
    calls, original = [], GptqWriter.quantize

    def quantize(self, base, w):  # Ctrl-C at the 20th projection
        calls.append(base)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return original(self, base, w)

    monkeypatch.setattr(GptqWriter, "quantize", quantize)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "q", writer_for("int4", 16, "rtn", 128))
    assert len(calls) == 20 and list(tmp_path.iterdir()) == []  # no --out, no partial directory


def test_bad_conversions_get_one_clear_error(tiny_checkpoint, tmp_path, capsys):
    src, _ = tiny_checkpoint("qwen3_moe")
    out = convert(src, tmp_path / "q", writer_for("fp8", 16, "rtn", 16))
    with pytest.raises(CheckpointError, match="already quantized"):
        convert(out, tmp_path / "q2", writer_for("int4", 16, "rtn", 16))
    with pytest.raises(InvalidRequestError, match="exists"):
        convert(src, out, writer_for("int4", 16, "rtn", 16))
    with pytest.raises(CheckpointError, match="no multiple of 8 and of the group size 48"):
        convert(src, tmp_path / "q3", writer_for("int4", 48, "rtn", 16))
    assert (
        cli(
            [
                "convert",
                "--model",
                str(src),
                "--experts",
                "int4",
                "--group-size",
                "48",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.count("\n") == 1
