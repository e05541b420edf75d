"""Routing models on their own: uniform spreads evenly, SZD is sticky, seeded and independent per row,
the hash RNG has the right laws, and --routing values parse or fail clearly."""

from __future__ import annotations

import pytest
import torch

from tiermoe.errors import InvalidRequestError
from tiermoe.routing import rng
from tiermoe.routing.spec import parse_routing
from tiermoe.routing.synthetic import CALIBRATED, SZDParams, SZDRouting, UniformRouting


def route(model, docs: list[int], tokens: int) -> torch.Tensor:
    """ids [L, B, tokens, k] of fresh documents, routed one token per step as in decode."""
    d = torch.tensor(docs)
    rows = model.start(d)
    out = []
    for t in range(tokens):
        model.step(d, rows, torch.full((len(docs), 1), t), torch.ones(len(docs), 1, dtype=torch.bool))
        out.append(model.ids)
    return torch.cat(out, dim=2)


def test_rng_laws():
    h = rng.hash_keys(7, torch.arange(200_000))
    u = rng.uniform(h)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    z = rng.normal(h)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(rng.gumbel(h).mean() - 0.5772) < 0.01  # Euler-Mascheroni
    assert torch.equal(h, rng.hash_keys(7, torch.arange(200_000)))  # a pure function of its keys
    assert not torch.equal(h, rng.hash_keys(8, torch.arange(200_000)))


def test_uniform_spreads_tokens_evenly():
    E, k, n = 16, 4, 4000
    model = UniformRouting(2, E, k, seed=0, device=torch.device("cpu"))
    d = torch.tensor([0])
    rows = model.start(d)
    model.step(d, rows, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))  # one long step: n tokens
    ids = model.ids  # [2, 1, n, k]
    assert all(len(set(row.tolist())) == k for row in ids.reshape(-1, k))  # k distinct per token
    for layer in range(2):
        counts = torch.bincount(ids[layer].reshape(-1), minlength=E).float()
        expected = n * k / E
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        # E - 1 = 15 degrees of freedom: the 99.9th percentile of chi-square is 37.7. Sampling k of E
        # without replacement makes the counts less spread than multinomial, so the bound is loose.
        assert chi2 < 37.7
    # no locality: consecutive tokens share k*k/E experts on average (1 of 4 here)
    overlap = (ids[0, 0, 1:, :, None] == ids[0, 0, :-1, None, :]).any(-1).float().mean().item()
    assert abs(overlap - k / E) < 0.03


def test_szd_is_sticky_seeded_and_per_row():
    params = CALIBRATED["olmoe"]
    model = lambda seed: SZDRouting(3, 64, 8, seed, torch.device("cpu"), params)  # noqa: E731
    a = route(model(0), [0, 1], 64)
    assert torch.equal(a, route(model(0), [0, 1], 64))  # seeded: identical
    assert not torch.equal(a, route(model(1), [0, 1], 64))
    # a row's routing depends on its document, never on the rest of the batch
    assert torch.equal(a[:, 1], route(model(0), [1], 64)[:, 0])
    assert torch.equal(a[:, 0], route(model(0), [0, 5, 9], 64)[:, 0])
    assert not torch.equal(a[:, 0], a[:, 1])
    # consecutive-token overlap near OLMoE's published 0.40-0.43, far above uniform's k/E = 0.125
    overlap = (a[:, :, 1:, :, None] == a[:, :, :-1, None, :]).any(-1).float().mean().item()
    assert 0.35 < overlap < 0.5


def test_szd_padding_and_finished_rows_leave_state_alone():
    model = SZDRouting(2, 32, 4, 0, torch.device("cpu"), CALIBRATED["qwen3_moe"])
    d = torch.tensor([0])
    rows = model.start(d)
    before = [t.clone() for t in model.state()]
    model.step(d, rows, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))
    assert all(torch.equal(x, y) for x, y in zip(before, model.state(), strict=True))


def test_parse_routing():
    assert parse_routing("uniform").mode == "uniform"
    spec = parse_routing("szd:phi=0.9,p_stick=0.2", "olmoe")
    assert spec.szd == SZDParams(0.9, 0.25, 1.0, 0.9, 0.2)  # the others stay OLMoE's calibration
    assert parse_routing("szd", "qwen3_moe").szd == CALIBRATED["qwen3_moe"]
    assert parse_routing("szd", "qwen2_moe").szd == CALIBRATED["mixtral"]  # uncalibrated: Mixtral-like
    assert parse_routing("trace:/x/y.npz").trace_path == "/x/y.npz"
    for bad in ("bogus", "szd:phi=2", "szd:nope=1", "szd:phi=x", "trace:", "uniform:3"):
        with pytest.raises(InvalidRequestError):
            parse_routing(bad)


def test_the_decode_kernel_routes_as_the_torch_ops():
    """The one-launch decode step (szd_kernel.py, Triton's interpreter here) against SZDRouting's torch
    ops over 12 steps of three rows, one of them padding, each step from the same state: the same experts,
    scores and state, so the kernel's hashes are rng.py's bit for bit and its draws the same float32
    formulas. Kept experts all score about 1e9 (float32 cannot tell them apart), so their order is
    topk's tie order, which torch leaves open: compared as sets."""
    pytest.importorskip("triton")
    from tiermoe.routing import synthetic
    from tiermoe.routing.szd_kernel import szd_decode

    models = [SZDRouting(6, 60, 4, 3, torch.device("cpu"), CALIBRATED["qwen3_moe"]) for _ in range(2)]
    docs = torch.tensor([7, 2, 0])
    for m in models:
        m.start(docs)
    # rows one packed row apart, as the runner's StepInputs has them
    rows = torch.tensor([[9, 0], [9, 1], [9, 2]])[:, 1]
    valid = torch.tensor([[True, False], [True, False], [False, False]])[:, :1]
    kept = 0
    for step in range(12):
        for name, t in models[0]._state.items():
            models[1]._state[name].copy_(t)
        kept += models[0]._state["prev"][:, :2].ge(0).sum().item()
        positions = torch.tensor([[step, 7], [step + 5, 7], [0, 7]])[:, :1]
        models[0].step(docs, rows, positions, valid)
        szd_decode(
            models[1], docs, rows, positions, valid, (synthetic._EPS, synthetic._GUMBEL, synthetic._STICK)
        )
        assert torch.equal(models[0].ids.sort(-1).values, models[1].ids.sort(-1).values), step
        torch.testing.assert_close(models[1].h, models[0].h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(models[1]._state["z"], models[0]._state["z"], rtol=1e-5, atol=1e-5)
        prev = [m._state["prev"].sort(-1).values for m in models]
        assert torch.equal(prev[0], prev[1]), step
    assert kept == 11 * 6 * 2 * 4  # from the second step on, every row's previous experts (some kept)
