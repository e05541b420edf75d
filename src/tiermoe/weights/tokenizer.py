"""The checkpoint's tokenizer, chat template, stop tokens and sampling defaults."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, InvalidRequestError
from .checkpoint import read_json_object

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
        sources.append(read_json_object(gen_config).get("eos_token_id"))
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(i for i in src if isinstance(i, int))
    return ids


# generation_config.json's sampling fields: (type, valid, what a valid value is)
_SAMPLING_FIELDS = {
    "temperature": (float, lambda v: v >= 0, ">= 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0"),
    "repetition_penalty": (float, lambda v: v > 0, "> 0"),
}
HF_SAMPLE_TOP_K = 50  # transformers' top_k when do_sample is on and the file sets none


def sampling_defaults(path: Path) -> dict:
    """The sampling a checkpoint asks for in generation_config.json, as SamplingParams fields, for
    requests that leave them unset: only what the file says, so that a caller's own default (the OpenAI
    API's temperature 1) holds where it says nothing. `do_sample: false` asks for greedy decoding;
    `do_sample: true` samples as transformers does (temperature 1 and top_k 50 where unset). A field the
    file sets to null counts as unset; a value of the wrong type or range is a CheckpointError here, at
    load, not a failure of the first request."""
    file = path / "generation_config.json"
    if not file.exists():
        return {}
    gen = read_json_object(file)
    out = {}
    for name, (kind, valid, what) in _SAMPLING_FIELDS.items():
        value = gen.get(name)
        if value is None:
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (kind is int and value != int(value)) or not valid(value):
            raise CheckpointError(f"{file}: {name} is {value!r}; it must be {what}")
        out[name] = kind(value)
    sample = gen.get("do_sample")
    if sample is not None and not isinstance(sample, bool):
        raise CheckpointError(f"{file}: do_sample is {sample!r}; it must be true or false")
    if sample is False:  # greedy: the file's temperature, top_p and top_k do not apply
        out = {k: v for k, v in out.items() if k == "repetition_penalty"} | {"temperature": 0.0}
    elif sample:
        out.setdefault("temperature", 1.0)
        out.setdefault("top_k", HF_SAMPLE_TOP_K)
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
