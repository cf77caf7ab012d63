"""The code's shape: no import cycle in asd_ray/, and no caller that asks what a detector is.

Both read the source with ``ast`` (nothing is imported but the registry, for the detector names and classes).
Each check is also run on a snippet of the kind it must catch, so a check that silently matches nothing fails.
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

from asd_ray.bank.base import Detector
from asd_ray.detectors.registry import ENTRIES, KINDS, REGISTRY

PACKAGE = Path(__file__).resolve().parents[1] / "asd_ray"
REGISTRY_MODULE = "asd_ray.detectors.registry"  # the one module that may know detectors by name


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = ("asd_ray", *p.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, (ast.Name, ast.Attribute)) and \
        ast.unparse(test).endswith("TYPE_CHECKING")


def runtime_imports(tree: ast.AST):
    """Every import statement that can run (top level or inside functions), not those under ``if TYPE_CHECKING``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the asd_ray modules importing it runs: the imported module, and each package above it whose
    ``__init__`` runs first (not the importer's own packages, which are running already)."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in found:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    t = ".".join(parts[:i])
                    if t in mods and t != name and not (name + ".").startswith(t + "."):
                        targets.add(t)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as a path."""
    index, low, on, stack, groups = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_import_graph_check_sees_a_cycle_through_a_late_import(tmp_path):
    pkg = tmp_path / "asd_ray"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from asd_ray.data.b import helper\n")
    (pkg / "data" / "b.py").write_text("def f():\n    from asd_ray.data import a\n")
    (pkg / "data" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from asd_ray.data import a\n")
    assert cycles(import_graph(module_names(pkg))) == [["asd_ray.data.a", "asd_ray.data.b"]]


def test_no_import_cycle_in_the_package():
    """Late imports count too (a function-level import that closes a loop is a cycle that only waits)."""
    assert cycles(import_graph(module_names())) == []


# --- callers never ask what a detector is ------------------------------------------------------------------
DETECTOR_CLASSES = {path.split(":")[1] for path in KINDS.values()} | {"Detector", "ClipBank"}
DETECTOR_NAMES = set(ENTRIES) | set(KINDS)  # config names and saved kinds
# attributes of the contract, and the wrappers' insides that callers used to reach for
DETECTOR_ATTRS = {a for a in dir(Detector) if not a.startswith("_")} | {"members", "inner", "k", "metric", "banks"}
DETECTOR_VARIABLE = re.compile(r"(^|[._\[(])(det|detector|detectors|bank|banks|member|members|inner)($|[._\[)])")


def detector_questions(source: str, filename: str = "<snippet>") -> list[str]:
    """Lines of ``source`` that ask what a detector is: ``isinstance`` against a detector class, ``hasattr`` /
    ``getattr`` of a contract attribute or on a detector variable, and comparisons (``==``, ``in``,
    ``startswith``) with a detector name or saved kind."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2:
            fn, (obj, what) = node.func.id, node.args[:2]
            if fn == "isinstance":
                classes = what.elts if isinstance(what, ast.Tuple) else [what]
                if any(ast.unparse(c).split(".")[-1] in DETECTOR_CLASSES for c in classes):
                    found.append(f"{where}: {ast.unparse(node)}")
            elif fn in ("hasattr", "getattr"):
                attr = what.value if isinstance(what, ast.Constant) else None
                if attr in DETECTOR_ATTRS or DETECTOR_VARIABLE.search(ast.unparse(obj)):
                    found.append(f"{where}: {ast.unparse(node)}")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            consts = [c for s in sides for c in ([s] if isinstance(s, ast.Constant) else
                                                  s.elts if isinstance(s, (ast.Tuple, ast.List, ast.Set)) else [])]
            if any(isinstance(c, ast.Constant) and c.value in DETECTOR_NAMES for c in consts):
                found.append(f"{where}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith", "removeprefix") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and any(n.startswith(node.args[0].value) for n in ENTRIES if len(node.args[0].value) > 1)):
            found.append(f"{where}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("line", [
    'detector.fit(x, **({"noise": n} if getattr(detector, "uses_noise", False) else {}))',
    'losses = list(getattr(det, "losses", []))',
    'ok = isinstance(self.bank, (MemoryBank, DomainAwareBank))',
    'ok = hasattr(bank, "members") and bank.features == "clip"',
    'k = getattr(self.bank, "k", None)',
    'gpu = config.detector.startswith("ae-") or config.detector == "fusion"',
    'names = config.fusion.members if config.detector == "fusion" else (config.detector,)',
    'context = config.local.context if n == "local" else 1',
    'if kind in ("MemoryBank", "DomainAwareBank"): pass',
])
def test_the_detector_check_catches_each_kind_of_question(line):
    assert detector_questions(line)


@pytest.mark.parametrize("line", [
    'x = getattr(args, "local", False)',
    'ok = isinstance(bank.index, faiss.IndexFlat)',  # a FAISS index, not a detector
    'y = getattr(np.asarray(z), how)(axis=0)',
    'if r.kind == "noise": pass',
    'ray.init(address="local")',
])
def test_the_detector_check_leaves_other_code_alone(line):
    assert detector_questions(line) == []


def test_no_caller_asks_what_a_detector_is():
    """Outside the registry nothing asks a detector's class, attributes by name, or name: the base class
    (``bank/base.py``) declares what callers need."""
    found = [q for name, path in sorted(module_names().items()) if name != REGISTRY_MODULE
             for q in detector_questions(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert found == []


def test_every_detector_class_keeps_the_contract():
    from asd_ray.config import RunConfig

    for kind in KINDS:
        cls = REGISTRY.kind(kind)
        assert issubclass(cls, Detector) and cls.kind == kind
        assert not getattr(cls, "__abstractmethods__", None), f"{kind} leaves {cls.__abstractmethods__} abstract"
    config = RunConfig()
    for name in ENTRIES:  # the registry answers from the classes what the built detector says
        detector = REGISTRY.make(config, name)
        assert detector.features == REGISTRY.features(config, name)
        assert type(detector).kind in KINDS
    from asd_ray.detectors.settings import SCORE_SETTINGS

    assert set(SCORE_SETTINGS) == {key for kind in KINDS for key in REGISTRY.kind(kind).score_keys}
    names = typing.get_args(typing.get_type_hints(RunConfig)["detector"])  # also the CLI's --detector choices
    assert set(ENTRIES) == set(names), "the config's detector names are not the registry's"
