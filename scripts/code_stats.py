"""The shape of the code base in figures: what a reader meets first and where it has grown.

    python scripts/code_stats.py            # a table
    python scripts/code_stats.py --json     # the same, as JSON

README lines; each stage script's lines; modules per folder of src/vaepipe and the largest;
functions over 50 lines; calls with 6 or more positional arguments. Standard library only
(ast), so it runs from any Python 3.10+ without the project installed.
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONG_FUNCTION = 50  # lines
MANY_POSITIONAL = 6  # arguments


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def python_files(*folders: str) -> list[Path]:
    return sorted(
        p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts
    )


def long_functions(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > LONG_FUNCTION:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def positional_calls(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                positional = [a for a in node.args if not isinstance(a, ast.Starred)]
                if len(positional) >= MANY_POSITIONAL:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} ({len(positional)})")
    return out


def stats() -> dict:
    src = ROOT / "src" / "vaepipe"
    modules = [p for p in src.rglob("*.py") if "__pycache__" not in p.parts]
    per_folder = Counter(str(p.parent.relative_to(src.parent)) for p in modules)
    largest = max(modules, key=lines)
    code = python_files("src", "pipeline")
    return {
        "readme_lines": lines(ROOT / "README.md"),
        "stage_lines": {p.name: lines(p) for p in sorted((ROOT / "pipeline").glob("*.py"))},
        "modules_per_folder": dict(sorted(per_folder.items())),
        "largest_module": f"{largest.relative_to(ROOT)} ({lines(largest)} lines)",
        "modules_over_400_lines": sorted(
            f"{p.relative_to(ROOT)} ({lines(p)})" for p in modules if lines(p) > 400
        ),
        "functions_over_50_lines": long_functions(code),
        "calls_with_6_or_more_positional_args": positional_calls(code),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    s = stats()
    if parser.parse_args().json:
        print(json.dumps(s, indent=2))
        return
    stages = s["stage_lines"]
    print(f"README.md                      {s['readme_lines']} lines")
    print(f"stage scripts                  {sum(stages.values())} lines: {stages}")
    for folder, n in s["modules_per_folder"].items():
        print(f"  {folder:<28} {n} modules")
    print(f"largest module                 {s['largest_module']}")
    print(f"modules over 400 lines         {len(s['modules_over_400_lines'])}")
    for key in ("functions_over_50_lines", "calls_with_6_or_more_positional_args"):
        print(f"{key.replace('_', ' '):<30} {len(s[key])}")
        for item in s[key]:
            print(f"  {item}")


if __name__ == "__main__":
    main()
