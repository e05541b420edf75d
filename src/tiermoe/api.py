"""LLM(...): the Python entry point. Loads a checkpoint directory and generates from it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from .config import EngineConfig
from .engine.engine import Engine
from .engine.request import RequestOutput, SamplingParams, TokenEvent
from .engine.runner import ModelRunner
from .errors import InvalidRequestError
from .models.moe import SparseMoeBlock
from .offload.placement import build_provider, plan_dense, warn_below_top_k
from .offload.predictor import RouterLookahead
from .routing.spec import build_routing
from .weights.loader import build_meta, load_model, open_source, progress_bar
from .weights.tokenizer import eos_token_ids, load_tokenizer, render_chat, sampling_defaults


class LLM:
    """A loaded model. Not thread-safe: one generate/stream at a time (the server queues requests)."""

    def __init__(self, model: str | Path, **config):
        # The load path, in order: open the checkpoint, build on meta, plan every device byte, build the
        # expert provider, load the dense weights, build the runner with the plan.
        self.config = c = EngineConfig(**config)
        self.path = Path(model)
        self.model_name = self.path.name
        self.source = open_source(self.path, c.torch_device, c.torch_dtype, c.experts_per_token)
        self.args = a = self.source.args
        self.max_model_len = a.context_len(c.max_model_len)
        self.routing = build_routing(
            c.routing, self.path, self.source.checkpoint.config.get("model_type", ""), a.moe_layers,
            a.num_experts, a.top_k, self.source.device, c.routing_seed, c.record_routing, c.prefetch_accuracy,
        )  # fmt: skip
        model, self.plan = plan_dense(
            lambda fp8: build_meta(self.source, fp8), a, self.source.format, c, self.max_model_len
        )
        warn_below_top_k(self.plan, a.top_k)
        if c.show_progress:
            print(self.plan.describe(), file=sys.stderr, flush=True)
        with progress_bar(c.show_progress) as progress:
            self.provider = build_provider(self.source, c, self.plan, progress)
            self.model = load_model(model, self.source, self.provider, self.routing, progress)
        # Under an override the routers decide nothing, so their lookahead would predict noise.
        overridden = self.routing is not None and self.routing.overrides
        gates = {m.layer_idx: m.gate for m in self.model.modules() if isinstance(m, SparseMoeBlock)}
        self.provider.attach(self.routing.predictor() if overridden else RouterLookahead(gates))
        self.tokenizer = load_tokenizer(self.path)
        runner = ModelRunner(
            self.model,
            a,
            self.source.device,
            self.source.dtype,
            c.prefill_chunk,
            self.max_model_len,
            graphs=c.cuda_graphs,
            provider=self.provider,
            routing=self.routing,
            kv_tokens=self.plan.kv_tokens,
            max_num_seqs=c.max_num_seqs,
        )
        eos = eos_token_ids(self.path, self.source.checkpoint.config, self.tokenizer)
        self.sampling_defaults = sampling_defaults(self.path)
        self.engine = Engine(
            runner,
            self.provider,
            self.tokenizer,
            eos,
            self.max_model_len,
            self.sampling_defaults,
            c.max_num_seqs,
        )

    @property
    def routing_mode(self) -> str:
        """Who picks the experts: natural (the routers), uniform, szd or trace."""
        return self.routing.mode if self.routing else "natural"

    @property
    def routing_params(self) -> dict | None:
        return self.routing.params if self.routing else None

    @property
    def device(self):
        return self.source.device

    def encode(
        self, prompt: str | list[int], add_special_tokens: bool = True, prompt_of_request: bool = True
    ) -> list[int]:
        """Token ids of a prompt. Chat prompts pass add_special_tokens=False: the template has them. A
        request's prompt (not a text to score, tiermoe eval's) far beyond the context is refused early."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(f"{self.path} has no tokenizer: pass token ids, not text", "prompt")
            if prompt_of_request:
                self._refuse_if_surely_too_long(prompt)
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not all(isinstance(t, int) for t in prompt):
            raise InvalidRequestError("a prompt is a string or a list of token ids", "prompt")
        return list(prompt)

    def _refuse_if_surely_too_long(self, text: str, piece_chars: int = 16384) -> None:
        """Refuse a text that cannot fit the context without tokenising all of it (megabytes take
        seconds): count tokens piece by piece, cut before whitespace, and stop once the count passes the
        context with a margin for what the cuts may change (a few tokens each)."""
        if len(text.encode()) <= self.max_model_len:  # every token holds at least one byte
            return
        count, start, pieces = 0, 0, 0
        while start < len(text):
            end = min(len(text), start + piece_chars)
            cut = text.rfind(" ", start + 1, end) if end < len(text) else end
            end = cut if cut > start else end
            count += len(self.tokenizer.encode(text[start:end], add_special_tokens=False))
            pieces, start = pieces + 1, end
            if count > self.max_model_len + 8 * pieces:
                raise InvalidRequestError(
                    f"the prompt is longer than the model's context of {self.max_model_len} tokens "
                    f"(at least {count - 8 * pieces} tokens in its first {end:,} characters of {len(text):,})",
                    "prompt",
                )

    def generate(
        self, prompts: str | list[int] | list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Generate for one prompt or a batch (text or token ids), batched on the device as far as
        max_num_seqs and the KV reserve allow (the rest wait their turn)."""
        params = params or SamplingParams()
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise InvalidRequestError("no prompts given", "prompt")
        ids = [self.encode(p) for p in batch]
        outputs = [[] for _ in batch]
        reasons: list[str | None] = [None] * len(batch)
        stats = None
        for events in self.engine.run(ids, [params] * len(batch)):
            for e in events:
                outputs[e.index].append(e)
                if e.finish_reason:
                    reasons[e.index], stats = e.finish_reason, e.stats
        return [
            RequestOutput(
                prompt=p if isinstance(p, str) else None,
                prompt_token_ids=i,
                text="".join(e.text for e in evs),
                token_ids=[e.token_id for e in evs],
                finish_reason=r,
                stats=stats,
            )
            for p, i, evs, r in zip(batch, ids, outputs, reasons, strict=True)
        ]

    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each prompt token after the first: its log-probability given the ones before, and the
        `top` likeliest tokens there [(id, log-probability)] (what completions' echo reports)."""
        if len(ids) < 2:
            return []
        if not top:
            return [(lp, []) for lp in self.engine.score(ids).tolist()]
        chosen, top_ids, top_values = self.engine.score(ids, top=top)
        return [
            (lp, list(zip(i, v, strict=True)))
            for lp, i, v in zip(chosen.tolist(), top_ids.tolist(), top_values.tolist(), strict=True)
        ]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Stream one sequence. Closing the iterator stops generation at once."""
        ids = self.encode(prompt)
        for events in self.engine.run([ids], [params or SamplingParams()]):
            yield from events

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        enable_thinking: bool | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> str:
        return render_chat(self.tokenizer, messages, enable_thinking, chat_template_kwargs)

    def chat(
        self,
        messages: list[dict],
        params: SamplingParams | None = None,
        *,
        enable_thinking: bool | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> RequestOutput:
        prompt = self.apply_chat_template(
            messages, enable_thinking=enable_thinking, chat_template_kwargs=chat_template_kwargs
        )
        output = self.generate(self.encode(prompt, add_special_tokens=False), params)[0]
        output.prompt = prompt
        return output

    def store_stats(self) -> dict:
        return self.provider.stats()
