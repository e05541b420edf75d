"""`tiermoe chat`: an interactive terminal chat, with a model loaded here (--model) or against any
running OpenAI-compatible server (--url), tiermoe's own or another."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass

from rich.console import Console

from .engine.request import SamplingParams
from .errors import TiermoeError
from .flags import add_engine_args, engine_kwargs
from .server.answer import AnswerStream
from .server.reasoning import reasoning_of

HELP = """Commands:
  /think [on|off]  switch the model's thinking (chat templates that have the switch); bare: toggle
  /stats           speed and token counts of the last reply
  /reset           forget the conversation (the system prompt stays)
  /help            this help
  /quit            leave (Ctrl+D too)
End a line with \\ to continue on the next one; paste a block between two lines of \"\"\"."""


@dataclass
class ChatOptions:
    """None: the model's own (generation_config.json; max_tokens: the end of the context)."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    thinking: bool | None  # None: the chat template's default


def stats_line(stats: dict) -> str:
    """One line from a stats dict: GenerationStats.to_dict() (ours, local or from a tiermoe server) or
    only the usage (another server)."""
    parts = [f"prompt {stats['prompt_tokens']} tok", f"completion {stats['completion_tokens']} tok"]
    if "ttft_s" in stats:
        parts += [
            f"TTFT {stats['ttft_s'] * 1000:.1f} ms",
            f"prefill {stats['prefill_tok_s']:.1f} tok/s",
            f"decode {stats['decode_tok_s']:.2f} tok/s",
        ]
    experts = stats.get("experts") or {}
    if experts.get("gpu_hit_rate") is not None:  # an offloading run: how well the expert store served it
        parts.append(
            f"experts: GPU hits {experts['gpu_hit_rate']:.0%}, H2D {experts['bytes_h2d'] / 1e9:.2f} GB, "
            f"disk {experts['bytes_disk'] / 1e9:.2f} GB"
        )
    return " | ".join(parts)


class LocalBackend:
    """Generation in this process, on an LLM object; its reasoning split off as the server does."""

    def __init__(self, llm):
        self.llm = llm
        self.name = llm.model_name
        self.errors: tuple[type[Exception], ...] = (TiermoeError,)
        self.last_stats: dict | None = None
        self.reasoning = reasoning_of(llm.tokenizer)
        self.keep_markers = self.reasoning is not None and self.reasoning.keeps_special_tokens()

    def stream(self, messages: list[dict], options: ChatOptions) -> Iterator[tuple[str, str]]:
        """(reasoning, content) pieces of the reply."""
        text = self.llm.apply_chat_template(messages, enable_thinking=options.thinking)
        prompt = self.llm.encode(text, add_special_tokens=False)  # the template wrote the special tokens
        params = SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            skip_special_tokens=not self.keep_markers,
        )
        answer = AnswerStream(reasoning=self.reasoning)
        answer.begin(prompt)
        with closing(self.llm.stream(prompt, params)) as events:  # closing aborts generation on Ctrl+C
            for event in events:
                if event.stats is not None:
                    self.last_stats = event.stats.to_dict()
                yield answer.push(event.text)
        reasoning, content, _ = answer.finish()
        yield reasoning, content


class RemoteBackend:
    """Generation on a server, through the official openai client."""

    def __init__(self, url: str, api_key: str | None = None):
        try:
            import openai
        except ImportError:
            raise TiermoeError(
                "tiermoe chat --url needs the package openai: pip install 'tiermoe[serve]'"
            ) from None

        base = url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        # Local servers need no key, but the client insists on one. No retries: a failed turn is
        # reported at once and the user decides whether to send it again.
        key = api_key or os.environ.get("OPENAI_API_KEY", "none")
        self.client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        try:
            models = self.client.models.list().data
        except openai.APIError as exc:
            raise TiermoeError(f"cannot list the models of {base}: {exc} (is the server running?)") from None
        if not models:
            raise TiermoeError(f"{base} serves no model")
        self.name = models[0].id
        self.errors = (openai.APIError,)
        self.last_stats = None

    def stream(self, messages: list[dict], options: ChatOptions) -> Iterator[tuple[str, str]]:
        """(reasoning, content) pieces of the reply."""
        extra = (
            {}
            if options.thinking is None
            else {"chat_template_kwargs": {"enable_thinking": options.thinking}}
        )
        chunks = self.client.chat.completions.create(
            model=self.name,
            messages=messages,
            # unset values are left out of the request, so any server applies its own defaults
            **{
                k: v
                for k, v in dict(
                    max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p
                ).items()
                if v is not None
            },
            seed=options.seed,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        with chunks:  # closing the connection makes the server abort generation
            for chunk in chunks:
                # tiermoe puts its stats on the finish chunk; other servers give only the usage.
                stats = (chunk.model_extra or {}).get("stats")
                if stats is not None:
                    self.last_stats = stats
                elif chunk.usage is not None and self.last_stats is None:
                    self.last_stats = chunk.usage.model_dump()
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    # reasoning_content: tiermoe's and llama.cpp's name; newer vLLM's is reasoning.
                    fields = delta.model_extra or {}
                    yield (
                        fields.get("reasoning_content") or fields.get("reasoning") or "",
                        delta.content or "",
                    )


class ChatSession:
    """The read-reply loop: reads messages through read_line (input() in a terminal), streams replies
    to the console, keeps the conversation and runs the slash commands."""

    def __init__(self, backend, console: Console, options: ChatOptions, system: str | None = None):
        self.backend = backend
        self.console = console
        self.options = options
        self.system = system
        self.history: list[dict[str, str]] = []

    def say(self, text: str = "", end: str = "\n", style: str | None = None) -> None:
        # Model text and our help contain [brackets]: print them as they are, never as rich markup.
        self.console.print(text, end=end, style=style, markup=False, highlight=False, soft_wrap=True)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def run(self, read_line: Callable[[str], str]) -> None:
        while True:
            try:
                text = self._read_message(read_line)
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:  # Ctrl+C at the prompt drops the line, as shells do
                self.say()
                continue
            if text.startswith("/"):
                if not self._command(text.strip()):
                    return
            elif text.strip():
                self._ask(text)

    @staticmethod
    def _read_message(read_line: Callable[[str], str]) -> str:
        first = read_line(">>> ")
        if first.strip() == '"""':
            lines = []
            while (line := read_line("... ")).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        lines = [first]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(read_line("... "))
        return "\n".join(lines)

    def _command(self, text: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, arg = text.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/think":
            self._think(arg.strip())
        elif name == "/stats":
            stats = self.backend.last_stats
            self.say(stats_line(stats) if stats else "no reply yet")
        elif name == "/reset":
            self.history.clear()
            self.say("conversation cleared")
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def _think(self, arg: str) -> None:
        if arg in ("on", "off"):
            self.options.thinking = arg == "on"
        elif arg:
            self.say("usage: /think [on|off]")
            return
        else:  # toggle; a model left at its template's default counts as thinking
            self.options.thinking = self.options.thinking is False
        self.say(f"thinking {'on' if self.options.thinking else 'off'}")

    def _ask(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        pieces: list[str] = []  # the reply's content: what the conversation keeps
        thought = False
        try:
            with closing(self.backend.stream(self.messages(), self.options)) as stream:
                for reasoning, content in stream:
                    if reasoning:
                        self.say(reasoning, end="", style="dim")
                        thought = True
                    if content:
                        if thought and not pieces:
                            self.say()  # the answer starts on a line of its own below the thinking
                        pieces.append(content)
                        self.say(content, end="")
        except KeyboardInterrupt:
            self.say(" [interrupted]", end="")
        except self.backend.errors as exc:
            self.history.pop()  # the turn failed: forget it so the next one starts clean
            self.say(f"error: {exc}")
            return
        self.say()
        self.history.append({"role": "assistant", "content": "".join(pieces)})


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", description="Interactive chat with streaming output. " + HELP)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory: load the model in this process")
    source.add_argument("--url", help="a running OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None, help="for --url (default: $OPENAI_API_KEY, or none)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="most tokens per reply (default: no limit)"
    )
    parser.add_argument("--temperature", type=float, default=None, help="0: greedy (default: the model's)")
    parser.add_argument("--top-p", type=float, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--think", action=argparse.BooleanOptionalAction, default=None, help="thinking (default: the model's)"
    )
    add_engine_args(parser, model=False)  # they apply with --model
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.url:
        backend = RemoteBackend(args.url, args.api_key)
    else:
        from .api import LLM  # torch is heavy: --url chats never import it

        backend = LocalBackend(LLM(args.model, **engine_kwargs(args)))
    if sys.stdin.isatty():
        import readline  # noqa: F401  (gives input() line editing and up-arrow history)
    options = ChatOptions(args.max_tokens, args.temperature, args.top_p, args.seed, args.think)
    session = ChatSession(backend, Console(), options, args.system)
    session.say(f"Chatting with {backend.name}. /help lists the commands.")
    session.run(input)
    return 0
