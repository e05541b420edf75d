import torch

from tiermoe.models.kv_cache import KVCache


def cache(max_len=6):
    return KVCache(
        num_layers=1, batch=2, max_len=max_len, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu"
    )


def test_prefill_mask_is_causal_skips_padding_and_lets_pads_see_themselves():
    c = cache()
    c.start(torch.tensor([[True, True, True], [False, True, True]]))
    m = c.mask(3, None)[:, 0]
    assert m[0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert m[1].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_sliding_window_and_static_cursor_agree_with_dynamic_steps():
    dynamic, static = cache(), cache()
    for c in (dynamic, static):
        c.start(torch.ones(2, 3, dtype=torch.bool))
        c.commit()
    dynamic.start(torch.tensor([[True], [False]]))
    static.cursor.fill_(3)
    static.start_static(torch.tensor([True, False]))
    d, s = dynamic.mask(1, 2)[:, 0, 0], static.mask(1, 2)[:, 0, 0]
    # window 2: slots 2 and 3; the finished row (invalid at 3) still sees slot 2 and, as always, itself
    assert d.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert s[:, :4].tolist() == d.tolist() and not s[:, 4:].any()
    k = torch.full((2, 1, 1, 2), 7.0)
    static.update(0, k, k)
    assert static.k[0][:, :, 3].eq(7).all() and static.k[0][:, :, 4].eq(0).all()
