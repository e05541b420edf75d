"""What every benchmark file carries besides its provenance (../provenance.py): the result schema and
the comparison plot."""

from __future__ import annotations

from pathlib import Path

# Expert traffic per decoded token of a timed run (measure.decode_traffic).
DECODE_TRAFFIC = (
    "gpu_hit_rate",
    "h2d_bytes_per_token",
    "disk_bytes_per_token",
    "h2d_gb_s",
    "gpu_experts_per_token",
    "pcie_experts_per_token",
    "cpu_experts_per_token",
    "disk_experts_per_token",
    "cpu_ms_per_token",
)

# Keys every run object in a bench result file has (null where a figure does not apply).
RUN_KEYS = (
    "engine",
    "model_preset",
    "experts_dtype",
    "gpu_budget_gib",
    "cpu_budget_gib",
    "kv_reserve_tokens",
    "batch",
    "prompt_len",
    "gen_len",
    "repeat",
    "prefill_tok_s",
    "decode_tok_s",
    "ttft_s",
    "peak_gpu_gib",
    "peak_host_gib",
    "plan_gib",  # tiermoe's memory plan: budget, dense, kv, workspace, experts (GiB)
    "held_gpu_gib",  # tiermoe's GPU memory held after the timed runs, by pool (CUDA graphs' apart)
    "pcie_floor_tok_s",
    "routing",
    "cpu_compute",
    "cpu_kernel",  # with cpu_compute: which CPU kernel ran ("compiled (avx512)", or why torch's)
    "plan",
    "routing_params",
    "routing_note",
    "routing_trace",
    *DECODE_TRAFFIC,
    "floor_tok_s",
    "predicted_tok_s",
    "floor_serial_tok_s",
    "floor_fraction",
    "floor_note",
    "prefill_h2d_bytes",
    "prefill_floor_fraction",
    "peer_flags",
    "experts",
    "experts_decode",
    "error",
    "device",
    "driver",
    "torch_version",
    "git_rev",
    "date",
    "command",
)


def variant_name(run: dict) -> str:
    """The tiermoe store settings of a capped run ("lru", "lfu no-prefetch"), llama.cpp's GGUF type and
    split ("q4_k_m fit"), "" otherwise."""
    if run.get("llama_cpp_setting"):
        return f"{run.get('experts_dtype') or run.get('llama_cpp_format') or ''} {run['llama_cpp_setting']}".strip()
    if run.get("gpu_budget_gib") is None or not run.get("eviction"):
        return ""
    in_place = "" if run.get("miss_path", "copy") == "copy" else f" {run['miss_path']}"
    cpu = " cpu" if run.get("cpu_compute") else ""
    return run["eviction"] + ("" if run.get("prefetch", True) else " no-prefetch") + in_place + cpu


def run_label(run: dict) -> str:
    budget = "uncapped" if run.get("gpu_budget_gib") is None else f"{run['gpu_budget_gib']:g} GiB"
    routing = run.get("routing") and f"{run['routing']} routing"
    lines = [run["engine"], run.get("experts_dtype"), budget, routing, variant_name(run)]
    return "\n".join(filter(None, lines)) + f"\nbatch {run['batch']}"


# The two floors of a capped tiermoe run, as (key, legend, colour, mark width) of their marks on the
# plot; the second is shorter, so it stays visible where both floors coincide.
FLOOR_MARKS = (
    ("pcie_floor_tok_s", "PCIe floor, uniform routing", "black", 30),
    ("floor_tok_s", "floor at the measured hit rate", "tab:green", 16),
)


def plot_runs(runs: list[dict], path: str | Path, title: str) -> Path:
    """Bars of decode tok/s per engine and setting on a log axis, with each run's floors as marks (the
    uniform-routing PCIe floor and the floor at the run's own hit rate, in their own colours).
    Runs that failed or were skipped get an empty slot labelled with the reason, not a zero bar."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the bench machines
    import matplotlib.pyplot as plt

    colors = {"tiermoe": "tab:blue", "hf": "tab:orange", "hf-offload": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(runs)), 4.5))
    xs = range(len(runs))
    measured = [r.get("decode_tok_s") or 0.0 for r in runs]
    floors = [r.get(key) or 0.0 for r in runs for key, *_ in FLOOR_MARKS]
    positive = [v for v in measured + floors if v > 0] or [1.0]
    lo, hi = min(positive) / 10, max(positive) * 4
    for x, run, value in zip(xs, runs, measured, strict=True):
        if value > 0:
            ax.bar(x, value, color=colors.get(run["engine"], "tab:gray"))
            ax.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom", fontsize=8)
        else:
            reason = (run.get("error") or "no result").splitlines()[0][:40]
            ax.annotate(
                f"not run: {reason}", (x, lo * 1.3), ha="center", va="bottom", fontsize=7, rotation=90
            )
        for key, _, color, width in FLOOR_MARKS:
            if run.get(key):
                ax.plot(x, run[key], marker="_", markersize=width, mew=3, color=color)
    for key, legend, color, _ in FLOOR_MARKS:
        if any(r.get(key) for r in runs):
            ax.plot([], [], marker="_", markersize=12, mew=2, color=color, linestyle="none", label=legend)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.set_xticks(list(xs), [run_label(r) for r in runs], fontsize=8)
    ax.set_ylabel("decode tok/s (whole batch)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
