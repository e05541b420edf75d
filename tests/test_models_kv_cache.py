import torch

from tiermoe.models.kv_cache import BLOCK_TOKENS, KVBatch, KVCache, cache_slots

B = BLOCK_TOKENS


def cache(blocks=4):
    return KVCache([((1, 2), (1, 2))], num_blocks=blocks, dtype=torch.float32, device="cpu")


def batch(tables, positions, lengths):
    tables, positions = torch.tensor(tables), torch.tensor(positions)
    slots = tables.gather(1, positions // B) * B + positions % B
    return KVBatch(tables, slots, positions, torch.tensor(lengths))


def test_rows_write_their_own_blocks_and_read_them_back_in_position_order():
    c = cache()
    # row 0 owns blocks 3 then 1 (out of order), row 1 block 2; three tokens each at different positions
    c.bind(batch([[3, 1], [2, 0]], [[15, 16, 17], [0, 1, 2]], [18, 3]))
    k = torch.arange(12.0).view(2, 1, 3, 2)  # [B, heads, T, D]
    keys, _ = c.update(0, k, k)
    assert keys.shape == (2, 1, 2 * B, 2)
    assert keys[0, 0, 15:18].tolist() == k[0, 0].tolist()  # positions 15 (block 3) and 16, 17 (block 1)
    assert keys[1, 0, :3].tolist() == k[1, 0].tolist()
    assert c.parts[0][0][3 * B + 15, 0].tolist() == [0.0, 1.0] and c.parts[0][0][1 * B, 0].tolist() == [
        2.0,
        3.0,
    ]


def test_mask_is_causal_per_row_within_its_length_and_window():
    c = cache()
    c.bind(batch([[1], [2]], [[2, 3], [0, 0]], [4, 1]))  # row 1: one real token, then a pad at position 0
    m = c.mask(None)[:, 0, :, :5]
    assert m[0].tolist() == [[True, True, True, False, False], [True, True, True, True, False]]
    assert m[1].tolist() == [[True, False, False, False, False]] * 2
    w = c.mask(2)[0, 0, :, :5]  # window 2: a query sees itself and the one before
    assert w.tolist() == [[False, True, True, False, False], [False, False, True, True, False]]


def test_a_padding_row_sees_its_own_position_so_attention_has_no_nan():
    c = cache()
    c.bind(batch([[0]], [[0]], [0]))  # length 0: nothing written, the null block
    assert c.mask(None)[0, 0, 0, :2].tolist() == [True, False]


def test_cache_slots_are_whole_blocks_and_the_null_block():
    assert cache_slots(1) == 2 * B and cache_slots(B) == 2 * B and cache_slots(B + 1) == 3 * B
