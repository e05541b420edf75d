"""The SZD generator against ROUTING.md's published measurements of trained models: token-batched LRU
hit rates at the listed cache sizes and consecutive-token overlap within 5 points, and frequency (a
plain count of uses, the published LFU) no better than recency by more than that once a layer holds k
experts or more. (The engine's LFU decays its counts within about ten tokens, a blend of the two that
beats both on these traces and on the trained demo model's: bench/NOTES.md 52.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiermoe.offload import policy
from tiermoe.routing.replay import replay
from tiermoe.routing.synthetic import CALIBRATED, SZDRouting
from tiermoe.routing.trace import Trace

# family: (experts, top-k, {slots per layer: published LRU hit rate}, published overlap)
TARGETS = {
    "olmoe": (64, 8, {8: 0.428, 16: 0.612, 24: 0.735, 32: 0.831}, 0.415),
    "qwen3_moe": (128, 8, {8: 0.474, 16: 0.646, 24: 0.753, 32: 0.827}, 0.46),
    "mixtral": (8, 2, {1: 0.173, 2: 0.370, 4: 0.616, 6: 0.829}, 0.37),
}
LAYERS, DOCS, TOKENS = 4, 3, 512  # 512-token documents, as calibrated


def decode_stream(family: str) -> tuple[Trace, np.ndarray]:
    """DOCS documents routed one token per step and served one after another by one cache."""
    experts, k = TARGETS[family][:2]
    model = SZDRouting(LAYERS, experts, k, 0, torch.device("cpu"), CALIBRATED[family])
    docs = torch.arange(DOCS)
    rows = model.start(docs)
    model.step(
        docs, rows, torch.arange(TOKENS).expand(DOCS, TOKENS), torch.ones(DOCS, TOKENS, dtype=torch.bool)
    )
    ids = model.ids.numpy()  # [L, B, T, k]
    layer, doc, token = np.meshgrid(np.arange(LAYERS), np.arange(DOCS), np.arange(TOKENS), indexing="ij")
    prefill = np.zeros(layer.size, dtype=bool)
    trace = Trace.build(
        doc.ravel(), token.ravel(), layer.ravel(), prefill, (doc * TOKENS + token).ravel(), ids.reshape(-1, k),
        experts,
    )  # fmt: skip
    return trace, ids


@pytest.mark.parametrize("family", list(TARGETS))
def test_szd_matches_published_locality(family, monkeypatch):
    # the published LFU: counts that never decay
    monkeypatch.setitem(policy.POLICIES, "lfu", lambda: policy.LFU(half_life=math.inf))
    _experts, k, lru_targets, overlap_target = TARGETS[family]
    trace, ids = decode_stream(family)
    overlap = (ids[:, :, 1:, :, None] == ids[:, :, :-1, None, :]).any(-1).mean()
    assert overlap == pytest.approx(overlap_target, abs=0.05)
    for slots, published in lru_targets.items():
        lru = replay(trace, slots, "lru").hit_rate
        assert lru == pytest.approx(published, abs=0.05), (slots, lru)
        if slots >= k:
            # recency beats frequency on real traces; OLMoE's calibration comes out 4 points the other
            # way at 2k slots (bench/NOTES.md), inside the stated 5
            assert replay(trace, slots, "lfu").hit_rate <= lru + 0.05
