"""The package layout's import directions (ARCHITECTURE.md): each stage imports only the
stages below it, never upward and never sideways into a peer stage.

Every ``import`` in every module counts, also those inside functions (a lazy import is
still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import vfiomig

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


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "vfiomig":  # ``from vfiomig import _native``: modules
                found += [f"vfiomig.{a.name}" for a in node.names]
            elif submodules := [a.name for a in node.names if _is_module(f"{module}.{a.name}")]:
                # ``from vfiomig.vfio_user import _fsm``: the module, not its package
                found += [f"{module}.{name}" for name in submodules]
            else:
                found.append(module)
    return [m for m in found if m == "vfiomig" or m.startswith("vfiomig.")]


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


def test_the_rule_itself_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker sees function-level and relative imports (a test that cannot fail is
    no test)."""
    fake = ROOT / "sinks" / "_probe_layout.py"
    fake.write_text("def f():\n    from ..receive import serve_receiver\n")
    try:
        found = _imports(fake)
    finally:
        fake.unlink()
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
