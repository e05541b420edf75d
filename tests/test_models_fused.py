"""The decoder's fused Triton kernels (RMSNorm, rotary) against the torch ops they replace on CUDA: compiled
on a GPU, and without one in Triton's interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tiermoe.models import fused
from tiermoe.models.layers import Float32ScaleRMSNorm, RMSNorm, rotate
from tiermoe.models.moe import SoftmaxTopKRouter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def torch_rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 96), (2, 4, 3, 128), (1, 1, 2048)])
@pytest.mark.parametrize("norm", [RMSNorm, Float32ScaleRMSNorm])
def test_rms_norm_matches_torch(dtype, shape, norm):
    torch.manual_seed(0)
    module = norm(shape[-1], 1e-6).to(DEVICE)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
    if norm is RMSNorm:
        module.to(dtype)  # the float32-scale norm keeps its weight in float32, as the loader does
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    expected = norm.forward(module.cpu(), x.cpu()).to(DEVICE)  # the torch ops: on CUDA it takes the kernel
    got = fused.rms_norm(x, module.weight.to(DEVICE), module.eps, float32_scale=norm is Float32ScaleRMSNorm)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        # The sum of squares in another order moves the float32 value by an ulp or so; after the cast to
        # bf16 that is the same bf16 value, or (rarely) the neighbouring one.
        ulps = (got.float() - expected.float()).abs() / expected.float().abs().clamp(min=1e-30) * 128
        assert ulps.max() <= 1.01 and (ulps > 0).float().mean() < 0.02, (
            ulps.max(),
            (ulps > 0).float().mean(),
        )


def test_rms_norm_of_a_strided_view_and_no_rows():
    x = torch.randn(4, 3, 64, device=DEVICE)[:, 1]  # rows 192 elements apart
    w = torch.rand(64, device=DEVICE)
    expected = _norm(w.cpu(), 1e-5)(x.cpu()).to(DEVICE)  # the torch ops, on the CPU
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), expected, rtol=1e-6, atol=1e-6)
    assert fused.rms_norm(torch.empty(0, 64, device=DEVICE), w, 1e-5).shape == (0, 64)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over the NaN row
def test_nan_stays_nan_and_a_nan_router_row_picks_ids_in_range():
    x = torch.randn(2, 64, device=DEVICE).to(torch.bfloat16)
    x[0, 3] = float("nan")
    out = fused.rms_norm(x, torch.ones(64, device=DEVICE, dtype=torch.bfloat16), 1e-6)
    assert out[0].isnan().all() and not out[1].isnan().any()  # as torch: the row's sum of squares is NaN
    # A NaN whose bits are all ones past the sign (the GPU's own) survives the rounding to bf16.
    weight = torch.ones(64, device=DEVICE)
    weight.view(torch.int32)[5] = 0x7FFFFFFF
    out = fused.rms_norm(x[1:], weight, 1e-6, float32_scale=True)
    assert out[0, 5].isnan() and not out[0, :5].isnan().any()
    logits = torch.zeros(1, 60, device=DEVICE)
    logits[0, 7] = float("nan")
    _, ids = fused.softmax_topk(logits, 4, True, torch.float32)
    assert ((ids >= 0) & (ids < 60)).all()


def _norm(weight, eps):
    module = RMSNorm(weight.numel(), eps).to(weight.device)
    module.weight.data = weight
    return module


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotate_equals_torch_exactly_on_transposed_heads(dtype):
    torch.manual_seed(1)
    b, t, h, d = 2, 5, 4, 64
    x = torch.randn(b, t, h, d, device=DEVICE).to(dtype).transpose(1, 2)  # [B, H, T, D], as attention has it
    angles = torch.rand(b, t, d // 2, device=DEVICE) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)[:, None]  # [B, 1, T, D]
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(dtype)[:, None]
    got = fused.rotate(x, cos, sin)
    assert torch.equal(got, torch_rotate(x, cos, sin))
    assert got.stride() == x.stride()  # the layout torch's elementwise ops give


def test_rotate_of_a_split_view_and_what_it_declines():
    torch.manual_seed(2)
    qk = torch.randn(1, 3, 7, 48, device=DEVICE)
    rot = qk.split([32, 16], dim=-1)[1]  # MLA's rotary part: a view with the head dimension's rows apart
    cos, sin = torch.rand(1, 1, 7, 16, device=DEVICE), torch.rand(1, 1, 7, 16, device=DEVICE)
    assert torch.equal(fused.rotate(rot, cos, sin), torch_rotate(rot, cos, sin))
    assert fused.rotate(rot.to(torch.bfloat16), cos, sin) is None  # mixed dtypes: torch's promotion
    assert fused.rotate(rot[0], cos[0], sin[0]) is None  # not [B, H, T, D]
    assert fused.rotate(rot, cos[..., :8], sin[..., :8]) is None  # does not broadcast


@pytest.mark.skipif(DEVICE != "cuda", reason="the layers take the kernels on CUDA only")
def test_layers_take_the_kernels_on_cuda(monkeypatch):
    calls = []

    def counted(name):
        kernel = getattr(fused, name)
        return lambda *a, **k: calls.append(name) or kernel(*a, **k)

    for name in ("rms_norm", "add_rms_norm", "rotate", "softmax_topk", "softmax_pick"):
        monkeypatch.setattr(fused, name, counted(name))
    with torch.no_grad():  # as the engine runs: the kernels have no backward
        x = torch.randn(1, 2, 3, 64, device="cuda")
        RMSNorm(64, 1e-6).cuda()(x)
        RMSNorm(64, 1e-6).cuda().add(x, x)
        rotate(x, torch.ones(1, 1, 3, 64, device="cuda"), torch.zeros(1, 1, 3, 64, device="cuda"))
        router = SoftmaxTopKRouter(64, 8, 2, True).cuda()
        router(x[0, 0])
        router(x[0, 0], _TopK(2), 0)  # an override that reads the probabilities takes the torch ops
        ids = torch.tensor([[1, 5]] * 3, device="cuda")
        assert torch.equal(router(x[0, 0], _Fixed(ids), 0)[1], ids)
    assert calls == ["rms_norm", "add_rms_norm", "rotate", "softmax_topk", "softmax_pick"]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("experts", "k"), [(128, 8), (60, 4), (8, 2)])
def test_softmax_topk_matches_the_router(normalize, experts, k):
    torch.manual_seed(3)
    router = SoftmaxTopKRouter(32, experts, k, normalize).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
    x = torch.randn(9, 32, device=DEVICE).to(torch.bfloat16)
    expected_weights, expected_ids = SoftmaxTopKRouter.forward(router, x, _TopK(k), 0)  # the torch ops
    weights, ids = fused.softmax_topk(torch.nn.functional.linear(x, router.weight), k, normalize, x.dtype)
    # The same experts with the same weights; among equal probabilities (bf16 logits tie now and then)
    # torch.topk's order is its own, so each row is compared in id order.
    ids, order = ids.sort(-1)
    expected_ids, expected_order = expected_ids.sort(-1)
    assert torch.equal(ids, expected_ids)
    assert weights.dtype == torch.bfloat16
    torch.testing.assert_close(  # within a bf16 ulp
        weights.gather(-1, order), expected_weights.gather(-1, expected_order), rtol=8e-3, atol=0
    )


def test_softmax_topk_takes_the_lower_id_among_equals():
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0]], device=DEVICE)
    weights, ids = fused.softmax_topk(logits, 3, True, torch.float32)
    assert ids.tolist() == [[1, 2, 4]]
    torch.testing.assert_close(weights, torch.full((1, 3), 1 / 3, device=DEVICE))


class _TopK:
    """A routing override that chooses as the router does, so the router's forward runs its torch ops."""

    def __init__(self, k: int):
        self.k = k

    def route(self, layer, probs):
        return probs.topk(self.k, dim=-1).indices

    def needs_probs(self):
        return True


class _Fixed:
    """A routing override that chooses alone (as the routing models do): the ids it was given."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def route(self, layer, probs):
        return self.ids

    def needs_probs(self):
        return False


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_pick_matches_the_routers_gather(normalize):
    torch.manual_seed(4)
    logits = torch.randn(7, 60, device=DEVICE).to(torch.bfloat16)
    ids = torch.randint(0, 60, (7, 4), device=DEVICE)
    probs = torch.softmax(logits.cpu(), -1, dtype=torch.float32).gather(-1, ids.cpu())
    expected = (probs / probs.sum(-1, keepdim=True) if normalize else probs).to(torch.bfloat16).to(DEVICE)
    got = fused.softmax_pick(logits, ids, normalize, torch.bfloat16)
    torch.testing.assert_close(got, expected, rtol=8e-3, atol=0)  # within a bf16 ulp


def test_rms_norm_and_rotate_of_heads_inside_a_fused_projection():
    """q and k as views into one q/k/v projection [B, T, width]: per-head rows two strides apart."""
    torch.manual_seed(5)
    b, t, heads, d = 2, 3, 4, 32
    qkv = torch.randn(b, t, heads * d + 2 * 2 * d, device=DEVICE)
    q = qkv[..., : heads * d].view(b, t, heads, d)
    w = torch.rand(d, device=DEVICE)
    expected = _norm(w.cpu(), 1e-6)(q.cpu()).to(DEVICE)
    torch.testing.assert_close(fused.rms_norm(q, w, 1e-6), expected, rtol=1e-6, atol=1e-6)
    k = qkv[..., heads * d : heads * d + 2 * d].view(b, t, 2, d).transpose(1, 2)  # [B, kv heads, T, D]
    cos, sin = torch.rand(b, 1, t, d, device=DEVICE), torch.rand(b, 1, t, d, device=DEVICE)
    out = fused.rotate(k, cos, sin)
    assert torch.equal(out, torch_rotate(k, cos, sin))
    assert out.transpose(1, 2).is_contiguous()  # [B, T, heads, D] in memory: the cache writes it as a view


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", [RMSNorm, Float32ScaleRMSNorm])
def test_add_rms_norm_is_the_residual_add_then_the_norm(dtype, norm):
    torch.manual_seed(6)
    module = norm(96, 1e-6)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.3)
    if norm is RMSNorm:
        module.to(dtype)
    x, delta = (torch.randn(2, 3, 96) * 2).to(dtype), torch.randn(2, 3, 96).to(dtype)
    total, normed = module.add(x, delta)  # the torch ops, on the CPU
    got_total, got = fused.add_rms_norm(
        x.to(DEVICE), delta.to(DEVICE), module.weight.to(DEVICE), 1e-6, norm.float32_scale
    )
    assert torch.equal(got_total.cpu(), total)  # one rounding of the sum, as torch's add
    assert got.dtype == normed.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.cpu(), normed, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got.cpu().float(), normed.float(), rtol=8e-3, atol=0)  # a bf16 ulp
    assert fused.add_rms_norm(x.to(DEVICE).mT, delta.to(DEVICE).mT, module.weight, 1e-6) is None


def packed(*columns: torch.Tensor) -> list[torch.Tensor]:
    """Views of the columns [B, n] side by side in one [B, sum n] tensor, rows one packed row apart, as
    the runner's StepInputs has a step's positions, slots, lengths and block tables."""
    whole = torch.cat(columns, dim=1)
    return list(whole.split([c.shape[1] for c in columns], dim=1))


def _attention_reference(q, keys, values, mask, sinks):
    """SDPA's math in float64 over the gathered cache: q [B, H, 1, D], keys [B, KV, L, D], mask
    [B, 1, 1, L]; a sink is one more logit per head with no value."""
    b, h, _, d = q.shape
    group = h // keys.shape[1]
    keys, values = (x.double().repeat_interleave(group, dim=1) for x in (keys, values))
    s = (q.double() @ keys.transpose(-1, -2)) * d**-0.5  # [B, H, 1, L]
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(b, h, 1, 1)], dim=-1)
    p = s.softmax(-1)[..., : keys.shape[2]]
    return (p @ values).transpose(1, 2).reshape(b, 1, h * d)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "dtype"),
    [(32, 4, 128, torch.bfloat16), (16, 16, 64, torch.bfloat16), (8, 2, 64, torch.float32)],
)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("split", [False, True])
def test_decode_attention_reads_the_paged_cache_as_sdpa_over_the_gathered_keys(
    heads, kv_heads, d, dtype, window, split, monkeypatch
):
    """Rows of different lengths whose blocks are out of order, a padding row (the null block, length 0)
    and, with split, keys spread over several programs whose partials combine; sinks on the first case."""
    from tiermoe.models.kv_cache import BLOCK_TOKENS, KVBatch, KVCache

    torch.manual_seed(5)
    if split:
        monkeypatch.setattr(fused, "KEYS_PER_SPLIT", 16)
    cache = KVCache([((kv_heads, d),) * 2], num_blocks=12, dtype=dtype, device=DEVICE)
    for pool in cache.parts[0]:
        pool.normal_()  # stale values everywhere: what the mask hides must not count
    tables = torch.tensor([[3, 7, 1, 9], [2, 0, 0, 0], [0, 0, 0, 0], [5, 11, 4, 0]], device=DEVICE)
    lengths = torch.tensor([50, 9, 0, 20], device=DEVICE)
    # the padding row at position 0; the last row's length stops short of its position (keys 0-19 and its own)
    positions = torch.tensor([[49], [8], [0], [33]], device=DEVICE)
    slots = tables.gather(1, positions // BLOCK_TOKENS) * BLOCK_TOKENS + positions % BLOCK_TOKENS
    tables, slots, positions, lengths = packed(tables, slots, positions, lengths[:, None])
    cache.bind(KVBatch(tables, slots, positions, lengths[:, 0]))
    q, k, v = (torch.randn(4, n, 1, d, device=DEVICE).to(dtype) for n in (heads, kv_heads, kv_heads))
    sinks = torch.randn(heads, device=DEVICE) if heads == 32 else None
    keys, values = cache.update(0, k, v)  # the token's key and value written, every row's gathered
    k_pool, v_pool = cache.parts[0]
    got = fused.decode_attention(
        q, k_pool, v_pool, tables, positions, lengths[:, 0], BLOCK_TOKENS, window, sinks
    )
    expected = _attention_reference(q, keys, values, cache.mask(window), sinks)
    assert got.shape == (4, 1, heads * d) and got.dtype == dtype
    bound = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: p rounded before it weighs the values
    assert (got.double() - expected).abs().max() < bound


@pytest.mark.skipif(DEVICE != "cuda", reason="the layers take the kernels on CUDA only")
@pytest.mark.parametrize("sinks", [False, True])
def test_a_decode_step_of_the_attention_layer_takes_the_paged_kernel(monkeypatch, sinks):
    from tiermoe.models.kv_cache import BLOCK_TOKENS, KVBatch, KVCache
    from tiermoe.models.layers import Attention, AttentionSpec

    torch.manual_seed(2)
    calls = []
    for name in ("rope_into_cache", "decode_attention"):
        kernel = getattr(fused, name)
        monkeypatch.setattr(
            fused, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw)
        )
    spec = AttentionSpec(256, 8, 2, 32, 1e-6, qk_norm="head", sliding_window=5, sinks=sinks)
    layer = Attention(spec, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    outs = []
    for device in ("cpu", "cuda"):
        layer.to(device)
        cache = KVCache([spec.cache_shapes()], num_blocks=4, dtype=torch.float32, device=device)
        for pool, seed in zip(cache.parts[0], (0, 1), strict=True):
            pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(seed)))
        tables = torch.tensor([[2, 1], [3, 0]], device=device)
        positions = torch.tensor([[20], [3]], device=device)
        slots = tables.gather(1, positions // BLOCK_TOKENS) * BLOCK_TOKENS + positions % BLOCK_TOKENS
        tables, slots, positions, lengths = packed(tables, slots, positions, positions + 1)  # as the runner's
        cache.bind(KVBatch(tables, slots, positions, lengths[:, 0]))
        x = torch.randn(2, 1, 256, generator=torch.Generator().manual_seed(3)).to(device)
        angles = torch.rand(2, 1, 16, generator=torch.Generator().manual_seed(4)).to(device) * 6
        cos, sin = (torch.cat([f(angles)] * 2, dim=-1) for f in (torch.cos, torch.sin))
        with torch.no_grad():
            outs.append(layer(x, (cos, sin), cache).cpu())
    assert calls == ["rope_into_cache", "decode_attention"]  # the CUDA forward, not the CPU one
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("d", "norm", "dtype"),
    [(64, True, torch.bfloat16), (128, False, torch.bfloat16), (32, True, torch.float32)],
)
def test_rope_into_cache_is_the_norms_the_rotations_and_the_writes(d, norm, dtype):
    """One launch against the kernels it replaces (the per-head RMSNorm, the rotary embedding, the
    cache's index_copy): the same bits. q, k, v are views into one fused projection, as the layer has them."""
    torch.manual_seed(4)
    b, heads, kv_heads = 3, 8, 2
    qkv = (torch.randn(b, 1, (heads + 2 * kv_heads) * d, device=DEVICE) * 2).to(dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    angles = torch.rand(b, 1, d // 2, device=DEVICE) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    slots = packed(
        torch.tensor([[17], [40], [3]], device=DEVICE), torch.zeros(3, 4, dtype=torch.long, device=DEVICE)
    )[0]
    pools = [torch.zeros(64, kv_heads, d, dtype=dtype, device=DEVICE) for _ in range(4)]
    weights = [(torch.rand(d, device=DEVICE) + 0.5).to(dtype) for _ in range(2)] if norm else None
    got = fused.rope_into_cache(q, k, v, cos, sin, slots, pools[0], pools[1], weights, 1e-6)
    qh, kh = q.view(b, 1, heads, d), k.view(b, 1, kv_heads, d)
    if norm:
        qh, kh = fused.rms_norm(qh, weights[0], 1e-6), fused.rms_norm(kh, weights[1], 1e-6)
    qr = fused.rotate(qh.transpose(1, 2), cos[:, None], sin[:, None])  # [B, H, 1, D]
    kr = fused.rotate(kh.transpose(1, 2), cos[:, None], sin[:, None])
    pools[2].index_copy_(0, slots.reshape(-1), kr[:, :, 0])
    pools[3].index_copy_(0, slots.reshape(-1), v.view(b, kv_heads, d))
    assert got.shape == (b, heads, 1, d)
    assert torch.equal(got, qr)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    assert pools[0].abs().sum() > 0  # written


@pytest.mark.skipif(DEVICE != "cuda", reason="SDPA's memory-efficient kernel is CUDA's")
def test_a_long_prompt_chunk_of_grouped_heads_never_holds_the_full_scores():
    """A 1,024-token chunk of 32 query heads on 4 key heads against 1,024 keys: SDPA's math path (a mask
    with enable_gqa) would hold float32 scores of 32 x 1,024 x 1,024 (128 MiB) and their softmax; the
    memory-efficient kernel on repeated key heads holds the repeats (16 MiB) and the mask."""
    from tiermoe.models.kv_cache import KVBatch, KVCache
    from tiermoe.models.layers import Attention, AttentionSpec

    spec = AttentionSpec(1024, 32, 4, 64, 1e-6)
    layer = Attention(spec, 0).cuda().to(torch.bfloat16)
    cache = KVCache([spec.cache_shapes()], num_blocks=65, dtype=torch.bfloat16, device="cuda")
    t = 1024
    tables = torch.arange(1, 65, device="cuda")[None]
    positions = torch.arange(t, device="cuda")[None]
    cache.bind(KVBatch(tables, positions + 16, positions, torch.tensor([t], device="cuda")))
    x = torch.randn(1, t, 1024, device="cuda", dtype=torch.bfloat16)
    rope = (torch.ones(1, t, 64, device="cuda", dtype=torch.bfloat16),) * 2
    with torch.no_grad():
        layer(x, rope, cache)  # warm-up: kernels chosen, workspaces allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        layer(x, rope, cache)
        torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 64 << 20
