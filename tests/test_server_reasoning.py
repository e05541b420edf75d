"""Reasoning split from the answer (server/reasoning.py): gpt-oss's harmony channels and <think> tags,
parsed whole and streamed at every split, to exact strings; then end to end, through the app with the
openai client and through the terminal chat, the real engine fed a scripted token stream (random weights
write no reasoning of their own)."""

from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")
openai = pytest.importorskip("openai")
from rich.console import Console
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from tiermoe import LLM, chat
from tiermoe.bench.synth import synth_checkpoint
from tiermoe.bench.synth_tokenizer import (
    CHATML_CORPUS,
    CHATML_TEMPLATE,
    HARMONY_TEMPLATE,
    MISTRAL_TEMPLATE,
    TULU_TEMPLATE,
    chatml_bpe,
    train_bpe,
)
from tiermoe.demo import write_random_checkpoint
from tiermoe.server.app import create_app
from tiermoe.server.reasoning import FORMATS, HarmonyStream, Reasoning, ThinkStream, format_of
from tiermoe.server.serve import serving

# name: (answer as the model writes it, special tokens kept; (reasoning, content))
HARMONY = {
    "analysis then final": (
        "<|channel|>analysis<|message|>The user wants the capital of France.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.",
        ("The user wants the capital of France.", "Paris."),
    ),
    "a preamble on commentary is content": (
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary"
        "<|message|>Let me check.<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.",
        ("Need the weather.", "Let me check.It is sunny."),
    ),
    "a tool call is content as written": (
        "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"location": "Paris"}',
        (
            "Use the tool.",
            "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
            '{"location": "Paris"}',
        ),
    ),
    "final only": ("<|channel|>final<|message|>Hi.", ("", "Hi.")),
    "cut short while thinking": ("<|channel|>analysis<|message|>Let me", ("Let me", "")),
    "cut short in a header": (
        "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>fin",
        ("Hmm.", ""),
    ),
    "markup-like text in a body": ("<|channel|>final<|message|>a <|b|> <|en c", ("", "a <|b|> <|en c")),
    "not harmony at all": ("Plain words <|end", ("", "Plain words <|end")),
}
# name: (the prompt opened <think>, answer, (reasoning, content))
THINK = {
    "Qwen3 writes <think>": (
        False,
        "<think>\nThe capital of France is Paris.\n</think>\n\nParis.",
        ("The capital of France is Paris.", "Paris."),
    ),
    "the prompt opened <think>": (
        True,
        "The user greets me.\n</think>\n\nHello!",
        ("The user greets me.", "Hello!"),
    ),
    "the prompt opened it and the model repeats it": (True, "<think>\nHmm.\n</think>\nOK", ("Hmm.", "OK")),
    "empty thinking": (True, "\n\n</think>\n\nDone.", ("", "Done.")),
    "no thinking: content as written": (False, "  Paris is the capital.", ("", "  Paris is the capital.")),
    "cut short while thinking": (False, "<think>\nFirst, the", ("First, the", "")),
    "tags after the reasoning are content": (
        False,
        "<think>a</think>b <think>c</think>",
        ("a", "b <think>c</think>"),
    ),
    "near misses": (False, "<think>x </thin k <\n</think>z", ("x </thin k <", "z")),
    "a <think> after text is content": (False, "Hi <think>no</think>", ("", "Hi <think>no</think>")),
}


def parse(stream, pieces: list[str]) -> tuple[str, str]:
    outs = [stream.push(p) for p in pieces] + [stream.finish()]
    return "".join(r for r, _ in outs), "".join(c for _, c in outs)


def every_split(text: str):
    """The text whole, in two pieces split at every position, and one character at a time."""
    yield [text]
    for k in range(len(text) + 1):
        yield [text[:k], text[k:]]
    yield list(text)


@pytest.mark.parametrize("case", list(HARMONY))
def test_harmony_whole_and_streamed_at_every_split(case):
    text, expected = HARMONY[case]
    for pieces in every_split(text):
        assert parse(HarmonyStream(), pieces) == expected, pieces


@pytest.mark.parametrize("case", list(THINK))
def test_think_tags_whole_and_streamed_at_every_split(case):
    opened, text, expected = THINK[case]
    for pieces in every_split(text):
        assert parse(ThinkStream(opened), pieces) == expected, pieces


def test_text_goes_out_as_soon_as_no_marker_can_change_it():
    s = HarmonyStream()
    assert s.push("<|channel|>analysis<|message|>The user") == ("The user", "")
    assert s.push(" wants<|") == (" wants", "")  # "<|" may begin <|end|>
    assert s.push("end|><|start|>assistant<|channel|>final") == ("", "")
    assert s.push("<|message|>Par") == ("", "Par")
    assert s.finish() == ("", "")
    s = ThinkStream(opened=False)
    assert s.push("\n") == ("", "")  # may precede <think>
    assert s.push("<think>\nA") == ("A", "")
    assert s.push(" b \n</th") == (" b", "")  # whitespace before a possible </think> waits
    assert s.push("ink>\n\nC") == ("", "C")
    plain = ThinkStream(opened=False)
    assert plain.push("Hello") == ("", "Hello")  # an answer without thinking is never held
    assert plain.push(" <think>") == ("", " <think>")


def test_the_format_comes_from_the_chat_template():
    assert format_of(HARMONY_TEMPLATE).name == "harmony"
    assert format_of(CHATML_TEMPLATE).name == "think"
    assert (
        format_of("{%- if enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}").name
        == "think"
    )
    assert (
        format_of(TULU_TEMPLATE) is None and format_of(MISTRAL_TEMPLATE) is None and format_of(None) is None
    )


def qwen_like_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's arrangement in a small BPE: <think> and </think> added but not special."""
    tok = train_bpe(
        [CHATML_CORPUS], 300, {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}, reserve=False
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE
    )


def test_the_prompt_says_whether_the_answer_starts_in_thought_and_decoding_keeps_hidden_markers():
    think = next(f for f in FORMATS if f.name == "think")
    answer = "Thinking.\n</think>\n\nAnswer."
    for tok, keeps in [(chatml_bpe(300), True), (qwen_like_tokenizer(), False)]:
        reasoning = Reasoning(think, tok)
        assert reasoning.keeps_special_tokens() is keeps  # <think> special: skip_special_tokens would drop it
        user = [{"role": "user", "content": "Hi"}]
        closed = tok.apply_chat_template(
            user, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert closed.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        for prompt, expected in [
            (closed, ("", answer)),  # thinking off: the answer is content as written
            (closed.removesuffix("\n</think>\n\n"), ("Thinking.", "Answer.")),  # Qwen3-Thinking-2507's prompt
        ]:
            stream = reasoning.stream(tok.encode(prompt, add_special_tokens=False))
            assert parse(stream, [answer]) == expected


# --- end to end: the app and the terminal chat, with the engine's tokens scripted -----------------------

USER = [{"role": "user", "content": "What is the capital of France?"}]
HARMONY_ANSWER, HARMONY_SPLIT = HARMONY["analysis then final"]


def script(monkeypatch, llm: LLM, text: str, end: str) -> list[int]:
    """The engine samples these tokens (text, then the stop token `end`) whatever the logits say."""
    ids = [*llm.encode(text, add_special_tokens=False), llm.tokenizer.convert_tokens_to_ids(end)]
    monkeypatch.setattr(
        llm.engine, "_sample", lambda chunks, logits: [ids[len(c.request.output_ids)] for c in chunks]
    )
    return ids


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> LLM:
    path = tmp_path_factory.mktemp("reasoning") / "tiny-gpt-oss"
    synth_checkpoint("tiny-gpt-oss", path, progress=False)
    return LLM(path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def gpt_oss_url(gpt_oss):
    with serving(create_app(gpt_oss)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def streamed(url: str, **request) -> tuple[list[str], list[str], list]:
    """The reasoning deltas, the content deltas and the tool-call deltas of a streamed chat completion."""
    chunks = list(client(url).chat.completions.create(stream=True, **request))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.model_extra["reasoning_content"] for d in deltas if d.model_extra.get("reasoning_content")]
    return (
        reasoning,
        [d.content for d in deltas if d.content],
        [t for d in deltas for t in d.tool_calls or []],
    )


def test_gpt_oss_channels_become_reasoning_and_content_whole_and_streamed(monkeypatch, gpt_oss, gpt_oss_url):
    ids = script(monkeypatch, gpt_oss, HARMONY_ANSWER, "<|return|>")
    # What the detokenizer gives without the special tokens: the channels' names run into the text.
    mangled = gpt_oss.tokenizer.decode(ids, skip_special_tokens=True)
    assert mangled == "analysisThe user wants the capital of France.assistantfinalParis."
    request = {"model": gpt_oss.model_name, "messages": USER, "max_tokens": 100}
    r = client(gpt_oss_url).chat.completions.create(**request)
    assert (
        r.choices[0].message.model_extra["reasoning_content"],
        r.choices[0].message.content,
    ) == HARMONY_SPLIT
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(ids)
    reasoning, content, _ = streamed(gpt_oss_url, **request)
    assert ("".join(reasoning), "".join(content)) == HARMONY_SPLIT
    assert len(reasoning) > 1  # streamed token by token, not held to the end


def test_think_tags_and_tool_calls_after_them(monkeypatch, tmp_path_factory):
    llm = LLM(
        write_random_checkpoint(tmp_path_factory.mktemp("think") / "tiny-qwen3-moe"),
        device="cpu",
        dtype="fp32",
    )
    # A template that writes both markers, as Qwen3's does.
    llm.tokenizer.chat_template = CHATML_TEMPLATE + "{% if tools %}<tool_call>{% endif %}"
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    with serving(create_app(llm)) as url:
        request = {"model": llm.model_name, "messages": USER, "max_tokens": 100}
        script(monkeypatch, llm, "<think>\nThe capital of France.\n</think>\n\nParis.", "<|im_end|>")
        message = client(url).chat.completions.create(**request).choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == (
            "The capital of France.",
            "Paris.",
        )
        reasoning, content, _ = streamed(url, **request)
        assert ("".join(reasoning), "".join(content)) == ("The capital of France.", "Paris.")

        script(monkeypatch, llm, "Paris.", "<|im_end|>")  # thinking off: the prompt closed <think>
        off = {**request, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
        message = client(url).chat.completions.create(**off).choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == (None, "Paris.")

        script(monkeypatch, llm, f"<think>\nThe user wants the weather.\n</think>\n\n{call}", "<|im_end|>")
        r = client(url).chat.completions.create(**request, tools=[weather])
        message = r.choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == (
            "The user wants the weather.",
            None,
        )
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert r.choices[0].finish_reason == "tool_calls"
        reasoning, content, calls = streamed(url, **request, tools=[weather])
        assert ("".join(reasoning), content) == ("The user wants the weather.", [])
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]


def chat_screen(backend) -> tuple[str, list[dict]]:
    """What one turn of `tiermoe chat` prints on a colour terminal, and the conversation it keeps."""
    screen = io.StringIO()
    options = chat.ChatOptions(max_tokens=100, temperature=0.0, top_p=1.0, seed=None, thinking=None)
    session = chat.ChatSession(
        backend, Console(file=screen, force_terminal=True, color_system="standard"), options
    )
    typed = iter([USER[0]["content"]])

    def read_line(prompt: str) -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    session.run(read_line)
    return screen.getvalue(), session.history


def test_the_terminal_chat_shows_thinking_dimmed_and_keeps_the_answer(monkeypatch, gpt_oss, gpt_oss_url):
    script(monkeypatch, gpt_oss, HARMONY_ANSWER, "<|return|>")
    # dim (ESC[2m) thinking, then the answer on its own line; the conversation keeps the answer only
    expected = "\x1b[2mThe user wants the capital of France.\x1b[0m\nParis.\n\n"  # the last: Ctrl+D's
    for backend in (chat.LocalBackend(gpt_oss), chat.RemoteBackend(gpt_oss_url)):
        screen, history = chat_screen(backend)
        # Each streamed piece is dimmed on its own: adjacent dim spans read as one.
        assert screen.replace("\x1b[0m\x1b[2m", "") == expected
        assert history == [USER[0], {"role": "assistant", "content": "Paris."}]
