"""The package layout's import directions (ARCHITECTURE.md): each stage imports only the
stages below it, never upward and never sideways into a peer stage, and no module imports
itself through others (no import circle, inside a stage either).

Every ``import`` in every module counts, also those inside functions (a lazy import is
still a dependency) and those only for the type checker.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vfiomig
from tests.unit.graphs import circles

ROOT = Path(vfiomig.__file__).parent

#: Stages from the bottom up. A module may import its own stage and any lower rank; two
#: stages of one rank are peers and may not import each other.
RANKS: dict[str, int] = {
    "_native": 0,
    "_core": 1,
    "_units": 2,
    "_logs": 2,
    "_version": 2,
    "_public": 2,
    "transport": 3,
    "sinks": 4,
    "sources": 4,
    "vfio": 5,
    "vfio_user": 5,
    "receive": 6,
    "control": 7,
    "send": 8,
    "testing": 9,
    "bench": 10,
    "cli": 11,
    "__init__": 12,
    "__main__": 12,
}


def _stage(module: str) -> str:
    """``vfiomig.receive._loader`` -> ``receive``; ``vfiomig`` -> ``__init__``."""
    parts = module.split(".")
    assert parts[0] == "vfiomig", module
    if len(parts) == 1:
        return "__init__"
    return parts[1].removesuffix(".py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "vfiomig":
        return False
    base = ROOT.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path, module: str | None = None) -> list[str]:
    """The vfiomig modules and packages ``path`` imports (``module``: its dotted name, by
    default from where it lies in the package). ``from vfiomig.vfio_user import _fsm``
    imports the module, not its package; the package too when a name is not a module."""
    found: list[str] = []
    for target, names in _import_pairs(path, module):
        subs = [f"{target}.{n}" for n in names if _is_module(f"{target}.{n}")]
        found += subs
        if len(subs) < len(names) or not names:
            found.append(target)
    return found


def _import_pairs(path: Path, module: str | None = None) -> list[tuple[str, list[str]]]:
    """Each import of ``path`` as (the module it names, the names it takes from it)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module or _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "vfiomig":  # ``from vfiomig import _native``: modules
                found += [(f"vfiomig.{a.name}", []) for a in node.names]
            else:
                found.append((target, [a.name for a in node.names]))
    return [(m, names) for m, names in found if m == "vfiomig" or m.startswith("vfiomig.")]


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules it imports. ``from pkg import name`` counts as an import of
    ``pkg.name`` when that is a module (the package's ``__init__`` is not involved), else
    of ``pkg``; the C core is a leaf."""
    known = set(modules) | {"vfiomig._native"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for target, names in _import_pairs(path, name):
            subs = {f"{target}.{n}" for n in names} & known
            edges |= subs
            if len(subs) < len(names) or not names:
                edges.add(target)
        graph[name] = (edges & known) - {name}
    return graph


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_stage_has_a_rank() -> None:
    stages = {_stage(_module_name(p)) for p in _modules()}
    assert stages <= set(RANKS), f"stages without a rank: {stages - set(RANKS)}"


def test_imports_go_downward_only() -> None:
    wrong = []
    for path in _modules():
        mine = _stage(_module_name(path))
        for target in _imports(path):
            theirs = _stage(target)
            if theirs == "__init__" and target != "vfiomig":
                continue
            if theirs == mine:
                continue
            if theirs == "__init__" or RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{_module_name(path)} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_no_module_outgrows_its_concept() -> None:
    """Modules stay a few hundred lines (STYLE.md); 600 is the hard limit."""
    big = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not big, f"modules over 600 lines: {big}"


def test_no_import_circle() -> None:
    modules = {_module_name(p): p for p in _modules()}
    graph = _import_graph(modules)
    assert graph["vfiomig.receive._loader"] >= {"vfiomig.receive._session", "vfiomig._core"}
    assert circles(graph) == []


def test_the_rule_itself_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker sees function-level and relative imports (a test that cannot fail is
    no test). The probe lies outside the package, named as if it were inside."""
    fake = tmp_path / "_probe_layout.py"
    fake.write_text("def f():\n    from ..receive import serve_receiver\n")
    found = _imports(fake, "vfiomig.sinks._probe_layout")
    assert found == ["vfiomig.receive"]
    assert RANKS[_stage(found[0])] > RANKS["sinks"]


def _vfio_user_room(module: str) -> str:
    """``vfiomig.vfio_user.server._dma`` -> ``server``; the codec's modules -> ``codec``."""
    parts = module.split(".")
    if len(parts) > 2 and parts[2] in ("server", "client"):
        return parts[2]
    return "codec" if len(parts) > 2 else "__init__"


def test_vfio_user_rooms_keep_to_their_role() -> None:
    """Inside vfio_user: the codec imports neither room; the server library and the client
    never import each other (only the package's ``__init__`` re-exports both)."""
    allowed = {"codec": {"codec"}, "server": {"codec", "server"}, "client": {"codec", "client"}}
    wrong = []
    for path in _modules():
        name = _module_name(path)
        if _stage(name) != "vfio_user":
            continue
        mine = _vfio_user_room(name)
        if mine == "__init__":
            continue
        for target in _imports(path):
            if target == "vfiomig.vfio_user":
                wrong.append(f"{name} ({mine}) imports the vfio_user package (both rooms)")
                continue
            if _stage(target) != "vfio_user":
                continue
            if _vfio_user_room(target) not in allowed[mine]:
                wrong.append(f"{name} ({mine}) imports {target} ({_vfio_user_room(target)})")
    assert not wrong, "vfio_user rooms crossed:\n" + "\n".join(wrong)


def test_the_circle_check_sees_a_circle_through_lazy_and_relative_imports(
    tmp_path: Path,
) -> None:
    a = tmp_path / "_a.py"
    b = tmp_path / "_b.py"
    c = tmp_path / "_c.py"
    a.write_text("from vfiomig.sinks import _b\n")
    b.write_text("def f():\n    from . import _c\n")
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._a import X\n")
    names = {f"vfiomig.sinks.{p.stem}": p for p in (a, b, c)}
    graph = _import_graph(names)
    assert circles(graph) == [sorted(names)]
    c.write_text("import vfiomig.sinks\n")  # the package, not a module of the probe
    assert circles(_import_graph(names)) == []


def test_circles_finds_each_group_and_self_loops() -> None:
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"e"}, "f": {"a"}}
    assert sorted(circles(graph)) == [["a", "b"], ["c", "d"], ["e"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def _imports_of_test_modules(path: Path) -> list[str]:
    """The ``tests.*.test_*`` modules ``path`` imports, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        found += [
            n for n in names if n.startswith("tests.") and n.split(".")[-1].startswith("test_")
        ]
    return found


def test_no_test_module_imports_another() -> None:
    """What tests share lives in a helpers module (STYLE.md rule 16): a test module that
    imports another runs the other's import-time setup and ties two files' fixtures."""
    tests = ROOT.parent / "tests"
    bad = {
        str(p.relative_to(tests)): got
        for p in sorted(tests.rglob("*.py"))
        if (got := _imports_of_test_modules(p))
    }
    assert not bad, f"test modules imported by other files: {bad}"


def test_the_test_import_rule_sees_a_planted_import(tmp_path: Path) -> None:
    planted = tmp_path / "test_x.py"
    planted.write_text("def f():\n    from tests.integration.test_sinks import migrate\n")
    assert _imports_of_test_modules(planted) == ["tests.integration.test_sinks"]
