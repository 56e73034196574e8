"""The import graph of vljax: no cycle, nothing above `models/` or `losses` imported from them, and no
module that only builds or evaluates a model imports the trainer.

The graph is read with `ast` from the source (nothing is imported): module-level and function-level
imports, absolute and relative, `from vljax import x` pointing at the module `x` when `x` is one.
An import names the most specific module it reaches (`from vljax.models import TwoTowers` depends on
`vljax/models/__init__.py`; a package `__init__` that re-exports its submodules is no cycle).
"""
import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = "vljax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# Lower floors: a module here may import only its own floor and leaf helpers (vljax modules that
# import no vljax module themselves, in packages whose `__init__` imports none either: importing
# `vljax.convert.posemb` runs `vljax/convert/__init__.py` first).
FLOORS = ("vljax.models", "vljax.losses")
LEAF_ALLOWED_FLOORS = ("vljax.models",)   # losses may import only losses/
# Modules that build, restore or evaluate a model: none of them may reach the trainer.
NO_TRAINER = ("vljax.inference", "vljax.evaluate", "vljax.soup", "vljax.wise_ft", "vljax.factory",
              "vljax.embedder", "vljax.features", "vljax.layer_selection")
TRAINER = "vljax.train"


def module_files(root: pathlib.Path, package: str) -> dict[str, tuple[pathlib.Path, bool]]:
    """{dotted module name: (file, is_package)} for every .py under `root` (the package folder)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


def _known_prefix(name: str, modules) -> str | None:
    """The longest dotted prefix of `name` that is a module of the package (None: outside it)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(source: str, module: str, is_package: bool, modules) -> set[str]:
    """The package's modules that `source` (the text of `module`) imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known_prefix(alias.name, modules)
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target not in modules:   # a name defined in `base`, not a submodule
                    target = _known_prefix(base, modules)
                if target is not None:
                    found.add(target)
    found.discard(module)
    return found


def import_graph(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """{module: modules of the package it imports}."""
    modules = module_files(root, package)
    return {name: imports_of(path.read_text(encoding="utf-8"), name, is_package, modules)
            for name, (path, is_package) in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected component with a loop (Tarjan's algorithm)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(min(c), c, graph) for c in components]


def _cycle_through(start: str, component: set[str], graph) -> list[str]:
    """A shortest path start -> ... -> start inside `component` (breadth first)."""
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in component and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def _in(module: str, floor: str) -> bool:
    return module == floor or module.startswith(floor + ".")


def is_leaf(graph: dict[str, set[str]], module: str) -> bool:
    """`module` and the packages that hold it (below the root package) import no module of the
    package: importing it runs nothing of the package but the root `__init__`."""
    parts = module.split(".")
    return all(not graph.get(".".join(parts[:n])) for n in range(2, len(parts) + 1))


def floor_violations(graph: dict[str, set[str]], floors=FLOORS,
                     leaf_allowed=LEAF_ALLOWED_FLOORS) -> list[str]:
    """Edges out of a lower floor to anything but that floor (or, where allowed, a leaf helper)."""
    bad = []
    for module, targets in sorted(graph.items()):
        for floor in floors:
            if not _in(module, floor):
                continue
            for target in sorted(targets):
                if _in(target, floor):
                    continue
                if floor in leaf_allowed and is_leaf(graph, target):
                    continue
                bad.append(f"{module} -> {target}")
    return bad


def reach_path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A shortest import chain start -> ... -> goal, or None."""
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in parent:
                    parent[w] = v
                    if w == goal:
                        path = [w]
                        while parent[path[-1]] is not None:
                            path.append(parent[path[-1]])
                        return path[::-1]
                    nxt.append(w)
        frontier = nxt
    return None


# --- the checker itself, on synthetic graphs and packages (so the tests below cannot pass vacuously)

def test_find_cycles_reports_a_cycle_and_passes_a_dag():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_floor_and_trainer_checks_flag_their_edges():
    graph = {"vljax.models.vit": {"vljax.models.common", "vljax.convert.posemb", "vljax.data.x"},
             "vljax.models.common": {"vljax.assets"}, "vljax.assets": set(),
             "vljax.convert": {"vljax.models"}, "vljax.convert.posemb": set(),
             "vljax.data": set(), "vljax.data.x": set(), "vljax.models.posemb": set(),
             "vljax.losses": {"vljax.assets"}, "vljax.soup": {"vljax.eval"},
             "vljax.eval": {"vljax.train"}, "vljax.train": set()}
    assert floor_violations(graph) == ["vljax.losses -> vljax.assets",
                                       "vljax.models.vit -> vljax.convert.posemb"]
    assert reach_path(graph, "vljax.soup", "vljax.train") == ["vljax.soup", "vljax.eval", "vljax.train"]


def test_graph_reads_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.sub import b\n",
        "a.py": "import os\nfrom . import c\nfrom .sub.b import NAME\n\ndef f():\n    import pkg.d\n",
        "c.py": "from pkg import a as _a, VERSION\n",
        "d.py": "",
        "sub/__init__.py": "",
        "sub/b.py": "from .. import d\nfrom ..c import x\nNAME = 1\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg, "pkg")
    assert graph == {"pkg": {"pkg.sub.b"}, "pkg.a": {"pkg.c", "pkg.sub.b", "pkg.d"},
                     "pkg.c": {"pkg.a", "pkg"}, "pkg.d": set(), "pkg.sub": set(),
                     "pkg.sub.b": {"pkg.d", "pkg.c"}}
    assert find_cycles(graph) == [["pkg", "pkg.sub.b", "pkg.c", "pkg"]]


# --- vljax


@pytest.fixture(scope="module")
def graph():
    g = import_graph()
    assert "vljax.models.two_towers" in g and "vljax.train" in g   # the walk found the package
    return g


def test_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_models_and_losses_import_nothing_above_them(graph):
    bad = floor_violations(graph)
    assert not bad, ("models/ may import only models/ and leaf helpers, losses only losses/:\n  "
                     + "\n  ".join(bad))


@pytest.mark.parametrize("module", NO_TRAINER)
def test_model_building_modules_do_not_reach_the_trainer(graph, module):
    assert module in graph
    path = reach_path(graph, module, TRAINER)
    assert path is None, f"{module} imports the trainer: {' -> '.join(path)}"


# What builds the model or resolves the loss sits below the evaluators: a training config's
# objective, the model factory and the loss wiring import none of vljax.evaluators (the label-name
# clean-up they share with the evaluators lives in vljax/text.py). config_check does import them:
# it checks `config.evals` against the evaluators' constructors and data entries.
BELOW_EVALUATORS = ("vljax.objective", "vljax.factory")
EVALUATORS = "vljax.evaluators"


def reach_any(graph: dict[str, set[str]], start: str, prefix: str) -> list[str] | None:
    """A shortest import chain from `start` to any module in the package `prefix`, or None."""
    paths = [reach_path(graph, start, m) for m in graph if _in(m, prefix)]
    paths = [p for p in paths if p is not None]
    return min(paths, key=len) if paths else None


@pytest.mark.parametrize("module", BELOW_EVALUATORS)
def test_objective_and_factory_do_not_import_the_evaluators(graph, module):
    assert module in graph
    path = reach_any(graph, module, EVALUATORS)
    assert path is None, f"{module} imports the evaluators: {' -> '.join(path)}"


def test_reach_any_finds_a_member_of_a_package():
    graph = {"a": {"b", "q"}, "b": {"p.x"}, "q": set(), "p": set(), "p.x": set()}
    assert reach_any(graph, "a", "p") == ["a", "b", "p.x"]
    assert reach_any(graph, "q", "p") is None


CONFIG_FILES = sorted(str(p.relative_to(ROOT.parent)) for p in (ROOT.parent / "configs").glob("*.py"))


def test_config_files_do_not_start_jax():
    """absl reads the config file while it parses the command line, before `vljax.main` sets up
    host memory (vljax/hostmem.py must act before JAX starts): a config file, and what it imports
    (vljax.config_args), must not import jax. One fresh process reads them all in turn and names
    the first after which jax is loaded."""
    code = ("import runpy, sys\n"
            f"for f in {CONFIG_FILES!r}:\n"
            "    runpy.run_path(f)\n"
            "    if 'jax' in sys.modules:\n"
            "        print(f); break\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert len(CONFIG_FILES) >= 5 and out == "", f"{out} imports jax"
