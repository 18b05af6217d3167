"""Imports point one way (jobs -> pipeline -> storage) and no module-level import cycle exists."""
from pathlib import Path

from benchmarks import structure


def test_no_import_points_the_wrong_way():
    assert structure.wrong_way(structure.graph(top_level_only=False)) == []


def test_no_module_level_import_cycle():
    assert structure.cycles(structure.graph(top_level_only=True)) == []


def test_the_checks_see_a_wrong_way_import_and_a_cycle():
    """The scanners themselves: a storage module importing pipeline, and a two-module cycle, are caught."""
    edges = {"storage.fs": {"pipeline.config"}, "pipeline.config": {"storage.fs"}, "jobs.cli": {"pipeline.config"}}
    assert structure.wrong_way(edges) == ["storage.fs -> pipeline.config"]
    assert structure.cycles(edges) == [["pipeline.config", "storage.fs"]]


def test_relative_and_nested_imports_are_resolved(tmp_path: Path, monkeypatch):
    pkg = tmp_path / "storage"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n\ndef f():\n    from pipeline.flows import run\n")
    (pkg / "b.py").write_text("")
    monkeypatch.setattr(structure, "ROOT", tmp_path)
    found = structure.imports_of(pkg / "a.py", "storage.a", top_level_only=False)
    assert {"storage.b", "pipeline.flows.run"} <= found
    assert "pipeline.flows.run" not in structure.imports_of(pkg / "a.py", "storage.a", top_level_only=True)
