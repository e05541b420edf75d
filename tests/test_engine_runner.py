"""The runner's packed step inputs: what a captured decode graph reads from its static buffer."""

from tiermoe.engine.runner import Row, StepInputs, decode_rows
from tiermoe.models.kv_cache import BLOCK_TOKENS


def test_inputs_are_views_of_the_buffer_so_a_refilled_buffer_is_a_new_step():
    """A graph captured with one real row and replayed with two must see both: every derived input
    (validity, the logits' positions) is computed from the buffer when the forward runs."""
    first = StepInputs.pack([Row([7], 20, [3, 1], 0)], 2, 1, 2, pad_row=9)
    inputs = StepInputs.unpack(first, 1)
    assert inputs.valid().tolist() == [[True], [False]] and inputs.rows.tolist() == [0, 9]
    first.copy_(StepInputs.pack([Row([7], 20, [3, 1], 0), Row([8], 5, [2], 4)], 2, 1, 2, pad_row=9))
    assert inputs.valid().tolist() == [[True], [True]] and inputs.rows.tolist() == [0, 4]
    assert inputs.ids.tolist() == [[7], [8]] and inputs.logits_at().tolist() == [0, 0]
    # position 20 sits in the row's second block (1), position 5 in its first (2)
    assert inputs.kv.slots.tolist() == [[1 * BLOCK_TOKENS + 4], [2 * BLOCK_TOKENS + 5]]
    assert inputs.kv.lengths.tolist() == [21, 6] and inputs.kv.tables.tolist() == [[3, 1], [2, 0]]


def test_prompt_rows_are_right_padded():
    packed = StepInputs.pack([Row([1, 2, 3], 0, [5], 1), Row([4], 3, [6], 2)], 2, 3, 1, pad_row=9)
    inputs = StepInputs.unpack(packed, 3)
    assert inputs.valid().tolist() == [[True, True, True], [True, False, False]]
    assert inputs.logits_at().tolist() == [2, 0] and inputs.positions.tolist() == [[0, 1, 2], [3, 0, 0]]


def test_decode_batches_round_to_few_graph_sizes():
    assert [decode_rows(n) for n in (1, 2, 3, 4, 5, 8, 9, 17)] == [1, 2, 4, 4, 8, 8, 16, 24]
