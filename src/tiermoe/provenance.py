"""The provenance of every result file: command, git revision, device, driver, torch version, date.

A figure without them cannot be quoted, so `run_metadata` is attached to every JSON that bench,
profile and routing-report write.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path("bench/results")


def git_revision(cwd: str | Path | None = None) -> str | None:
    """Short HEAD hash with "-dirty" when tracked files have uncommitted changes; None outside git.
    TIERMOE_GIT_REV, when set, wins: a copy of the tree (the GPU machine gets one) may have no .git or,
    as seen there, a stale one."""
    if os.environ.get("TIERMOE_GIT_REV"):
        return os.environ["TIERMOE_GIT_REV"]
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_info() -> dict:
    """Device name, driver and library versions of this machine."""
    import torch  # here: routing-report and the CLI's --help need no torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
        driver = _nvidia_driver() or f"cuda {torch.version.cuda}"
    else:
        device = f"cpu: {platform.processor() or platform.machine()}"
        driver = None
    return {"device": device, "driver": driver, "torch_version": torch.__version__}


def run_metadata(argv: list[str] | None = None) -> dict:
    """Provenance of a result: command line, git revision, device, driver, torch version, UTC date."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        # "tiermoe", not the venv's absolute path nor `python -m tiermoe.cli`'s cli.py
        argv[0] = "tiermoe" if Path(argv[0]).name in ("cli.py", "__main__.py") else Path(argv[0]).name
    return {
        "command": shlex.join(argv),
        "git_rev": git_revision(),
        **device_info(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def timestamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
