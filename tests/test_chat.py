"""`tiermoe chat` driven through its input stream: with the model loaded in-process and against the
real server, the replies are the engine's own replies to the whole conversation."""

from __future__ import annotations

import argparse
import io
import socket

import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")
from rich.console import Console

from tiermoe import LLM, SamplingParams, chat
from tiermoe.demo import write_random_checkpoint
from tiermoe.errors import TiermoeError
from tiermoe.server.app import create_app
from tiermoe.server.serve import serving

FIRST, SECOND = "What is the capital of France?", "Hello, how are you today?"
MAX_TOKENS = 8
GPU_BUDGET = 0.02  # GiB: small enough that the tiered expert store misses, so /stats has numbers to show
# Seeded sampling: greedy decoding of random weights often repeats a token that decodes to nothing.
SAMPLING = ["--temperature", "1", "--top-p", "1", "--seed", "0", "--max-tokens", str(MAX_TOKENS)]


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    path = write_random_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-qwen3-moe")
    return LLM(path, device="cpu", dtype="fp32", gpu_budget_gib=GPU_BUDGET)


@pytest.fixture(scope="module")
def replies(llm) -> list:
    """The engine's own answers to the two-turn conversation."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=0)
    first = llm.chat([{"role": "user", "content": FIRST}], params)
    history = [
        {"role": "user", "content": FIRST},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": SECOND},
    ]
    second = llm.chat(history, params)
    assert first.text and second.text, "pick prompts whose replies are not empty"
    return [first, second]


def run_chat(monkeypatch, capsys, argv: list[str], typed: str) -> str:
    parser = argparse.ArgumentParser()
    chat.add_parser(parser.add_subparsers())
    args = parser.parse_args(["chat", *argv, *SAMPLING])
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    assert args.func(args) == 0
    return capsys.readouterr().out


def assert_two_turns_then_stats(out: str, replies) -> None:
    # input() writes each prompt; after /quit nothing more is read or said.
    banner, first, second, stats, after_quit = out.split(">>> ")
    # lstrip: the loader's transient progress bar leaves a newline on stdout when it is not a terminal.
    assert banner.lstrip("\n") == "Chatting with tiny-qwen3-moe. /help lists the commands.\n"
    assert first == replies[0].text + "\n"
    assert second == replies[1].text + "\n"
    s = replies[1].stats
    assert stats.startswith(f"prompt {s.prompt_tokens} tok | completion {s.completion_tokens} tok | TTFT ")
    assert "decode" in stats and " | experts: GPU hits " in stats
    assert after_quit == ""


TYPED = f"{FIRST}\n{SECOND}\n/stats\n/quit\nnever sent\n"


def test_local_two_turns_stats_and_quit(monkeypatch, capsys, llm, replies):
    argv = ["--model", str(llm.path), "--device", "cpu", "--dtype", "fp32", "--gpu-budget", str(GPU_BUDGET)]
    out = run_chat(monkeypatch, capsys, argv, TYPED)
    assert_two_turns_then_stats(out, replies)


def test_remote_two_turns_stats_and_quit(monkeypatch, capsys, llm, replies):
    with serving(create_app(llm)) as url:
        out = run_chat(monkeypatch, capsys, ["--url", url], TYPED)
    assert_two_turns_then_stats(out, replies)


def session(llm) -> tuple[chat.ChatSession, io.StringIO]:
    screen = io.StringIO()
    options = chat.ChatOptions(max_tokens=4, temperature=0.0, top_p=1.0, seed=None, thinking=None)
    return chat.ChatSession(chat.LocalBackend(llm), Console(file=screen), options, system="Be brief."), screen


def lines(*typed: str):
    it = iter(typed)

    def read_line(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read_line


def test_multiline_input_reset_and_eof(llm):
    s, _ = session(llm)
    s.run(lines("first line \\", "second line", '"""', "pasted", "", "block", '"""'))
    assert [m["content"] for m in s.history if m["role"] == "user"] == [
        "first line \nsecond line",
        "pasted\n\nblock",
    ]
    assert s.messages()[0] == {"role": "system", "content": "Be brief."}
    s.run(lines("/reset"))
    assert s.history == [] and s.messages() == [{"role": "system", "content": "Be brief."}]


def test_think_switches_the_template_and_help_lists_commands(llm):
    s, screen = session(llm)
    s.run(lines("/think", "hi", "/stats", "/think on", "/think maybe", "/help", "/nope"))
    assert s.options.thinking is True
    off_prompt = len(
        llm.encode(
            llm.apply_chat_template(
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                enable_thinking=False,
            ),
            False,
        )
    )
    out = screen.getvalue()
    assert "thinking off" in out and "thinking on" in out
    assert f"prompt {off_prompt} tok" in out  # the first /think turned thinking off for "hi"
    assert "usage: /think [on|off]" in out
    for command in ("/think", "/stats", "/reset", "/help", "/quit"):
        assert command in out
    assert "unknown command /nope" in out


def test_engine_error_is_reported_and_the_turn_forgotten(llm):
    s, screen = session(llm)
    s.options.max_tokens = 10**6  # beyond the context
    s.run(lines("hi"))
    assert "error: the prompt" in screen.getvalue()
    assert s.history == []


def test_unreachable_server_is_one_clear_error():
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        TiermoeError, match=r"cannot list the models of http://127.0.0.1:\d+/v1: .*server running"
    ):
        chat.RemoteBackend(f"http://127.0.0.1:{port}")
