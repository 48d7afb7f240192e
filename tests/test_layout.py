"""The layout of the source: each stage imports only from its own stage or below, no module
imports another in a cycle, the library never loads test code, modules stay readable in length,
and the tests use only public names."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"tamp_fx": "tamp_fx", "passes": "tamp_fx.passes", "cli": "tamp_fx.cli", "testbeds": "tamp_fx.testbeds"}
STAGES = [  # lowest first; a module's stage is that of its longest prefix here
    ["tamp_fx", "tamp_fx.errors", "tamp_fx.modality", "tamp_fx.registry"],
    ["tamp_fx.runtime"], ["tamp_fx.load"], ["tamp_fx.calibrate"], ["tamp_fx.capture"], ["tamp_fx.statistics"],
    ["tamp_fx.prune"], ["tamp_fx.allocate"], ["tamp_fx.config"], ["tamp_fx.artifact"], ["tamp_fx.passes"],
    ["tamp_fx.pipeline"], ["tamp_fx.write"], ["tamp_fx.evaluate"], ["tamp_fx.api"],
    ["tamp_fx.testbeds"], ["tamp_fx.cli"],
]
LIBRARY = STAGES.index(["tamp_fx.api"])  # stages 0..LIBRARY are the library
MAX_LINES = 400


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:-1]] + ([] if path.stem == "__init__" else [path.stem])
    return ".".join(parts)


MODULES = {module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}
FACADE = ast.literal_eval(next(n.value for n in ast.parse(MODULES["tamp_fx"].read_text()).body
                               if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "_EXPORTS"))


def stage(module: str) -> int:
    return max((len(p), i) for i, prefixes in enumerate(STAGES) for p in prefixes
               if module == p or module.startswith(p + "."))[1]


def imports(nodes, top: bool = True):
    """(line, imported tamp_fx module, whether at import time) of every import in ``nodes`` and
    below, outside ``if TYPE_CHECKING:``; ``from M import x`` goes to M.x where that is a module."""
    for node in nodes:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from imports(node.orelse, top)
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name, top) for a in node.names if a.name.split(".")[0] == "tamp_fx")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tamp_fx":
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    yield node.lineno, f"{node.module}.{a.name}", top
                else:   # a name; through the facade, the module that defines it
                    yield node.lineno, FACADE.get(a.name, node.module) if node.module == "tamp_fx" else node.module, top
        in_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        yield from imports(ast.iter_child_nodes(node), top and not in_function)


EDGES = list(dict.fromkeys((name, line, target, top) for name, path in MODULES.items()  # one per module imported
                           for line, target, top in imports(ast.parse(path.read_text(), str(path)).body)))


def where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(ROOT)}:{line}"


def test_every_import_goes_to_the_same_stage_or_below():
    upward = [f"{where(name, line)} imports {target} (stage {stage(target)}) from stage {stage(name)}"
              for name, line, target, _ in EDGES if name != "tamp_fx" and stage(target) > stage(name)]
    assert not upward, "imports upward through the stages:\n" + "\n".join(upward)


def test_the_library_never_imports_testbeds_or_the_cli():
    found = [f"{where(name, line)} imports {target}" for name, line, target, _ in EDGES
             if stage(name) <= LIBRARY and stage(target) > LIBRARY]
    assert not found, "the library imports test or CLI code:\n" + "\n".join(found)


def test_no_import_cycles():
    graph = nx.DiGraph()
    for name, line, target, top in EDGES:
        if top and target != name:
            graph.add_edge(name, target, at=where(name, line))
    cycles = [" -> ".join(f"{a} ({graph.edges[a, b]['at']})" for a, b in zip(c, c[1:] + c[:1]))
              for c in nx.simple_cycles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("statement", ["import tamp_fx", "import tamp_fx.api, tamp_fx.passes"])
def test_importing_the_library_loads_no_test_code(statement):
    code = f"{statement}; import sys; print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    found = [m for m in loaded.split() if m.split(".")[0] in ("pytest", "_pytest", "hypothesis")
             or m.startswith("tamp_fx.testbeds")]
    assert not found, f"`{statement}` imports test code: {found}"


def test_library_modules_are_under_400_lines():
    lengths = sorted(((len(p.read_text().splitlines()), p.relative_to(ROOT)) for p in MODULES.values()
                      if p.relative_to(ROOT).parts[0] != "testbeds"), reverse=True)
    too_long = [f"{path}: {n} lines" for n, path in lengths if n >= MAX_LINES]
    assert not too_long, f"modules of {MAX_LINES} lines or more:\n" + "\n".join(too_long)


def test_tests_import_no_private_names():
    found = [f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name} from {node.module}"
             for path in sorted((ROOT / "tests").rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tamp_fx")
             for a in node.names if a.name.startswith("_")]
    assert not found, "tests import private names:\n" + "\n".join(found)
