"""The house keeps its shape: imports point down the layers of docs/architecture.md.

Every import of a kdgap module is read with ``ast`` (no module is imported), so the test
sees the real dependency graph, including imports a reader would miss.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kdgap"

#: What each unit may import (besides itself): the layer diagram of docs/architecture.md.
#: ``agent`` and ``hooks`` are siblings: recording and patching never need the agent.
GROUND = {"kdgap._checks", "kdgap.io", "kdgap.records", "kdgap.envs", "kdgap.metrics"}
ALLOWED: dict[str, set[str]] = {
    "kdgap._checks": set(),
    "kdgap.io": set(),
    "kdgap.records": {"kdgap.io"},
    "kdgap.envs": {"kdgap._checks"},
    "kdgap.metrics": {"kdgap._checks", "kdgap.io", "kdgap.records", "kdgap.envs"},
    "kdgap.policies": GROUND,
    "kdgap.organisms": GROUND | {"kdgap.policies"},
    "kdgap.models": GROUND | {"kdgap.policies", "kdgap.organisms"},
    "kdgap.agent": GROUND | {"kdgap.policies", "kdgap.organisms", "kdgap.models"},
    "kdgap.hooks": GROUND | {"kdgap.policies", "kdgap.models"},
    "kdgap.probes": GROUND | {"kdgap.policies", "kdgap.models", "kdgap.hooks"},
    "kdgap.training": GROUND | {"kdgap.policies", "kdgap.organisms", "kdgap.models", "kdgap.agent"},
    "kdgap.report": GROUND
    | {
        "kdgap.policies",
        "kdgap.organisms",
        "kdgap.models",
        "kdgap.agent",
        "kdgap.hooks",
        "kdgap.probes",
        "kdgap.training",
    },
    "kdgap.cli": {"kdgap.report.api"},
}
#: Helpers for tests and benchmarks sit on top; nothing in the library imports them.
TOP = {"kdgap.testing"}
TORCH_FREE = ("kdgap._checks", "kdgap.io", "kdgap.records", "kdgap.envs", "kdgap.metrics")
HEAVY = {"torch", "transformers", "transformer_lens", "safetensors"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(node: ast.ImportFrom | ast.Import, here: str, is_pkg: bool) -> list[str]:
    """Full names of the kdgap modules (or packages) an import statement reads."""
    mods = _modules()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = here.split(".") if is_pkg else here.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in mods else base)
    return out


@cache
def _imports() -> dict[str, list[tuple[str, int, bool]]]:
    """``{module: [(imported name, line, at top level), ...]}`` for every kdgap module."""
    graph = {}
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(n) for n in tree.body}
        # if TYPE_CHECKING / try blocks at module level still count as top level
        for n in tree.body:
            for sub in ast.walk(n):
                if isinstance(n, (ast.If, ast.Try)):
                    top.add(id(sub))
        rows = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(node, name, path.name == "__init__.py"):
                    rows.append((target, node.lineno, id(node) in top))
        graph[name] = rows
    return graph


def _unit(module: str) -> str:
    """The layer unit of a module: its entry in ALLOWED or TOP (longest prefix)."""
    for unit in sorted([*ALLOWED, *TOP], key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    raise AssertionError(f"{module} belongs to no layer; add it to ALLOWED in this test.")


def test_every_module_belongs_to_a_layer():
    for name in _modules():
        if name != "kdgap":
            _unit(name)


def test_imports_point_down_the_layers():
    bad = []
    for name, rows in _imports().items():
        if name == "kdgap":
            continue
        unit = _unit(name)
        for target, line, _ in rows:
            if not target.startswith("kdgap"):
                continue
            other = _unit(target)
            if other == unit or unit in TOP and other not in {"kdgap.cli"}:
                continue
            allowed = ALLOWED[unit]
            if other in allowed or target in allowed:
                continue
            bad.append(f"{name}:{line} imports {target} ({unit} may import {sorted(allowed)})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_cli_calls_the_report_api_only():
    targets = {t for t, _, _ in _imports()["kdgap.cli"] if t.startswith("kdgap")}
    assert targets == {"kdgap.report.api"}, targets


def test_hooks_and_probes_never_import_agent_or_report():
    for name, rows in _imports().items():
        if name.startswith(("kdgap.hooks", "kdgap.probes")):
            for target, line, _ in rows:
                assert not target.startswith(("kdgap.agent", "kdgap.report")), (name, line)


def test_ground_floor_imports_no_torch():
    for name, rows in _imports().items():
        if name.startswith(TORCH_FREE):
            heavy = {t for t, _, _ in rows if t.split(".")[0] in HEAVY}
            assert not heavy, f"{name} imports {heavy}"


def test_ground_floor_runs_without_torch():
    # jaxtyping and friends must not pull torch in either: checked in a fresh interpreter.
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in TORCH_FREE)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        + repr(sorted(HEAVY))
        + "))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_import_cycle():
    graph = {
        name: {t for t, _, _ in rows if t in _modules() and t != name}
        for name, rows in _imports().items()
    }
    # A package's __init__ re-exports its submodules: an edge from a submodule to its own
    # package's __init__ would be a cycle, and is reported like any other.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_kdgap_imports_are_at_the_top_of_the_file():
    late = [
        f"{name}:{line} imports {target}"
        for name, rows in _imports().items()
        for target, line, top in rows
        if target.startswith("kdgap") and not top
    ]
    assert not late, "function-level imports of kdgap modules:\n" + "\n".join(late)


def test_no_module_getattr_and_every_package_has_a_table_of_contents():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "__getattr__" not in funcs, f"{name} defines a module __getattr__"
        if path.name == "__init__.py" and name != "kdgap":
            names = {
                t.id
                for n in tree.body
                if isinstance(n, ast.Assign)
                for t in n.targets
                if isinstance(t, ast.Name)
            }
            assert "__all__" in names, f"{name}/__init__.py has no __all__"


def test_no_file_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    keep = (".py", ".md", ".toml", ".ipynb", ".txt", ".cfg", ".yml", ".yaml", ".sh")
    files = [ROOT / f for f in out if f.endswith(keep) or f.startswith(".ci/")]
    return [f for f in files if f.exists() and f.name != Path(__file__).name]


#: Text that points outside the repository or speaks of how the work was done.
FORBIDDEN = re.compile(
    r"\.\./shared|stack-notes|(?:earlier|this|previous|last|next) session|not re-run"
    r"|\bissue \d+|\(issue|has since moved",
    re.IGNORECASE,
)


def test_the_repository_speaks_of_itself_only():
    hits = []
    for path in _tracked_text_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits[:40])
