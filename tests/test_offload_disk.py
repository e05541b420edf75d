import pytest
import torch

from tiermoe.formats.dense import DenseFormat
from tiermoe.models.qwen3_moe import ARCH
from tiermoe.offload.disk import ExpertReader
from tiermoe.weights.checkpoint import Checkpoint


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("direct", [True, False])
def test_reader_returns_the_expert_weights(tiny_checkpoint, layout, direct):
    path, hf = tiny_checkpoint("qwen3_moe", layout)
    fmt = DenseFormat(64, 32, torch.float32)
    reader = ExpertReader(Checkpoint(path), fmt, ARCH.expert_names, [0, 1], 8, direct=direct)
    out = fmt.empty(1)[0]
    assert reader.read_into(1, 5, out) == 3 * 64 * 32 * 4
    experts, views = hf.model.layers[1].mlp.experts, fmt.views(out[None])
    assert torch.equal(views["gate_up"][0], experts.gate_up_proj[5].detach())
    assert torch.equal(views["down"][0], experts.down_proj[5].detach())
    assert reader.bytes_read == 3 * 64 * 32 * 4
