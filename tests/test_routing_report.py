"""`tiermoe routing-report`: the table, JSON and PNG of a small trace with hand-counted figures, and bad
input as one `error:` line with exit code 2."""

from __future__ import annotations

import json

import pytest

from tiermoe.cli import main
from tiermoe.errors import InvalidRequestError
from tiermoe.routing.report import parse_rhos, slots_for
from tiermoe.routing.trace import Trace


@pytest.fixture
def trace_file(tmp_path):
    """One sequence, k 1: a prompt token routing 7, then decode tokens routing 0 1 2 0 1.
    Hand counts (the prompt's 7 is a miss in every run):
      1 slot: nothing repeats back to back, 0 hits of 6, every policy;
      2 slots: LRU 0 hits (each expert evicted just before it returns); LFU and Belady 1 hit (on 1 and 0).
      decode locality: overlap 0 (no two neighbours agree); reuse within 8 for tokens 2-5: 0, 0, 1, 1."""
    experts = [[7], [0], [1], [2], [0], [1]]
    n = len(experts)
    trace = Trace.build([0] * n, range(n), [3] * n, [True] + [False] * (n - 1), range(n), experts, 8)
    return trace.save(tmp_path / "trace.npz")


def test_report_prints_the_table_and_writes_json_and_png(trace_file, tmp_path, capsys):
    png, out = tmp_path / "plots" / "hit.png", tmp_path / "report.json"
    assert (
        main(["routing-report", str(trace_file), "--slots", "1,2", "--png", str(png), "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "trace.npz: 1 sequences, 1 MoE layers, E 8, k 1" in printed
    for text in ("routing locality", "overall", "reuse ≤8", "belady", ".500", ".167", f"saved {png}"):
        assert text in printed, text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    report = json.loads(out.read_text())
    assert {"command", "git_rev", "date"} <= report.keys() and report["trace"] == str(trace_file)
    assert (report["top_k"], report["layers"], report["rows"], report["decode_rows"]) == (1, [3], 6, 5)
    loc = report["locality"]
    assert loc["tokens"] == "decode" and loc["overall"] == {"tokens": 4, "overlap": 0.0, "reuse": 0.5}
    assert loc["layers"]["3"] == loc["overall"]
    hits = {(c["slots"], c["policy"]): (c["hits"], c["misses"]) for c in report["cache"]}
    assert hits == {
        (1, "lru"): (0, 6), (1, "lfu"): (0, 6), (1, "belady"): (0, 6),
        (2, "lru"): (0, 6), (2, "lfu"): (1, 5), (2, "belady"): (1, 5),
    }  # fmt: skip
    belady = next(c for c in report["cache"] if (c["slots"], c["policy"]) == (2, "belady"))
    # decode only: the same hit of 5 lookups; per layer: the only layer
    assert belady["decode"] == {"hits": 1, "misses": 4, "hit_rate": 0.2}
    assert belady["layers"]["3"]["hit_rate"] == pytest.approx(1 / 6)


def test_report_reads_text_traces_and_replays_each_slot_count_once(trace_file, tmp_path, capsys):
    from tiermoe.routing.trace import load_trace

    text = load_trace(trace_file).save(tmp_path / "trace.txt")
    out = tmp_path / "r.json"
    # k 1: 0.5 and 1 both round to one slot (at least 1)
    assert main(["routing-report", str(text), "--slots", "0.5,1", "--json", str(out)]) == 0
    cache = json.loads(out.read_text())["cache"]
    assert [(c["rho"], c["slots"], c["policy"]) for c in cache] == [
        (0.5, 1, "lru"), (0.5, 1, "lfu"), (0.5, 1, "belady"), (1.0, 1, "lru"), (1.0, 1, "lfu"), (1.0, 1, "belady"),
    ]  # fmt: skip
    assert {c["hits"] for c in cache} == {0}


def test_slot_counts_from_rho():
    assert parse_rhos("0.5, 1,1.5") == [0.5, 1.0, 1.5]
    assert [slots_for(r, 8) for r in (0.5, 1, 1.5, 6)] == [4, 8, 12, 48]
    assert slots_for(0.5, 1) == 1 and slots_for(1.5, 2) == 3
    with pytest.raises(InvalidRequestError, match="got 'nan'"):
        parse_rhos("1,nan")


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], "error: routing trace {missing} does not exist"),
        (["{trace}", "--slots", "1,x"], "error: --slots takes positive multiples of k separated by commas (e.g. 0.5,1,2), got 'x'"),
        (["{trace}", "--slots=0,1"], "error: --slots takes positive multiples of k separated by commas (e.g. 0.5,1,2), got '0'"),
        (["{trace}", "--slots", ""], "error: --slots takes positive multiples of k separated by commas (e.g. 0.5,1,2), got ''"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line(trace_file, tmp_path, capsys, args, message):
    names = {"missing": tmp_path / "nowhere.npz", "trace": trace_file}
    assert main(["routing-report", *(a.format(**names) for a in args)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [message.format(**names)]
    assert captured.out == ""


def test_a_damaged_trace_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("# num_experts 8\n0 0 3 0 1 9\n")  # routes expert 9 of 8
    assert main(["routing-report", str(bad)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: routing trace {bad} names expert 9, outside 0..7"
    ]


def test_a_synthetic_batch_routes_a_union_that_grows_with_its_sequences(tmp_path, capsys):
    import torch

    from tiermoe.routing.replay import replay
    from tiermoe.routing.synthetic import SZDRouting, calibrated, synthetic_trace

    def trace(sequences: int):
        model = SZDRouting(4, 32, 4, 0, torch.device("cpu"), calibrated("qwen3_moe"))
        return synthetic_trace(model, [1, 3, 5, 7], sequences, prompt_len=8, gen_len=12)

    one, four = trace(1), trace(4)
    assert len(one) == 4 * (8 + 12) and one.layers == [1, 3, 5, 7] and one.prefill.sum() == 4 * 8
    assert set(four.step.tolist()) == set(range(13))  # the prompt in one step, then 12 decode steps
    again = trace(4)
    assert (again.experts == four.experts).all()  # counter-based draws: the same every time
    # Four documents share little beyond the global popularity: at 8 slots a layer they hit less.
    assert replay(four, 8, "lfu").decode_hit_rate < replay(one, 8, "lfu").decode_hit_rate
    out = tmp_path / "r.json"
    assert main(["routing-report", "--synthetic", "szd", "--layers", "2", "--experts", "16", "--top-k", "2",
                 "--sequences", "3", "--gen-len", "4", "--slots", "1,2", "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["synthetic"] == "szd" and report["sequences"] == 3
    assert main(["routing-report"]) == 2 and "not both" in capsys.readouterr().err
