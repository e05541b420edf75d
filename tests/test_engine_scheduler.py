"""The scheduler alone: admission, chunking, preemption, freeing (no model)."""

from tiermoe.engine.kv_blocks import BlockPool
from tiermoe.engine.request import SamplingParams
from tiermoe.engine.scheduler import Request, Scheduler, Status

BLOCK = 16


def request(i: int, prompt: int) -> Request:
    return Request(i, list(range(prompt)), SamplingParams(max_tokens=64))


def run(plan) -> None:
    """What the engine does after a step: tokens computed, and a sampled token where a chunk completes."""
    for c in plan.chunks:
        done = c.completes
        c.request.num_computed += c.count
        if done:
            c.request.output_ids.append(0)


def test_prompts_are_chunked_within_the_budget_while_running_requests_decode():
    s = Scheduler(BlockPool(64), max_num_seqs=4, prefill_tokens=32)
    a, b = request(0, 20), request(1, 50)
    s.add(a)
    run(s.schedule())  # a's whole prompt
    s.add(b)
    plan = s.schedule()
    assert [(c.request.id, c.start, c.count) for c in plan.chunks] == [(0, 20, 1), (1, 0, 32)]
    run(plan)
    plan = s.schedule()
    assert [(c.request.id, c.start, c.count) for c in plan.chunks] == [(0, 21, 1), (1, 32, 18)]
    assert plan.chunks[1].completes


def test_admission_stops_at_max_num_seqs_and_is_first_come_first_served():
    s = Scheduler(BlockPool(64), max_num_seqs=2, prefill_tokens=1000)
    rs = [request(i, 4) for i in range(4)]
    for r in rs:
        s.add(r)
    plan = s.schedule()
    assert [c.request.id for c in plan.chunks] == [0, 1] and [r.id for r in s.waiting] == [2, 3]
    run(plan)
    s.finish(rs[1], "stop")
    assert [c.request.id for c in s.schedule().chunks] == [0, 2]


def test_the_newest_request_is_preempted_when_blocks_run_out_and_recomputes_later():
    pool = BlockPool(1 + 4)  # 4 usable blocks: 64 tokens
    s = Scheduler(pool, max_num_seqs=4, prefill_tokens=1000)
    old, new = request(0, 32), request(1, 32)
    s.add(old)
    s.add(new)
    run(s.schedule())  # both prompts: all 4 blocks
    assert pool.free == 0
    plan = s.schedule()  # old's next token needs a fifth block: new gives its blocks back
    assert plan.preempted == [new] and [c.request for c in plan.chunks] == [old]
    assert new.status is Status.WAITING and new.num_computed == 0 and new.blocks == [] and new.slot is None
    assert list(s.waiting) == [new] and pool.free == 1
    run(plan)
    s.finish(old, "length")
    plan = s.schedule()  # new recomputes its prompt and the token it had sampled
    assert [(c.request, c.start, c.count) for c in plan.chunks] == [(new, 0, 33)]


def test_finish_and_abort_give_every_block_back():
    pool = BlockPool(1 + 8)
    s = Scheduler(pool, max_num_seqs=4, prefill_tokens=1000)
    running, queued = request(0, 40), request(1, 10)
    s.add(running)
    run(s.schedule())
    s.add(queued)
    s.finish(queued, "abort")  # still waiting
    s.finish(running, "abort")
    assert pool.free == 8 and not s.has_work()
    assert running.finish_reason == queued.finish_reason == "abort"
