"""dvc.yaml's code deps are each stage script's import closure, exactly, and the stage scripts
reach MLflow only through vaepipe.tracking."""

import ast
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

STAGES = ("prepare", "train", "classifier", "evaluate", "export")
# What no stage may import: editing the CLI, the served model or `vaepipe runs` retrains nothing.
OUTSIDE_THE_PIPELINE = (
    "src/vaepipe/cli.py",
    "src/vaepipe/inference/commands.py",
    "src/vaepipe/inference/serving.py",
    "src/vaepipe/inference/site.py",
    "src/vaepipe/tracking/compare.py",
    "src/vaepipe/tracking/promotion.py",
)


def module_file(name: str) -> Path | None:
    """The file of a module the pipeline owns (vaepipe.*, pipeline/_venv), else None."""
    if name == "_venv":
        return ROOT / "pipeline" / "_venv.py"
    if name != "vaepipe" and not name.startswith("vaepipe."):
        return None
    base = ROOT / "src" / Path(*name.split("."))
    if base.is_dir():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def imported_names(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (lazy imports inside
    functions too: they run when the stage calls them)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import mod`
    return names


def import_closure(script: Path) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c imports a, a.b and a.b.c
                found = module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return {str(p.relative_to(ROOT)) for p in seen}


def declared_code_deps(stage: str) -> set[str]:
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    return {d for d in deps if d.endswith(".py")}


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_code_deps_equal_the_stage_import_closure(stage):
    closure = import_closure(ROOT / "pipeline" / f"{stage}.py")
    declared = declared_code_deps(stage)
    assert closure - declared == set(), f"{stage} imports these but dvc.yaml misses them"
    assert declared - closure == set(), f"{stage} declares these but never imports them"
    assert not any(d in closure for d in OUTSIDE_THE_PIPELINE)


def test_no_stage_depends_on_a_whole_folder_of_code():
    for stage in STAGES:
        deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
        assert not [d for d in deps if d.rstrip("/") in ("src", "src/vaepipe", "pipeline")]


def test_the_closure_finds_lazy_and_package_imports(tmp_path):
    # the test above is only as good as this: `from vaepipe.tracking import registry` inside a
    # function must pull in the subpackage module and its parent
    closure = import_closure(ROOT / "pipeline" / "export.py")
    assert {"src/vaepipe/tracking/__init__.py", "src/vaepipe/tracking/registry.py"} <= closure
    assert "src/vaepipe/data/arrays.py" not in closure  # export never reads the data


def test_dvcignore_keeps_bytecode_out_of_the_deps():
    lines = (ROOT / ".dvcignore").read_text().splitlines()
    assert "__pycache__/" in lines


def test_stage_scripts_reach_mlflow_only_through_tracking():
    for stage in STAGES:
        names = imported_names(ROOT / "pipeline" / f"{stage}.py")
        assert not [n for n in names if n == "mlflow" or n.startswith("mlflow.")], stage
