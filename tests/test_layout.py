"""The package layout of ../shared/DESIGN.md: each folder imports only in the allowed direction,
and no module imports itself back through others (no import circles).

entrypoints -> engine -> distributed -> models, weights -> config, params, errors.
Checked statically over every import statement (function-level ones included) and,
for models/ and weights/, by importing them alone in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pprt"

# folder (or leaf module) -> the pprt folders/modules it must never import
FORBIDDEN = {
    "config": ("models", "weights", "engine", "distributed", "entrypoints", "plan", "tokenizer"),
    "families": ("models", "weights", "engine", "distributed", "entrypoints", "plan", "tokenizer", "config"),
    "params": ("models", "weights", "engine", "distributed", "entrypoints", "plan", "config", "tokenizer"),
    "errors": ("models", "weights", "engine", "distributed", "entrypoints", "plan", "config", "params", "tokenizer"),
    "fields": ("models", "weights", "engine", "distributed", "entrypoints", "plan", "config", "params", "tokenizer"),
    "models": ("weights", "engine", "distributed", "entrypoints", "plan"),
    "weights": ("engine", "distributed", "entrypoints", "plan"),
    "plan": ("engine", "distributed", "entrypoints", "weights", "models"),
    "tokenizer": ("models", "weights", "engine", "distributed", "entrypoints", "plan", "config"),
    "chat_template": ("models", "weights", "engine", "distributed", "entrypoints", "plan", "config", "tokenizer"),
    "distributed": ("engine", "entrypoints"),
    "engine": ("entrypoints",),
}


def _module_name(path: Path) -> str:
    parts = ("pprt",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """pprt modules that `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("pprt") and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _area(module: str) -> str:
    if module.endswith(".__main__"):  # `python -m` entry modules are entry points
        return "entrypoints"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_folders_import_in_the_allowed_direction():
    bad = [f"{m} imports {t}" for m, targets in _graph().items() for t in targets
           if _area(t) in FORBIDDEN.get(_area(m), ())]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_models_and_weights_import_alone():
    mods = sorted(m for m in _modules() if _area(m) in ("models", "weights"))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            "print('\\n'.join(m for m in sys.modules if m.split('.')[:2] in "
            "(['pprt', 'engine'], ['pprt', 'distributed'], ['pprt', 'entrypoints'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing models/ and weights/ pulled in:\n{out.stdout}"


def test_public_api():
    import pprt

    for name in ("LLM", "SamplingParams", "Completion", "Stats", "CheckpointError", "ConfigError", "StageFailed",
                 "RequestTooLarge"):
        assert getattr(pprt, name).__name__ == name
    assert set(pprt.__all__) >= {"LLM", "SamplingParams", "Completion"}
