"""The checkpoint's tokenizer, chat template and stop tokens."""

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
