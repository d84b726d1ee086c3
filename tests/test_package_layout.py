"""The package's shape: no import circle among evit's modules, and the modules that the workflow, the launcher and the
command line load are torch-free."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

EVIT = Path(__file__).resolve().parents[1] / "evit"
TORCH_FREE = ["evit.cli", "evit.errors", "evit.methods", "evit.workflow", "evit.launch", "evit.layout",
              "evit.config.schema", "evit.config.io", "evit.config.launcher", "evit.config.masking",
              "evit.config.reference", "evit.data.catalog", "evit.data.packed", "evit.boxes", "evit.profiles",
              "evit.reruns", "evit.workflow_schema", "evit.workflow_build"]


def module_name(path: Path) -> str:
    parts = path.relative_to(EVIT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The evit modules a module imports when it is imported (its top level; not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def test_no_import_circle():
    paths = {module_name(p): p for p in EVIT.rglob("*.py")}
    graph = {name: top_level_imports(path, set(paths)) - {name} for name, path in paths.items()}
    done, on_path = set(), []

    def visit(name):
        if name in on_path:
            raise AssertionError("import circle: " + " -> ".join([*on_path[on_path.index(name):], name]))
        if name in done:
            return
        on_path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert len(done) == len(paths) > 30


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_light_modules_import_no_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
