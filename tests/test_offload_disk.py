import pytest
import torch

from tiermoe.models.qwen3_moe import ARCH
from tiermoe.offload.disk import ExpertReader
from tiermoe.weights.checkpoint import Checkpoint


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("direct", [True, False])
def test_reader_returns_the_expert_weights(tiny_checkpoint, layout, direct):
    path, hf = tiny_checkpoint("qwen3_moe", layout)
    reader = ExpertReader(Checkpoint(path), ARCH.expert_names, [0, 1], 8, (64, 32), direct=direct)
    out = torch.empty(3 * 64 * 32)
    assert reader.read_into(1, 5, out) == 3 * 64 * 32 * 4
    experts = hf.model.layers[1].mlp.experts
    assert torch.equal(out[: 2 * 32 * 64].view(64, 64), experts.gate_up_proj[5].detach())
    assert torch.equal(out[2 * 32 * 64 :].view(64, 32), experts.down_proj[5].detach())
    assert reader.bytes_read == 3 * 64 * 32 * 4
