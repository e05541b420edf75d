"""`tiermoe bench` end to end on a tiny synth model on the CPU: valid JSON with every key, and a PNG;
the floors of a capped run from hand-made figures."""

import argparse
import json
import shlex
import sys

import pytest
import torch

from tiermoe import cli
from tiermoe.bench import run
from tiermoe.bench.measure import decode_traffic
from tiermoe.bench.presets import get_preset
from tiermoe.bench.report import RUN_KEYS, plot_runs
from tiermoe.bench.synth import synth_checkpoint
from tiermoe.bench.workload import Workload
from tiermoe.config import EngineConfig
from tiermoe.convert import convert, writer_for
from tiermoe.errors import InvalidRequestError
from tiermoe.hardware import GIB
from tiermoe.offload.placement import plan_from_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
H2D_GB_S = 10.0  # given, as a CPU machine cannot measure PCIe


def _capped_budget_gib(model) -> float:
    """A budget leaving 3 of the 8 experts of each of tiny-olmoe's 2 layers on the GPU, with the
    engine's defaults on this machine (what the bench's children get)."""
    least = plan_from_config(json.loads((model / "config.json").read_text()), EngineConfig())
    return (least.dense_bytes + least.kv_bytes + least.workspace_bytes + 6.5 * least.expert_bytes) / GIB


@pytest.mark.slow  # over 4 s on CI's 2 cores
def test_bench_command_end_to_end(tmp_path, monkeypatch):
    model = tmp_path / "tiny"
    synth_checkpoint("tiny-olmoe", model, progress=False)
    cap = _capped_budget_gib(model)
    argv = [
        "bench", "--model", str(model), "--gpu-budget", f"{cap!r},none", "--routing", "uniform,szd:p_stick=0.5",
        "--prompt-len", "16", "--gen-len", "6", "--batch", "2", "--repeat", "2", "--peers", "hf,hf-offload",
        "--peer-gen-len", "4", "--h2d-gb-s", str(H2D_GB_S), "--record-routing", str(tmp_path / "tr.npz"),
        "--out-dir", str(tmp_path / "results"), "--name", "t",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["/venv/bin/tiermoe", *argv])
    written = []  # (file name, runs in it) of every write
    write_json = run.write_json
    monkeypatch.setattr(
        run,
        "write_json",
        lambda path, payload: written.append((path.name, len(payload["runs"]))) or write_json(path, payload),
    )
    parser = argparse.ArgumentParser()
    run.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.func(args) == 0

    # The runs so far after every setting (a bench stopped from outside keeps them), then the result.
    assert written == [*(("t.partial.json", n) for n in range(1, 7)), ("t.json", 6)]
    assert not (tmp_path / "results" / "t.partial.json").exists()
    data = json.loads((tmp_path / "results" / "t.json").read_text())
    # A budget's routings side by side, then the peers.
    assert [(r["engine"], r["gpu_budget_gib"], r["routing"]) for r in data["runs"]] == [
        ("tiermoe", cap, "uniform"),
        ("tiermoe", cap, "szd"),
        ("tiermoe", None, "uniform"),
        ("tiermoe", None, "szd"),
        ("hf", None, None),
        ("hf-offload", cap, None),
    ]
    assert all(set(RUN_KEYS) <= set(r) for r in data["runs"])
    tiermoe = {(r["gpu_budget_gib"], r["routing"]): r for r in data["runs"] if r["engine"] == "tiermoe"}
    runs = {r["engine"]: r for r in data["runs"]}
    runs["tiermoe"] = tiermoe[(None, "uniform")]
    _check_routing(tiermoe, tmp_path)
    for routing in ("uniform", "szd"):
        _check_capped_run(tiermoe[(cap, routing)], tiermoe[(None, routing)])
    # Where the budget went: its parts within it, the experts a share of them (the rest on the host).
    plan = tiermoe[(cap, "szd")]["plan_gib"]
    assert (
        plan["budget"] == pytest.approx(cap)
        and 0 < plan["experts"] < tiermoe[(None, "szd")]["plan_gib"]["experts"]
    )
    assert plan["dense"] + plan["kv"] + plan["workspace"] + plan["experts"] <= cap
    assert runs["hf"]["plan_gib"] is None
    # On CPU, without a GPU, hf-offload is recorded as skipped, with the reason.
    assert runs["hf-offload"]["error"].startswith("skipped: ") and runs["hf-offload"]["decode_tok_s"] is None
    assert "whatever the routing" in runs["hf-offload"]["routing_note"] and runs["hf"]["routing_note"]
    for r in (runs["tiermoe"], runs["hf"]):
        assert r["error"] is None, r["error"]
        assert (r["model_preset"], r["experts_dtype"], r["batch"], r["prompt_len"]) == (
            "tiny-olmoe",
            "bf16",
            2,
            16,
        )
        assert r["gpu_budget_gib"] is None and r["pcie_floor_tok_s"] is None
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and 0 < r["ttft_s"] < 60
        assert 0.05 < r["peak_host_gib"] < 8
        assert r["command"] == shlex.join(["tiermoe", *argv])
        assert r["git_rev"] and r["torch_version"] and r["device"] and r["date"].startswith("20")
        assert len(r["samples"]) == 2
    assert runs["tiermoe"]["gen_len"] == 6 and runs["tiermoe"]["repeat"] == 2
    assert runs["hf"]["gen_len"] == 4 and runs["hf"]["gen_len_requested"] == 6
    assert runs["tiermoe"]["experts"] == {}  # all resident: the store has nothing to count
    # Uncapped: nothing moves, so no traffic and no floors.
    for key in ("gpu_hit_rate", "h2d_bytes_per_token", "floor_tok_s", "floor_fraction", "pcie_floor_tok_s"):
        assert runs["tiermoe"][key] is None, key

    png = (tmp_path / "results" / "t.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def _check_routing(tiermoe: dict, tmp_path) -> None:
    """Each run says which routing was in force, with its parameters, and wrote its own trace."""
    for (budget, routing), r in tiermoe.items():
        assert r["error"] is None, r["error"]
        budget_name = "uncapped" if budget is None else f"{budget:g}gib"
        spec = "uniform" if routing == "uniform" else "szd_p_stick_0.5"
        assert r["routing_trace"] == str(tmp_path / f"tr-{spec}-{budget_name}.npz")
        assert (tmp_path / r["routing_trace"]).is_file()
    szd = tiermoe[(None, "szd")]["routing_params"]
    assert szd["p_stick"] == 0.5 and szd["phi"] == 0.99  # the rest stays OLMoE's calibration


def _check_capped_run(capped: dict, uncapped: dict) -> None:
    """The traffic figures are medians of the samples' decode-only statistics, and the floors follow
    from them, the given PCIe bandwidth and the uncapped run of the same routing."""
    for s in capped["samples"]:
        e, decoded = s["experts_decode"], 2 * (6 - 1)  # batch 2, 6 tokens each, the first from prefill
        assert s["completion_tokens"] - s["sequences"] == decoded
        assert s["h2d_bytes_per_token"] == e["bytes_h2d"] / decoded
        assert e["gpu_hits"] + e["gpu_misses"] > 0 and s["gpu_hit_rate"] == e["gpu_hit_rate"]
        # Decode steps only: prefill's loads are not in these counts.
        assert e["bytes_h2d"] < s["experts"]["bytes_h2d"]
        assert s["prefill_h2d_bytes"] == s["experts"]["bytes_h2d"] - e["bytes_h2d"]
    assert capped["experts_decode"] == capped["samples"][-1]["experts_decode"]
    assert 0 <= capped["gpu_hit_rate"] < 1 and capped["h2d_bytes_per_token"] > 0 and capped["h2d_gb_s"] > 0
    transfer_s = capped["h2d_bytes_per_token"] / (H2D_GB_S * 1e9)
    resident_s = 1 / uncapped["decode_tok_s"]
    assert capped["floor_tok_s"] == pytest.approx(1 / max(transfer_s, resident_s))
    assert capped["floor_serial_tok_s"] == pytest.approx(1 / (transfer_s + resident_s))
    assert capped["floor_fraction"] == pytest.approx(capped["decode_tok_s"] / capped["floor_tok_s"])
    assert "PCIe" in capped["floor_note"] and "uncapped run" in capped["floor_note"]
    assert capped["pcie_floor_tok_s"] > 0
    prefill_s = capped["prefill_h2d_bytes"] / (H2D_GB_S * 1e9)
    assert capped["prefill_floor_fraction"] == pytest.approx(prefill_s / capped["ttft_s"])


def test_kv_reserve_fits_the_workload():
    # The engine's default (the context, at most 4096 tokens) unless the batch's rows need more.
    assert run.kv_reserve_for({"max_position_embeddings": 40960}, Workload(128, 128, 1)) == 4096
    assert run.kv_reserve_for({"max_position_embeddings": 40960}, Workload(128, 64, 32)) == 32 * 192
    assert run.kv_reserve_for({"max_position_embeddings": 512}, Workload(16, 8, 2)) == 512


@pytest.mark.slow  # a child process per run
def test_a_batch_beyond_the_default_kv_reserve_runs(tmp_path):
    # tiny-olmoe's context is 512 tokens, so the default reserve holds 512; 8 rows of 60 + 4 need 512 too,
    # 12 rows need 768: refused before the bench sized the reserve to its workload.
    model = tmp_path / "tiny"
    synth_checkpoint("tiny-olmoe", model, progress=False)
    payload = run.bench(model, Workload(60, 4, 12, 1), [None], [], h2d_gb_s=H2D_GB_S, progress=lambda _: None)
    (tiermoe,) = payload["runs"]
    assert tiermoe["error"] is None, tiermoe["error"]
    assert tiermoe["kv_reserve_tokens"] == 12 * 64 and tiermoe["batch"] == 12 and tiermoe["decode_tok_s"] > 0


@pytest.mark.slow  # about 7 s on CI's 2 cores
def test_also_model_runs_tiermoe_on_each_checkpoint_with_its_own_floor(tmp_path):
    bf16 = tmp_path / "tiny"
    synth_checkpoint("tiny-olmoe", bf16, progress=False)
    int4 = convert(bf16, tmp_path / "tiny-int4", writer_for("int4", 16, "rtn"))
    cap = _capped_budget_gib(bf16)
    payload = run.bench(
        int4, Workload(16, 4, 1, 1), [cap], [], h2d_gb_s=H2D_GB_S, progress=lambda _: None, also_models=[bf16]
    )
    runs = payload["runs"]
    assert [(r["model_dir"], r["experts_dtype"]) for r in runs] == [
        (str(int4), "int4 (gptq, group 16)"),
        (str(bf16), "bf16"),
    ]
    assert all(r["error"] is None and r["decode_tok_s"] > 0 for r in runs), [r["error"] for r in runs]
    # each floor from the model's own plan: the budget that leaves bf16 with 6.5 of its 16 experts holds
    # every int4 one (3.4x smaller), so nothing of int4's crosses PCIe
    assert runs[0]["pcie_floor_tok_s"] is None and runs[1]["pcie_floor_tok_s"] > 0


def test_decode_traffic_per_decoded_token():
    experts = {
        "gpu_hit_rate": 0.75,
        "bytes_h2d": 5_000_000,
        "bytes_disk": 1_000_000,
        "gpu_hits": 70,
        "prefetch_hits": 10,
        "gpu_misses": 20,
        "cpu_computed": 30,
        "host_misses": 5,
        "cpu_s": 0.02,
    }
    stats = {"sequences": 2, "completion_tokens": 12, "decode_s": 0.5, "experts_decode": experts}
    # 2 sequences × (6 - 1) decoded tokens: the first token of each comes out of prefill.
    assert decode_traffic(stats) == {
        "gpu_hit_rate": 0.75,
        "h2d_bytes_per_token": 500_000,
        "disk_bytes_per_token": 100_000,
        "h2d_gb_s": pytest.approx(0.01),
        "gpu_experts_per_token": 8.0,
        "pcie_experts_per_token": 2.0,
        "cpu_experts_per_token": 3.0,
        "disk_experts_per_token": 0.5,
        "cpu_ms_per_token": pytest.approx(2.0),
    }
    resident = {**stats, "experts_decode": {}}  # nothing offloaded: no store statistics
    assert set(decode_traffic(resident).values()) == {None}


def test_floors_of_hand_made_runs():
    base = {"engine": "tiermoe", "routing_params": None}
    capped = {**base, "gpu_budget_gib": 4.0, "routing": "uniform", "decode_tok_s": 30.0}
    runs = [
        {**capped, "h2d_bytes_per_token": 1e9},  # 20 ms at 50 GB/s
        {**capped, "routing": "szd", "h2d_bytes_per_token": 1e9},
        {**base, "gpu_budget_gib": None, "routing": "uniform", "decode_tok_s": 100.0},  # 10 ms a token
        {"engine": "hf-offload", "gpu_budget_gib": 4.0, "decode_tok_s": 0.5},
    ]
    engine = {"device": "cpu", "dtype": "bf16", "workspace_gib": 1.0}
    run._finish_runs(runs, get_preset("olmoe-1b-7b").config, 1, 50.0, engine)
    uniform, szd, _, peer = runs
    # The transfer binds: 50 tok/s; one after the other 30 ms, 33.3 tok/s; the run reached 60 %.
    assert uniform["floor_tok_s"] == pytest.approx(50) and uniform["floor_serial_tok_s"] == pytest.approx(
        1 / 0.03
    )
    assert uniform["floor_fraction"] == pytest.approx(0.6)
    # No uncapped run with szd routing: the PCIe term alone, and the note says so.
    assert szd["floor_tok_s"] == szd["floor_serial_tok_s"] == pytest.approx(50)
    assert "no all-resident term" in szd["floor_note"]
    # The uniform-routing floor from the engine's plan: 137 of 1024 experts resident (bf16, 1 GiB workspace).
    missed = 16 * 8 * 3 * 2048 * 1024 * 2 * (1 - 137 / 1024)
    assert uniform["pcie_floor_tok_s"] == pytest.approx(50e9 / missed)
    assert peer["routing"] is None and "whatever the routing" in peer["routing_note"]
    assert peer["floor_tok_s"] is None and all(set(RUN_KEYS) <= set(r) for r in runs)


def test_pcie_floor_of_a_capped_run():
    cfg = get_preset("olmoe-1b-7b").config
    engine = {"device": "cpu", "dtype": "bf16", "workspace_gib": 1.0}
    per_token = 8 * 16 * 3 * 2048 * 1024 * 2  # every active expert
    floor = run.pcie_floor(cfg, EngineConfig(gpu_budget_gib=4.0, **engine), 1, 50.0)
    assert floor == pytest.approx(50e9 / (per_token * (1 - 137 / 1024)))
    assert run.pcie_floor(cfg, EngineConfig(gpu_budget_gib=None, **engine), 1, 50.0) is None
    assert run.pcie_floor(cfg, EngineConfig(gpu_budget_gib=4.0, **engine), 1, None) is None
    assert run.pcie_floor(cfg, EngineConfig(gpu_budget_gib=1.0, **engine), 1, 50.0) is None  # refused budget


def test_settings_pair_engines_with_budgets_and_variants():
    lru = {"eviction": "lru", "prefetch": True, "miss_path": "copy", "cpu_compute": False}  # fmt: skip
    lfu_off = {"eviction": "lfu", "prefetch": False, "miss_path": "auto", "cpu_compute": False}
    lru["miss_path"] = "auto"  # no path flag: the engine decides, and the run records what it chose
    assert run.parse_variants("lru,lfu+noprefetch") == [lru, lfu_off]
    assert run.parse_variants("lfu+noprefetch+copy") == [{**lfu_off, "miss_path": "copy"}]
    assert run.parse_variants(None) == [lfu_off]  # the engine's defaults
    assert run.parse_variants("lfu+noprefetch+in-place") == [{**lfu_off, "miss_path": "in-place"}]
    assert run.parse_variants("lfu+in-place+noprefetch") == [{**lfu_off, "miss_path": "in-place"}]
    assert run.parse_variants("lfu+noprefetch+cpu") == [{**lfu_off, "cpu_compute": True}]
    assert run.parse_variants("lfu+staged+noprefetch") == [{**lfu_off, "miss_path": "staged"}]
    assert run._settings([4.0, None], ["hf", "hf-offload"], [lru, lfu_off]) == [
        ("tiermoe", 4.0, lru),
        ("tiermoe", 4.0, lfu_off),
        ("tiermoe", None, lru),  # uncapped: nothing moves, one variant is enough
        ("hf", None, None),
        ("hf-offload", 4.0, None),
    ]
    assert run._settings([None], ["hf-offload"], [lru]) == [
        ("tiermoe", None, lru),
        ("hf-offload", None, None),
    ]
    # Per routing: a budget's routings sit together, the variants of each inside.
    uniform, szd = {"routing": "uniform"}, {"routing": "szd"}
    assert run._settings([4.0, None], [], [lru, lfu_off], ["uniform", "szd"]) == [
        ("tiermoe", 4.0, {**lru, **uniform}),
        ("tiermoe", 4.0, {**lfu_off, **uniform}),
        ("tiermoe", 4.0, {**lru, **szd}),
        ("tiermoe", 4.0, {**lfu_off, **szd}),
        ("tiermoe", None, {**lru, **uniform}),
        ("tiermoe", None, {**lru, **szd}),
    ]
    for bad in ("lru+fast", "lru+in-place+in-place", "lfu+in-place+cpu", "lfu+staged+in-place"):
        with pytest.raises(
            InvalidRequestError, match=r"POLICY\[\+noprefetch\]\[\+copy\|\+in-place\|\+staged\|\+cpu\]"
        ):
            run.parse_variants(bad)


def test_argument_parsing_and_errors(tmp_path):
    assert run.parse_budgets(["4,none", "8"]) == [4.0, None, 8.0]
    assert run.parse_budgets(None) == [None]
    assert run.parse_peers("hf, hf-offload") == ["hf", "hf-offload"]
    assert run.parse_peers("") == []
    with pytest.raises(InvalidRequestError, match="GiB numbers or 'none'"):
        run.parse_budgets(["four"])
    with pytest.raises(InvalidRequestError, match=r"unknown peer.*vllm.*peers are: hf, hf-offload"):
        run.parse_peers("hf,vllm")
    with pytest.raises(InvalidRequestError, match=r"no config\.json"):
        run.bench(tmp_path, Workload(4, 2), [None], [])


def test_routing_options(tmp_path):
    assert run.parse_routings(None) == [None]  # the engine's default
    assert run.parse_routings("natural, uniform,szd:s_g=0.4,phi=0.9,szd") == [
        "natural",
        "uniform",
        "szd:s_g=0.4,phi=0.9",
        "szd",
    ]
    with pytest.raises(InvalidRequestError, match="no such trace file"):
        run.parse_routings(f"trace:{tmp_path / 'missing.npz'}")
    with pytest.raises(InvalidRequestError, match="szd parameter 'rho=1'"):
        run.parse_routings("szd:rho=1")
    path = run.routing_trace_path
    assert path("out/r.npz", "szd:s_g=0.4", 4.0) == "out/r-szd_s_g_0.4-4gib.npz"
    assert path("out/r.txt.gz", None, None) == "out/r-default-uncapped.txt.gz"
    assert path("r.npz", "trace:/a/b/t.npz", 8.0, "lru no-prefetch") == "r-trace_t-8gib-lru_no_prefetch.npz"


def test_unknown_routing_is_one_error_line(tmp_path, capsys):
    argv = ["bench", "--model", str(tmp_path), "--routing", "natural,bogus", "--out-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --routing 'bogus' unknown; use natural, uniform, szd")


def test_plot_marks_failed_runs_and_floors(tmp_path):
    base = {"batch": 1, "pcie_floor_tok_s": None, "error": None}
    runs = [
        {
            **base,
            "engine": "tiermoe",
            "gpu_budget_gib": 4.0,
            "decode_tok_s": 20.0,
            "pcie_floor_tok_s": 35.0,
            "floor_tok_s": 28.0,
            "routing": "szd",
        },
        {
            **base,
            "engine": "hf",
            "gpu_budget_gib": None,
            "decode_tok_s": None,
            "error": "skipped: does not fit",
        },
        {**base, "engine": "hf-offload", "gpu_budget_gib": 4.0, "decode_tok_s": 0.4},
    ]
    path = plot_runs(runs, tmp_path / "p.png", "title")
    assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.gpu
def test_bench_on_gpu_with_both_peers_and_floors(tmp_path):
    model = tmp_path / "tiny"
    synth_checkpoint("tiny-qwen3-moe", model, progress=False)
    # 0.0003 GiB: below what tiermoe needs on a GPU (1 GiB workspace), yet offloads hf; cap: half the
    # experts in GPU slots.
    fixed = plan_from_config(
        json.loads((model / "config.json").read_text()), EngineConfig(gpu_budget_gib=100)
    )
    cap = (
        fixed.dense_bytes
        + fixed.kv_bytes
        + fixed.workspace_bytes
        + fixed.total_experts / 2 * fixed.expert_bytes
    ) / GIB
    payload = run.bench(
        model, Workload(16, 6, 2, 1), [0.0003, cap, None], ["hf", "hf-offload"], timeout_s=300
    )
    runs = {(r["engine"], r["gpu_budget_gib"]): r for r in payload["runs"]}
    assert set(runs) == {
        ("tiermoe", 0.0003), ("tiermoe", cap), ("tiermoe", None), ("hf", None), ("hf-offload", 0.0003), ("hf-offload", cap),
    }  # fmt: skip
    assert payload["h2d_gb_s"] > 1
    for key in (("tiermoe", cap), ("tiermoe", None), ("hf", None), ("hf-offload", 0.0003)):
        assert runs[key]["error"] is None, runs[key]["error"]
        assert runs[key]["decode_tok_s"] > 0 and runs[key]["peak_gpu_gib"] > 0
    assert "cpu" in runs[("hf-offload", 0.0003)]["placement"]
    assert (
        "too small" in runs[("tiermoe", 0.0003)]["error"]
        and runs[("tiermoe", 0.0003)]["pcie_floor_tok_s"] is None
    )
    capped = runs[("tiermoe", cap)]
    assert capped["routing"] == "szd" and capped["pcie_floor_tok_s"] > 0 and capped["floor_tok_s"] > 0
    assert capped["miss_path"] == "staged"  # auto's pick on a GPU with the workspace for it, recorded
    assert capped["h2d_gb_s"] > 0 and 0 <= capped["gpu_hit_rate"] <= 1 and capped["floor_fraction"] > 0
    assert runs[("tiermoe", None)]["pcie_floor_tok_s"] is None


def test_git_revision_given_by_the_caller_wins(monkeypatch):
    """A copy of the tree on another machine may carry a stale .git: the revision the caller names is
    the one recorded."""
    from tiermoe.provenance import git_revision

    monkeypatch.setenv("TIERMOE_GIT_REV", "abc1234")
    assert git_revision() == "abc1234"
    monkeypatch.setenv("TIERMOE_GIT_REV", "")
    assert git_revision() != "abc1234"


@pytest.mark.slow  # about 10 s on CI's 2 cores
def test_bench_runs_every_setting_at_each_number_of_sequences(tmp_path, monkeypatch):
    """`--batch 1,3`: one results file, each setting at 1 and then 3 concurrent sequences, on one load
    (one child process, the KV reserve of the larger batch at both); the store's traffic a token falls
    when three sequences share each step's experts (the union, loaded once)."""
    children = []
    measure = run.run_isolated

    def counted(*args):
        children.append(args[-1])  # the sweep's batches
        return measure(*args)

    monkeypatch.setattr(run, "run_isolated", counted)
    model = tmp_path / "tiny"
    synth_checkpoint("tiny-olmoe", model, progress=False)
    argv = [
        "bench", "--model", str(model), "--gpu-budget", repr(_capped_budget_gib(model)), "--routing", "uniform",
        "--prompt-len", "8", "--gen-len", "8", "--batch", "1,3", "--repeat", "1", "--h2d-gb-s", str(H2D_GB_S),
        "--out-dir", str(tmp_path / "results"), "--name", "t",
    ]  # fmt: skip
    parser = argparse.ArgumentParser()
    run.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    runs = json.loads((tmp_path / "results" / "t.json").read_text())["runs"]
    assert [r["batch"] for r in runs] == [1, 3] and all(r["error"] is None for r in runs)
    assert children == [[1, 3]]
    assert (
        runs[0]["load_s"] == runs[1]["load_s"]
        and runs[0]["kv_reserve_tokens"] == runs[1]["kv_reserve_tokens"]
    )
    assert runs[1]["h2d_bytes_per_token"] < runs[0]["h2d_bytes_per_token"]
    with pytest.raises(SystemExit):
        parser.parse_args([*argv[:-2], "--batch", "1,0"])


def test_link_ceiling_is_never_below_what_a_run_moved():
    runs = [
        {"engine": "tiermoe", "h2d_gb_s": 36.8},
        {"engine": "tiermoe", "h2d_gb_s": None},
        {"engine": "hf-offload", "h2d_gb_s": 90.0},  # peers' figures are not ours to trust
    ]
    assert run.link_ceiling(13.2, runs) == (36.8, "a run's achieved 36.8 GB/s (the measurement read 13.2)")
    assert run.link_ceiling(52.9, runs) == (52.9, "measured")
    assert run.link_ceiling(None, runs) == (None, "measured")


def test_a_sweep_keeps_each_batch_its_own_figures_or_error(tmp_path, monkeypatch):
    """One load, three batches: an error at one (an OOM at 64 sequences, say) is that batch's alone, each
    batch's prompts are runs no earlier batch used, and `measured` sees the sweep after every batch."""
    from tiermoe.bench import measure

    model = tmp_path / "tiny"
    synth_checkpoint("tiny-olmoe", model, progress=False)
    runs_seen = []

    def timed(llm, model_dir, workload, setup, first_run=0):
        runs_seen.append((workload.batch, first_run))
        if workload.batch == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return {"decode_tok_s": float(workload.batch), "error": None}

    monkeypatch.setattr(measure, "_timed", timed)
    seen = []
    result = measure.measure_tiermoe(
        str(model), Workload(8, 4, 1, 2), None, None, "cpu", "fp32", None, [1, 4, 16], seen.append
    )
    assert [f.get("decode_tok_s") for f in result["sweep"]] == [1.0, None, 16.0]
    assert result["sweep"][1]["error"].startswith("out of GPU memory")
    assert runs_seen == [(1, 0), (4, 3), (16, 6)]  # runs 0-2, 3-5, 6-8: warm-up and two timed each
    assert [len(s["sweep"]) for s in seen] == [3, 3, 3]  # the same dict, grown after each batch


def test_a_sweep_stopped_midway_keeps_what_it_measured(tmp_path):
    """A child timed out or killed after its first batch: that batch's figures stand (read back from the
    file the child rewrites after each batch), the batches it never ran carry the error."""
    from tiermoe.bench import measure

    out = tmp_path / "result.json"
    out.write_text(json.dumps({"sweep": [{"decode_tok_s": 9.0, "error": None}], "error": None}))
    partial = measure._partial(out, "timed out after 600 s")
    sweep = {"batches": [1, 4, 16]}
    got = [run._swept(sweep, ("m", 4.0, "{}"), b, lambda batches: partial) for b in (1, 4, 16)]
    assert got[0]["decode_tok_s"] == 9.0
    assert got[1] == got[2] == {"error": "timed out after 600 s"}
    assert measure._partial(tmp_path / "none.json", "killed") == {"error": "killed"}


def test_the_table_note_is_a_runs_error_else_its_fewest_slots_a_layer():
    from tiermoe.bench.run import _note

    assert _note({"error": None, "experts": {"layer_slots_min": 5}}) == "fewest slots a layer: 5"
    assert _note({"error": "x" * 80, "experts": {"layer_slots_min": 5}}) == "x" * 60
    assert _note({"error": None, "experts": {}}) == "" and _note({"error": None}) == ""
