"""The command starts without torch where it needs none: `tiermoe --help` and a chat with a server."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
from tiermoe.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("torch imported" if "torch" in sys.modules else "no torch")
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["chat", "--help"], ["chat", "--url", "http://127.0.0.1:9"], ["bench", "--help"]]
)
def test_torch_is_imported_only_by_the_commands_that_use_it(argv):
    out = subprocess.run(
        [sys.executable, "-c", CHECK, *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    expected = "torch imported" if argv[0] == "bench" else "no torch"  # bench's flags come from its module
    assert out.stdout.strip().splitlines()[-1] == expected, out.stderr


def test_import_of_the_cli_module_is_torch_free():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import tiermoe.cli"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    modules = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()]
    assert "tiermoe.cli" in modules and "torch" not in modules
