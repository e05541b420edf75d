"""The decoder layers' own mechanics: q, k and v fused into one projection after loading."""

from __future__ import annotations

import pytest
import torch

from tiermoe import LLM
from tiermoe.models.layers import Attention

from .conftest import prompt_logits
from .test_models import PROMPTS


@pytest.mark.parametrize(
    ("arch", "overrides"), [("qwen3_moe", {}), ("olmoe", {"clip_qkv": 0.5}), ("gpt_oss", {})]
)
def test_qkv_fused_after_loading_gives_the_same_logits(tiny_checkpoint, monkeypatch, arch, overrides):
    path, _ = tiny_checkpoint(arch, "fused" if arch == "gpt_oss" else "per_expert", **overrides)
    fused = LLM(path, device="cpu", dtype="fp32")
    attn = [m for m in fused.model.modules() if isinstance(m, Attention)]
    assert attn and all(a.qkv is not None for a in attn)
    for a in attn:  # the three weights (and biases) are views into the fused ones: no memory added
        weight, bias, _ = a.qkv
        assert a.q_proj.weight.data_ptr() == weight.data_ptr()
        assert a.v_proj.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        assert (bias is not None) == (arch == "gpt_oss")
    monkeypatch.setattr(Attention, "fuse_qkv", lambda self: None)
    apart = LLM(path, device="cpu", dtype="fp32")
    assert all(m.qkv is None for m in apart.model.modules() if isinstance(m, Attention))
    torch.testing.assert_close(
        prompt_logits(fused, PROMPTS), prompt_logits(apart, PROMPTS), rtol=1e-5, atol=1e-5
    )
