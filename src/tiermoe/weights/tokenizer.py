"""The checkpoint's tokenizer, chat template, stop tokens and sampling defaults."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, InvalidRequestError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: Path):
    """The transformers tokenizer of the checkpoint, or None when it ships none (token-id prompts only)."""
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from None


def eos_token_ids(path: Path, config: dict, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_config = path / "generation_config.json"
    sources = [config.get("eos_token_id")]
    if gen_config.exists():
        sources.append(json.loads(gen_config.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(i for i in src if isinstance(i, int))
    return ids


def sampling_defaults(path: Path) -> dict:
    """The sampling a checkpoint asks for in generation_config.json, as SamplingParams fields, for
    requests that leave them unset. As transformers: `do_sample` true samples with its temperature
    (1.0 if absent), top_p and top_k; otherwise decoding is greedy. repetition_penalty applies either way."""
    file = path / "generation_config.json"
    if not file.exists():
        return {}
    try:
        gen = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    out = {}
    if gen.get("do_sample"):
        out["temperature"] = float(gen.get("temperature", 1.0))
        out.update({k: gen[k] for k in ("top_p", "top_k") if gen.get(k) is not None})
    else:
        out["temperature"] = 0.0
    if gen.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(gen["repetition_penalty"])
    return out


def render_chat(tokenizer, messages: list[dict], enable_thinking: bool | None, extra: dict | None) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "this model has no chat template; use a plain completion prompt", "messages"
        )
    if not messages:
        raise InvalidRequestError("messages is empty: give at least one message", "messages")
    kwargs = dict(extra or {})
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # jinja2 errors from the template itself
        raise InvalidRequestError(f"the chat template rejected these messages: {e}", "messages") from None
