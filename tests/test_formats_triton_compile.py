"""Every Triton kernel compiles for the GPUs users run (sm_75: RTX 20 series; sm_86: RTX 30 series, A10;
sm_89: RTX 40 series; sm_90: H100), ahead of time on this machine with no GPU: a kernel that only the
interpreter accepts fails here, not on the user's GPU. 47 kernels an architecture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.slow  # about 10 s an architecture
@pytest.mark.parametrize("arch", [75, 86, 89, 90])
def test_every_kernel_compiles_for(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernels_aot.py")
    run = subprocess.run(
        [sys.executable, str(script), str(arch)], capture_output=True, text=True, env=env, timeout=600
    )
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 47, run.stdout[-3000:] + run.stderr[-3000:]
    assert all(line.endswith(": ok") for line in lines)
