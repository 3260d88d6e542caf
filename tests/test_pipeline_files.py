"""dvc.yaml, the code and the docs name the same files.

resnet.paths names every file the stages hand each other; dvc.yaml must list exactly
those as each stage's data deps and outputs, and exactly the modules a stage runs as its
code deps (so that changing any of them reruns the stage, and changing anything else
does not).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from resnet import paths

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = list(PIPELINE["stages"])


def _entries(items: list) -> list[str]:
    """Paths of a dvc.yaml list whose entries are strings or {path: options}."""
    return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]


def _module_file(name: str) -> Path | None:
    """src/ file of a ``resnet...`` module (a package's __init__.py), None for other libraries."""
    if name != "resnet" and not name.startswith("resnet."):
        return None
    base = SRC.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path, package: str) -> set[str]:
    """Every ``resnet`` module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from resnet import paths` is a module
    # Importing resnet.x.y runs resnet/__init__ and resnet/x/__init__ first.
    return {".".join(m.split(".")[:i]) for m in found for i in range(1, len(m.split(".")) + 1)}


def modules_run_by(script: Path) -> set[Path]:
    """The src/ files a stage script can run: its resnet imports, transitively."""
    todo, seen = [(script, "")], set()
    while todo:
        path, package = todo.pop()
        for name in _imports(path, package):
            file = _module_file(name)
            if file is not None and file not in seen:
                seen.add(file)
                todo.append((file, name if file.name == "__init__.py" else name.rpartition(".")[0]))
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_modules_the_stage_runs(stage: str) -> None:
    deps = _entries(PIPELINE["stages"][stage]["deps"])
    script = REPO / "stages" / f"{stage}.py"
    assert f"stages/{stage}.py" in deps and PIPELINE["stages"][stage]["cmd"] == f"python stages/{stage}.py"
    code_deps = {REPO / d for d in deps if d.startswith("src/")}
    needed = modules_run_by(script)
    uncovered = sorted(str(f.relative_to(REPO)) for f in needed if not any(f == d or d in f.parents for d in code_deps))
    assert not uncovered, f"dvc.yaml stage {stage} runs these modules but does not depend on them: {uncovered}"
    unused = sorted(str(d.relative_to(REPO)) for d in code_deps if not any(f == d or d in f.parents for f in needed))
    assert not unused, f"dvc.yaml stage {stage} depends on modules it never runs: {unused}"


@pytest.mark.parametrize("stage", STAGES)
def test_data_deps_and_outputs_are_the_ones_resnet_paths_names(stage: str) -> None:
    spec = PIPELINE["stages"][stage]
    data_deps = [d for d in _entries(spec["deps"]) if not d.startswith(("src/", "stages/"))]
    assert data_deps == [str(p) for p in paths.STAGE_INPUTS[stage]]
    outputs = _entries(spec.get("outs")) + _entries(spec.get("metrics")) + _entries(spec.get("plots"))
    assert sorted(outputs) == sorted(str(p) for p in paths.STAGE_OUTPUTS[stage])


def test_each_chart_is_declared_once_in_the_top_level_plots_on_a_stage_output() -> None:
    """A file under a stage's plots is also drawn with DVC's defaults (epoch_seconds against
    "step", per-class lines against the class index, each PNG twice): plot data are plain outs."""
    assert not [stage for stage, spec in PIPELINE["stages"].items() if "plots" in spec]
    drawn = []
    for entry in PIPELINE["plots"]:
        name, spec = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        drawn += list(spec["y"]) if spec else [name]
    produced = {str(p) for outs in paths.STAGE_OUTPUTS.values() for p in outs}
    assert set(drawn) <= produced, set(drawn) - produced
    images = [f for f in drawn if f.endswith(".png")]
    assert len(images) == len(set(images))


def test_every_handed_over_file_is_written_by_an_earlier_stage() -> None:
    written: set[Path] = set()
    for stage in STAGES:
        missing = [p for p in paths.STAGE_INPUTS[stage] if p not in written]
        assert not missing, f"{stage} reads {missing} before any stage writes it"
        written |= set(paths.STAGE_OUTPUTS[stage])


def test_the_architecture_doc_names_every_module_and_every_handed_over_file() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text()
    modules = sorted(
        p.relative_to(SRC / "resnet")
        for p in (SRC / "resnet").rglob("*.py")
        if p.name != "__init__.py" or p.parent != SRC / "resnet"
    )
    unnamed = [str(m) for m in modules if f"`{m.as_posix()}`" not in doc]
    assert not unnamed, f"docs/architecture.md does not list these modules: {unnamed}"
    files = {str(p) for outs in paths.STAGE_OUTPUTS.values() for p in outs}
    unnamed = sorted(f for f in files if f"`{f}" not in doc)
    assert not unnamed, f"docs/architecture.md does not name these stage files: {unnamed}"


def test_the_stage_scripts_name_no_file_paths_themselves() -> None:
    """Stage scripts take their paths from resnet.paths, so dvc.yaml and the code cannot drift."""
    for script in sorted((REPO / "stages").glob("*.py")):
        literals = [
            n.value
            for n in ast.walk(ast.parse(script.read_text()))
            if isinstance(n, ast.Constant)
            and isinstance(n.value, str)
            and n.value.startswith(("data/", "models/", "metrics/", "plots/"))
            and " " not in n.value
        ]
        assert not literals, f"{script.name} names paths itself: {literals}; use resnet.paths"
