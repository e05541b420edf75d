"""`tiermoe demo` and `tiermoe generate` as a newcomer runs them."""

from transformers import AutoTokenizer

from tiermoe.cli import main
from tiermoe.demo import RANDOM_CONFIG


def test_random_demo_writes_a_real_checkpoint_and_streams_from_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["demo", "--random", "--device", "cpu", "--max-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    folder = tmp_path / "tiermoe" / "demo-qwen3-moe-random-v2"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "The weights are RANDOM" in err and "Qwen3MoeForCausalLM" in err
    # Every id the model can sample is one of the tokenizer's, so every sampled token prints.
    assert f"vocab {len(AutoTokenizer.from_pretrained(folder))}\n" in err
    assert f"{RANDOM_CONFIG['num_experts']} experts (top-{RANDOM_CONFIG['num_experts_per_tok']})" in err
    assert err.strip().splitlines()[-1].startswith("[length] prompt ") and "completion 12 tok" in err
    assert out.strip()  # the streamed text


def test_generate_chat_mode_streams_text(tiny_checkpoint, capsys):
    path, _ = tiny_checkpoint("qwen3_moe")
    args = ["generate", "--model", str(path), "--device", "cpu", "--chat", "--no-think"]
    assert main([*args, "--prompt", "Hi", "--max-tokens", "6", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "completion 6 tok" in err.strip().splitlines()[-1]


def test_out_of_range_sampling_flags_are_one_error_line(tiny_checkpoint, capsys):
    path, _ = tiny_checkpoint("qwen3_moe")
    for flag, value in [("--seed", str(2**70)), ("--temperature", "nan"), ("--top-p", "inf")]:
        args = ["generate", "--model", str(path), "--device", "cpu", "--prompt", "Hi", flag, value]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
