"""The package's layers hold: the inference side (and the CLI) never imports torch or
matplotlib, no module grows past 400 lines, and params.yaml is the one source of every default
(no numeric default in a signature for a value params.yaml holds)."""

import ast
import subprocess
import sys

import yaml
from helpers import ROOT, clean_env

SRC = ROOT / "src" / "vaepipe"
# What a serving host or the CLI never needs: the training stack and the plotting library.
HEAVY = ("torch", "matplotlib", "sklearn", "scipy")
TORCH_FREE = (
    "vaepipe.cli",
    "vaepipe.inference.commands",
    "vaepipe.inference.runtime",
    "vaepipe.inference.serving",
    "vaepipe.inference.site",
    "vaepipe.export.contract",
    "vaepipe.imagefiles",
    "vaepipe.tracking.promotion",
    "vaepipe.tracking.compare",
    "vaepipe.data.arrays",
)
MAX_MODULE_LINES = 400
# Names under which a params.yaml value reaches a function, beyond the keys themselves.
PARAM_ALIASES = {"sigma": "gaussian_sigma", "threshold": "active_threshold", "k": "knn_k"}


def heavy_imports(modules) -> dict[str, str]:
    """{module: the heavy modules importing it loads}, each in a fresh interpreter (all at
    once)."""
    procs = {
        m: subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import sys, {m}; print(sorted(set(sys.modules) & {set(HEAVY)}))",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for m in modules
    }
    out = {}
    for m, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        out[m] = stdout.strip()
    return out


def test_the_inference_side_never_imports_the_training_stack():
    assert heavy_imports(TORCH_FREE) == dict.fromkeys(TORCH_FREE, "[]")


def test_the_check_above_sees_an_import_of_torch():
    # the test above is only as good as this: a module that imports torch is caught
    assert "torch" in heavy_imports(["vaepipe.model.vae"])["vaepipe.model.vae"]


def test_no_module_passes_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert len(sizes) > 30
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def _param_names() -> set[str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return {key for section in params.values() for key in section} | set(PARAM_ALIASES)


def numeric_defaults(tree: ast.AST, names: set[str]) -> list[str]:
    """'function(arg=default)' for every numeric literal default of an argument in `names`."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        positional = a.posonlyargs + a.args
        pairs = list(zip(positional[len(positional) - len(a.defaults) :], a.defaults, strict=True))
        kw = zip(a.kwonlyargs, a.kw_defaults, strict=True)
        pairs += [(arg, d) for arg, d in kw if d is not None]
        for arg, default in pairs:
            value = default.operand if isinstance(default, ast.UnaryOp) else default
            numeric = isinstance(value, ast.Constant) and type(value.value) in (int, float)
            if numeric and arg.arg in names:
                found.append(f"{node.name}({arg.arg}={ast.unparse(default)})")
    return found


def test_no_signature_holds_a_default_that_params_yaml_holds():
    names = _param_names()
    assert {"batch_size", "seed", "gaussian_sigma", "active_threshold", "knn_k"} <= names
    found = {
        str(p.relative_to(ROOT)): bad
        for p in sorted(SRC.rglob("*.py"))
        if (bad := numeric_defaults(ast.parse(p.read_text()), names))
    }
    assert found == {}, "defaults belong in params.yaml: " + repr(found)


def test_the_default_check_finds_one_when_it_comes_back():
    tree = ast.parse("def evaluate(x, batch_size=1000, *, seed=0, peak=1.0, sigma=-0.1): pass")
    assert sorted(numeric_defaults(tree, _param_names())) == [
        "evaluate(batch_size=1000)",
        "evaluate(seed=0)",
        "evaluate(sigma=-0.1)",
    ]
