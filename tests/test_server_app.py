"""The real server on a loopback port, the real engine on the small random demo model, driven by the
official openai client (and raw HTTP for what a client library would not send)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")
httpx2 = pytest.importorskip("httpx2")
openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families

from tiermoe import LLM, SamplingParams
from tiermoe.demo import write_random_checkpoint
from tiermoe.server.app import create_app
from tiermoe.server.serve import serving

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]
PROMPT = "The quick brown fox"
# Random weights make greedy decoding end on eos at arbitrary points; ignore_eos (a vLLM extension we
# accept) makes every completion exactly max_tokens long.
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = write_random_checkpoint(tmp_path_factory.mktemp("server") / "tiny-qwen3-moe")
    # A 1024-token context keeps the fill-the-context test's prefill short; a 20 MiB "GPU" budget puts
    # the tiered expert store to work (on the CPU it is still a budgeted pool), so its metrics count.
    return LLM(path, device="cpu", dtype="fp32", max_model_len=1024, gpu_budget_gib=0.02)


@pytest.fixture(scope="module")
def url(llm):
    with serving(create_app(llm)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def metric(url: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx2.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def wait_idle(url: str) -> None:
    """Until the engine worker is idle, so the test may call the LLM object directly."""
    deadline = time.monotonic() + 10
    while metric(url, "tiermoe_requests_running") or metric(url, "tiermoe_requests_queued"):
        assert time.monotonic() < deadline, "the engine never went idle"
        time.sleep(0.02)


def test_models_and_health(url, client, llm):
    assert [m.id for m in client.models.list().data] == [llm.model_name] == ["tiny-qwen3-moe"]
    health = httpx2.get(url + "/health").json()
    assert health == {"status": "ok", "model": "tiny-qwen3-moe", "queued": 0}
    assert client.models.retrieve("tiny-qwen3-moe").id == "tiny-qwen3-moe"
    r = httpx2.get(url + "/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_model_served_under_several_names(llm):
    with serving(create_app(llm, ["tiny-qwen3-moe", "acme/tiny"])) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-qwen3-moe", "acme/tiny"]
        assert client.models.retrieve("acme/tiny").id == "acme/tiny"  # a slash in the id
        r = client.completions.create(model="acme/tiny", prompt=PROMPT, max_tokens=2, extra_body=NO_EOS)
        assert r.model == "acme/tiny" and r.usage.completion_tokens == 2
        assert httpx2.get(url + "/health").json()["model"] == "tiny-qwen3-moe"


def test_chat_greedy_equals_llm_chat(client, llm):
    ref = llm.chat(MESSAGES, SamplingParams(max_tokens=16, ignore_eos=True))
    r = client.chat.completions.create(
        model=llm.model_name, messages=MESSAGES, max_tokens=16, temperature=0, extra_body=NO_EOS
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.refusal is None and r.choices[0].message.annotations == []
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        ref.stats.prompt_tokens, 16, ref.stats.prompt_tokens + 16
    )  # fmt: skip
    stats = r.model_extra["stats"]
    assert stats["ttft_s"] > 0 and stats["prefill_tok_s"] > 0 and stats["decode_tok_s"] > 0
    assert stats["completion_tokens"] == 16


def test_chat_stream_equals_llm_chat_and_ends_with_usage(client, llm):
    ref = llm.chat(MESSAGES, SamplingParams(max_tokens=16, ignore_eos=True))
    chunks = list(
        client.chat.completions.create(
            model=llm.model_name,
            messages=MESSAGES,
            max_completion_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishes] == ["length"]
    assert finishes[0].model_extra["stats"]["completion_tokens"] == 16
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        ref.stats.prompt_tokens,
        16,
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_greedy_equals_generate_streamed_and_not(client, llm):
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    whole = client.completions.create(
        model=llm.model_name, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=NO_EOS
    )
    assert whole.choices[0].text == ref.text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ref.prompt_token_ids), 12)
    chunks = list(
        client.completions.create(
            model=llm.model_name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True, extra_body=NO_EOS
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["stats"]["prompt_tokens"] == len(ref.prompt_token_ids)


def test_token_id_prompt(client, llm):
    ids = llm.encode(PROMPT)
    r = client.completions.create(
        model=llm.model_name, prompt=ids, max_tokens=6, temperature=0, extra_body=NO_EOS
    )
    assert r.choices[0].text == llm.generate(ids, SamplingParams(max_tokens=6, ignore_eos=True))[0].text


def test_seed_makes_sampling_reproducible(client, llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    ref = llm.generate(PROMPT, params)[0].text
    texts = [
        client.completions.create(
            model=llm.model_name, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=11, extra_body=NO_EOS
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert texts == [ref, ref]


def test_server_seed_is_the_seed_of_requests_that_send_none(llm):
    sampled = dict(model=M, prompt=PROMPT, max_tokens=16, temperature=1.0, extra_body=NO_EOS)
    with serving(create_app(llm, seed=7)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        unseeded = [client.completions.create(**sampled).choices[0].text for _ in range(2)]
        own = client.completions.create(**sampled, seed=11).choices[0].text
    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    assert unseeded == [llm.generate(PROMPT, dataclasses.replace(params, seed=7))[0].text] * 2
    assert own == llm.generate(PROMPT, dataclasses.replace(params, seed=11))[0].text != unseeded[0]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text(client, llm, stream):
    # Sampled text (seeded) varies more than greedy text of random weights, so the stop string is
    # found mid-text rather than at the first repeat.
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True)
    full = llm.generate(PROMPT, params)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    r = client.completions.create(
        model=llm.model_name,
        prompt=PROMPT,
        max_tokens=24,
        temperature=1.0,
        seed=5,
        stop=[stop],
        stream=stream,
        extra_body=NO_EOS,
    )
    chunks = list(r) if stream else [r]
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_thinking_switch_reaches_the_chat_template(client, llm):
    def prompt_tokens(**extra) -> int:
        r = client.chat.completions.create(
            model=llm.model_name, messages=MESSAGES, max_tokens=1, temperature=0, extra_body=extra
        )
        return r.usage.prompt_tokens

    def expected(thinking: bool | None) -> int:
        return len(llm.encode(llm.apply_chat_template(MESSAGES, enable_thinking=thinking), False))

    # The demo's ChatML template writes an empty <think></think> block when thinking is off.
    assert expected(False) > expected(None)
    assert prompt_tokens() == expected(None)
    assert prompt_tokens(enable_thinking=False) == expected(False)
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) == expected(False)


def test_no_max_tokens_means_up_to_the_end_of_the_context(client, llm):
    # A prompt that leaves 3 tokens of context: without max_tokens the server fills exactly those.
    ids = llm.encode(PROMPT)
    ids = (ids * llm.max_model_len)[: llm.max_model_len - 3]
    r = client.completions.create(model=llm.model_name, prompt=ids, temperature=0, extra_body=NO_EOS)
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
M = "tiny-qwen3-moe"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
BAD_REQUESTS = [
    # (name, path, body, status, param)
    ("malformed JSON", CHAT, b'{"messages": [{"role": "user"', 400, None),
    ("no body", CHAT, b"", 400, None),
    ("missing messages", CHAT, {"model": "tiny-qwen3-moe"}, 400, "messages"),
    ("messages not a list", CHAT, {"model": M, "messages": "hi"}, 400, "messages"),
    (
        "unknown role",
        CHAT,
        {"model": M, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    (
        "max_tokens not an integer",
        CHAT,
        {"model": M, "messages": USER, "max_tokens": "ten"},
        400,
        "max_tokens",
    ),
    ("negative temperature", CHAT, {"model": M, "messages": USER, "temperature": -1}, 400, "temperature"),
    ("n above 1", CHAT, {"model": M, "messages": USER, "n": 3}, 400, "n"),
    ("unknown model", CHAT, {"model": "gpt-4o", "messages": USER}, 404, "model"),
    (
        "max_tokens beyond the context",
        CHAT,
        {"model": M, "messages": USER, "max_tokens": 10**6},
        400,
        "max_tokens",
    ),
    ("prompt beyond the context", COMPLETIONS, {"model": M, "prompt": "fox " * 5000}, 400, "prompt"),
    (
        "prompt at the context",
        COMPLETIONS,
        {"model": M, "prompt": [5] * 1022, "max_tokens": 4},
        400,
        "max_tokens",
    ),
    (
        "streamed prompt beyond the context",
        COMPLETIONS,
        {"model": M, "prompt": "fox " * 5000, "max_tokens": 4, "stream": True},
        400,
        "prompt",
    ),
    ("empty prompt", COMPLETIONS, {"model": M, "prompt": "", "max_tokens": 4}, 400, "prompt"),
    (
        "token id outside the vocabulary",
        COMPLETIONS,
        {"model": M, "prompt": [10**6], "max_tokens": 4},
        400,
        "prompt",
    ),
    ("missing prompt", COMPLETIONS, {"model": M, "max_tokens": 4}, 400, "prompt"),
    ("missing model", CHAT, {"messages": USER}, 400, "model"),
    ("missing model, completions", COMPLETIONS, {"prompt": "x"}, 400, "model"),
    (
        "an image",
        CHAT,
        {"model": M, "messages": [{"role": "user", "content": [IMAGE]}]},
        400,
        "messages.0.content.0.type",
    ),
    ("best_of", COMPLETIONS, {"model": M, "prompt": "x", "best_of": 2}, 400, "best_of"),
    (
        "json response_format",
        CHAT,
        {"model": M, "messages": USER, "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    ("logit_bias", CHAT, {"model": M, "messages": USER, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("seed beyond 64 bits", CHAT, {"model": M, "messages": USER, "seed": 2**70}, 400, "seed"),
    (
        "NaN temperature",
        COMPLETIONS,
        b'{"model": "tiny-qwen3-moe", "prompt": "x", "temperature": NaN}',
        400,
        "temperature",
    ),
    (
        "negative stop token",
        COMPLETIONS,
        {"model": M, "prompt": "x", "stop_token_ids": [-1]},
        400,
        "stop_token_ids",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_gets_an_openai_error_and_the_server_stays_up(
    url, client, llm, path, body, status, param
):
    if isinstance(body, bytes):
        r = httpx2.post(url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx2.post(url + path, json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"
    # The engine serves the next request.
    ok = client.completions.create(model=llm.model_name, prompt=PROMPT, max_tokens=2, extra_body=NO_EOS)
    assert ok.usage.completion_tokens == 2


def test_body_errors_say_what_to_fix(url):
    malformed = httpx2.post(
        url + CHAT, content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert malformed.json()["error"]["message"].startswith("malformed JSON body: ")
    # What `curl -d '{...}'` sends when -H "Content-Type: application/json" is forgotten.
    form = {"content-type": "application/x-www-form-urlencoded"}
    undeclared = httpx2.post(url + CHAT, content=json.dumps({"messages": USER}), headers=form)
    assert undeclared.status_code == 400
    assert "Content-Type: application/json" in undeclared.json()["error"]["message"]


def test_the_openai_client_raises_its_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
        client.chat.completions.create(model="tiny-qwen3-moe", messages=USER, max_tokens=10**6)


def test_client_disconnect_mid_stream_frees_the_engine(url, client, llm):
    max_tokens = 1000  # ~5 s of decoding on 2 CPU cores if the engine kept going
    aborted = metric(url, "tiermoe_requests_total", endpoint=COMPLETIONS, outcome="aborted")
    generated = metric(url, "tiermoe_completion_tokens_total")
    body = {"model": M, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, **NO_EOS}
    with httpx2.stream("POST", url + COMPLETIONS, json=body) as r:
        assert r.status_code == 200
        data = (line for line in r.iter_lines() if line.startswith("data: "))
        assert len(list(itertools.islice(data, 3))) == 3
    # Leaving the block closed the connection mid-stream: the engine drops the request at the next step.
    nxt = client.completions.create(model=llm.model_name, prompt=PROMPT, max_tokens=4, extra_body=NO_EOS)
    assert nxt.usage.completion_tokens == 4
    assert metric(url, "tiermoe_requests_total", endpoint=COMPLETIONS, outcome="aborted") == aborted + 1
    # The engine stopped within a few tokens of the disconnect, not after max_tokens.
    assert metric(url, "tiermoe_completion_tokens_total") - generated - 4 < 100
    wait_idle(url)
    assert metric(url, "tiermoe_kv_cache_usage") == 0 and llm.engine.pool.free == llm.engine.pool.capacity


def test_clients_leaving_a_whole_or_a_queued_request_cancel_it(url, client, llm):
    aborted = metric(url, "tiermoe_requests_total", endpoint=COMPLETIONS, outcome="aborted")
    generated = metric(url, "tiermoe_completion_tokens_total")
    body = {"model": M, "prompt": PROMPT, "max_tokens": 1000, **NO_EOS}

    def give_up() -> None:
        with pytest.raises(httpx2.TimeoutException):
            httpx2.post(url + COMPLETIONS, json=body, timeout=0.5)

    # Two at once, running together; both clients give up before the end.
    leavers = [threading.Thread(target=give_up) for _ in range(2)]
    for t in leavers:
        t.start()
    for t in leavers:
        t.join()
    nxt = client.completions.create(model=llm.model_name, prompt=PROMPT, max_tokens=4, extra_body=NO_EOS)
    assert nxt.usage.completion_tokens == 4
    assert metric(url, "tiermoe_requests_total", endpoint=COMPLETIONS, outcome="aborted") == aborted + 2
    # Not even one of the two ran to its 1000 tokens.
    assert metric(url, "tiermoe_completion_tokens_total") - generated - 4 < 1000


def test_sixteen_concurrent_streaming_clients(url, llm):
    prompts = [f"Hello, how are you {i}?" for i in range(4)]
    refs = [llm.generate(p, SamplingParams(max_tokens=8, ignore_eos=True))[0] for p in prompts]

    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, openai.types.CompletionUsage]:
        stream = await aclient.completions.create(
            model=llm.model_name,
            prompt=prompts[i % 4],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage

    async def all16():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(16)))

    results = asyncio.run(all16())
    for i, (text, usage) in enumerate(results):
        ref = refs[i % 4]
        assert text == ref.text
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref.prompt_token_ids), 8)


def test_short_requests_finish_while_a_long_one_runs(url, llm):
    """Requests run together: three short ones arriving after a long one finish first, in their order,
    and the engine's steps held more than one sequence."""
    batched = metric(url, "tiermoe_step_batch_size_count") - metric(
        url, "tiermoe_step_batch_size_bucket", le="1.0"
    )

    async def arrive_in_order() -> list[str]:
        finished: list[str] = []
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as aclient:

            async def request(name: str, max_tokens: int) -> None:
                await aclient.completions.create(
                    model=llm.model_name, prompt=PROMPT, max_tokens=max_tokens, extra_body=NO_EOS
                )
                finished.append(name)

            tasks = []
            for name, max_tokens in [("long", 150), ("b", 2), ("c", 2), ("d", 2)]:
                tasks.append(asyncio.create_task(request(name, max_tokens)))
                await asyncio.sleep(0.1)
            await asyncio.gather(*tasks)
        return finished

    assert asyncio.run(arrive_in_order()) == ["b", "c", "d", "long"]
    after = metric(url, "tiermoe_step_batch_size_count") - metric(
        url, "tiermoe_step_batch_size_bucket", le="1.0"
    )
    assert after - batched >= 3  # each short one ran beside the long one
    assert metric(url, "tiermoe_kv_cache_usage") == 0  # every block back


def test_metrics_count_requests_tokens_and_timings(url, client, llm):
    wait_idle(url)

    def snapshot() -> dict[str, float]:
        return {
            "success": metric(url, "tiermoe_requests_total", endpoint=CHAT, outcome="success"),
            "error": metric(url, "tiermoe_requests_total", endpoint=CHAT, outcome="error"),
            "prompt": metric(url, "tiermoe_prompt_tokens_total"),
            "completion": metric(url, "tiermoe_completion_tokens_total"),
            "ttft": metric(url, "tiermoe_time_to_first_token_seconds_count"),
            "prefill": metric(url, "tiermoe_prefill_tokens_per_second_count"),
            "decode": metric(url, "tiermoe_decode_tokens_per_second_count"),
        }

    before = snapshot()
    r = client.chat.completions.create(
        model=llm.model_name, messages=MESSAGES, max_tokens=5, extra_body=NO_EOS
    )
    assert httpx2.post(url + CHAT, json={"messages": "hi"}).status_code == 400
    after = snapshot()
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {
        "success": 1,
        "error": 1,
        "prompt": r.usage.prompt_tokens,
        "completion": 5,
        "ttft": 1,
        "prefill": 1,
        "decode": 1,
    }
    assert metric(url, "tiermoe_requests_running") == metric(url, "tiermoe_requests_queued") == 0


def test_expert_store_metrics_add_up_the_requests(url, client, llm):
    wait_idle(url)
    counts = ("gpu_hits", "prefetch_hits", "gpu_misses", "host_hits", "host_misses", "bytes_h2d")
    before = {k: metric(url, "tiermoe_expert_store_total", stat=k) for k in counts}
    experts = [
        client.completions.create(
            model=llm.model_name, prompt=p, max_tokens=6, extra_body=NO_EOS
        ).model_extra["stats"]["experts"]
        for p in (PROMPT, "Hello, how are you today?")
    ]
    for k in counts:
        assert metric(url, "tiermoe_expert_store_total", stat=k) - before[k] == sum(e[k] for e in experts)
    assert sum(e["gpu_misses"] for e in experts) > 0, "the budget should be small enough to miss"
    served = {k: metric(url, "tiermoe_expert_store_total", stat=k) for k in counts}
    hits = served["gpu_hits"] + served["prefetch_hits"]
    # The rates follow from the counters summed since the server started.
    assert metric(url, "tiermoe_expert_store_rate", rate="gpu_hit_rate") == pytest.approx(
        hits / (hits + served["gpu_misses"]), abs=1e-4
    )
    host = served["host_hits"] + served["host_misses"]
    assert host > 0 and metric(url, "tiermoe_expert_store_rate", rate="host_hit_rate") == pytest.approx(
        served["host_hits"] / host, abs=1e-4
    )


SERVE = """import argparse, sys
from tiermoe.server import serve
parser = argparse.ArgumentParser()
serve.add_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


@pytest.mark.slow  # over 4 s on CI's 2 cores
def test_serve_command_prints_its_url_once_ready_and_stops_on_ctrl_c(llm):
    argv = ["serve", "--model", str(llm.path), "--device", "cpu", "--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-c", SERVE, *argv], stderr=subprocess.PIPE, text=True)
    try:
        before = []  # what it printed before the ready line
        for line in proc.stderr:
            if ready := re.search(r"Ready: serving tiny-qwen3-moe at (http://127\.0\.0\.1:\d+)/v1 ", line):
                break
            before.append(line)
        assert ready, "no ready line"
        plans = [line for line in before if line.startswith("memory plan (GPU budget uncapped): dense")]
        assert len(plans) == 1 and "KV cache 4096 tokens" in plans[0], before  # the demo: 4096-token context
        assert httpx2.get(ready[1] + "/health").json()["status"] == "ok"
        lines = []
        body = {"model": M, "prompt": PROMPT, "max_tokens": 4000, "stream": True, **NO_EOS}

        def read_stream():
            with httpx2.stream("POST", ready[1] + COMPLETIONS, json=body, timeout=60) as r:
                lines.extend(filter(None, r.iter_lines()))

        reader = threading.Thread(target=read_stream)
        reader.start()
        while not proc.poll() and len(lines) < 3:  # a stream is running
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        reader.join(10)
        # The stream got the grace period, then an error event and [DONE]; the log has no traceback.
        assert lines[-1] == "data: [DONE]" and "server_shutting_down" in lines[-2]
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_an_api_key_is_required_on_v1_when_set(llm):
    with serving(create_app(llm, api_key="s3cret")) as url:
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        r = good.completions.create(model=M, prompt=PROMPT, max_tokens=2, extra_body=NO_EOS)
        assert r.usage.completion_tokens == 2 and good.models.list().data[0].id == M
        bad = openai.OpenAI(base_url=url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model=M, messages=USER, max_tokens=2)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        r = httpx2.get(url + "/v1/models")  # no header at all
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        assert httpx2.get(url + "/health").status_code == 200  # probes need no key


def test_request_bodies_beyond_the_limit_are_refused_before_reading(llm):
    with serving(create_app(llm, max_body_bytes=4096)) as url:
        big = {"model": M, "prompt": "fox " * 2000, "max_tokens": 2}
        r = httpx2.post(url + COMPLETIONS, json=big)
        assert r.status_code == 413 and "4,096 bytes" in r.json()["error"]["message"]

        def chunked():  # no Content-Length: the limit counts what arrives
            yield json.dumps(big).encode()

        r = httpx2.post(url + COMPLETIONS, content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        small = {"model": M, "prompt": PROMPT, "max_tokens": 2, **NO_EOS}
        r = httpx2.post(url + COMPLETIONS, content=iter([json.dumps(small).encode()]),
                        headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_huge_prompt_is_a_400(client, llm):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=M, prompt="The quick brown fox. " * 200_000, max_tokens=2)
    assert info.value.body["param"] == "prompt" and "longer than the model's context" in info.value.message


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "99999"], "--port"),
        (["--max-request-mib", "0"], "--max-request-mib"),
        (["--seed", str(2**64)], "--seed"),
    ],
)
def test_bad_serve_flags_are_one_error_line(tmp_path, capsys, flags, message):
    from tiermoe.cli import main

    assert main(["serve", "--model", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message} ") and err.count("\n") == 1


def test_loopback_hosts():
    from tiermoe.server.serve import _is_loopback

    assert all(map(_is_loopback, ["127.0.0.1", "::1", "localhost", "127.0.0.2"]))
    assert not any(map(_is_loopback, ["0.0.0.0", "192.168.1.5", "::", "myhost.lan"]))


def test_logprobs_are_the_engines_log_softmax_of_the_chosen_tokens(url, client, llm):
    kwargs = dict(model=M, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kwargs, extra_body=NO_EOS).choices[0].logprobs.content
    streamed = [
        entry
        for chunk in client.chat.completions.create(**kwargs, stream=True, extra_body=NO_EOS)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    wait_idle(url)
    prompt = llm.encode(llm.apply_chat_template(MESSAGES), add_special_tokens=False)
    tokens = llm.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    reference = llm.engine.score(prompt + tokens)[-6:].tolist()
    for entries in (whole, streamed):
        assert [e.logprob for e in entries] == pytest.approx(reference, abs=1e-5)
        assert [e.token for e in entries] == [llm.tokenizer.decode([t]) for t in tokens]
        # greedy: the chosen token is the likeliest, first of the three alternatives, in order
        assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob for e in entries)
        assert all(a.logprob >= b.logprob for e in entries for a, b in itertools.pairwise(e.top_logprobs))


def test_completions_echo_the_prompt_with_its_logprobs(url, client, llm):
    r = client.completions.create(
        model=M, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True, extra_body=NO_EOS
    ).choices[0]
    wait_idle(url)
    prompt = llm.encode(PROMPT)
    assert r.text.startswith(PROMPT) and len(r.logprobs.tokens) == len(prompt) + 4
    assert r.logprobs.token_logprobs[0] is None and r.logprobs.top_logprobs[0] is None
    expected = [lp for lp, _ in llm.prompt_logprobs(prompt)]
    assert r.logprobs.token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-5)
    assert r.logprobs.text_offset[: len(prompt)] == [
        len("".join(llm.tokenizer.decode([t]) for t in prompt[:i])) for i in range(len(prompt))
    ]
    assert all(len(top) == 2 for top in r.logprobs.top_logprobs[1:])
    plain = client.completions.create(
        model=M, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, extra_body=NO_EOS
    )
    assert plain.choices[0].text == r.text and plain.choices[0].logprobs is None


def test_shutdown_ends_running_streams_with_an_error_event_and_done(llm, caplog):
    lines, waiting = [], []
    with serving(create_app(llm), grace_s=0.5) as url:
        body = {"model": M, "prompt": PROMPT, "max_tokens": 1000, "stream": True, **NO_EOS}

        def read_stream():
            with httpx2.stream("POST", url + COMPLETIONS, json=body, timeout=30) as r:
                lines.extend(filter(None, r.iter_lines()))

        def wait_whole():  # running beside the stream: it ends as a 503
            waiting.append(httpx2.post(url + COMPLETIONS, json={**body, "stream": False}, timeout=30))

        readers = [threading.Thread(target=read_stream), threading.Thread(target=wait_whole)]
        readers[0].start()
        deadline = time.monotonic() + 10
        while len(lines) < 5:  # the stream is running
            assert time.monotonic() < deadline
            time.sleep(0.01)
        readers[1].start()
        while metric(url, "tiermoe_requests_running") < 2:  # the whole request runs beside it
            assert time.monotonic() < deadline
            time.sleep(0.01)
    for t in readers:
        t.join(10)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
    assert waiting[0].status_code == 503 and waiting[0].json()["error"]["code"] == "server_shutting_down"
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.slow  # about 5 s
def test_the_openapi_document_holds_for_every_answer(llm):
    """schemathesis, every check, against /openapi.json: each status, content type and value constraint
    the server answers with is documented, and what the document allows is served."""
    pytest.importorskip("schemathesis")
    with serving(create_app(llm)) as url:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks", "all",
             "--max-examples", "25", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert re.search(r"\d+ generated, \d+ passed", run.stdout)


# Qwen's way of writing tools into the prompt, cut to what the test needs.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tools_and_their_history_reach_the_template(llm, client):
    with pytest.raises(openai.BadRequestError) as info:  # a template without a tool-call format
        client.chat.completions.create(model=M, messages=USER, tools=[WEATHER_TOOL], max_tokens=2)
    assert info.value.body["param"] == "tools" and "no tool-call format" in info.value.message
    tooled = LLM(llm.path, device="cpu", dtype="fp32", max_model_len=1024)
    tooled.tokenizer.chat_template = TOOLS_TEMPLATE
    history = [
        *USER,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]  # fmt: skip
    with serving(create_app(tooled)) as url:
        tooled_client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def prompt_tokens(**kw) -> int:
            r = tooled_client.chat.completions.create(model=M, max_tokens=2, extra_body=NO_EOS, **kw)
            assert r.choices[0].finish_reason == "length"  # random weights write no call
            return r.usage.prompt_tokens

        plain, with_tools = prompt_tokens(messages=USER), prompt_tokens(messages=USER, tools=[WEATHER_TOOL])
        rendered = tooled.apply_chat_template(USER, chat_template_kwargs={"tools": [WEATHER_TOOL]})
        assert with_tools == len(tooled.encode(rendered, False)) > plain
        assert prompt_tokens(messages=USER, tools=[WEATHER_TOOL], tool_choice="none") == plain
        assert prompt_tokens(messages=history, tools=[WEATHER_TOOL]) > with_tools
