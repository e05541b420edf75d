"""Imports run one way: no cycle between the package's parts, and models know nothing of the engine,
the weights or the offload (scripts/import_graph.py, which anyone can run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


def _graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_package_cycle_and_models_import_downwards_only():
    g = _graph_module()
    edges = g.graph()
    assert g.cycles(edges) == []
    assert set(edges["tiermoe.models"]) <= {"tiermoe.errors"}
    assert not {"tiermoe.bench", "tiermoe.engine"} & set(edges["tiermoe.hardware"])
    assert (
        "tiermoe.offload" not in edges["tiermoe.weights"] and "tiermoe.offload" not in edges["tiermoe.config"]
    )


def test_the_checker_finds_a_cycle():
    g = _graph_module()
    assert g.cycles({"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}}) == [["a", "b", "c"]]
