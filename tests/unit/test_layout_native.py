"""native/'s layout (native/README.md): small files, plain C apart from the CPython glue.

No C file or header over 650 lines; the plain-C core (vfiomig_core, vfiomig_reorder)
includes no Python header; Python headers only in glue.h, glue_*.c and module.c; every
name visible outside its file carries a project prefix (vfiomig_ glue, vfm_ core); no
circle between files, of includes or of calls (a file uses a name another one defines
without static: glue_reorder.c calls glue_budget.c's join, so glue_budget.c calls nothing
of glue_reorder.c, directly or through others).
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.unit.graphs import circles

NATIVE = Path(__file__).resolve().parents[2] / "native"
MAX_LINES = 650
PLAIN_C = (
    "vfiomig_core.c",
    "vfiomig_core.h",
    "vfiomig_reorder.c",
    "vfiomig_reorder.h",
    "vfiomig_sendjob.c",
    "vfiomig_sendjob.h",
    "vfiomig_senddirect.c",
    "vfiomig_sendsrc.c",
    "vfiomig_sendthreads.c",
    "vfiomig_sendpush.c",
    "vfiomig_sendvu.c",
    "vfiomig_sendzc.c",
    "vfiomig_wait.c",
    "vfiomig_wait.h",
)
PYTHON_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](Python\.h|structmember\.h|glue\.h)[>"]', re.M)
# A file-scope line that is neither static nor a type, directive, label or block end.
_SKIP = re.compile(r"(static\b|typedef\b|#|/\*|\*|}|\w+:$|(enum|struct|union)\s*\w*\s*\{)")
_NAME = re.compile(r"(\w+)\s*(\(|\[|=|;)")
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def _sources() -> list[Path]:
    return sorted(p for p in NATIVE.iterdir() if p.suffix in (".c", ".h"))


def _global_names(text: str) -> list[str]:
    """The names a file defines or declares at file scope without static."""
    names = []
    for line in text.splitlines():
        if not line or line[0].isspace() or _SKIP.match(line):
            continue
        m = _NAME.search(line)
        if m:
            names.append(m.group(1))
    return names


def test_no_native_file_is_over_the_line_limit() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in _sources()}
    assert {"glue.h", "module.c", *PLAIN_C} <= set(sizes)
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_python_headers_only_in_the_glue() -> None:
    with_python = {p.name for p in _sources() if PYTHON_INCLUDE.search(p.read_text())}
    assert not with_python & set(PLAIN_C)
    assert all(n == "module.c" or n.startswith("glue") for n in with_python), with_python


def test_every_name_outside_static_has_a_project_prefix() -> None:
    bad = {
        p.name: [n for n in names if not n.startswith(("vfiomig_", "vfm_", "PyInit_"))]
        for p in _sources()
        if (names := _global_names(p.read_text()))
    }
    assert {f: n for f, n in bad.items() if n} == {}
    # The check sees what it must: the types, a glue helper, a core function.
    seen = {n for p in _sources() for n in _global_names(p.read_text())}
    assert {"vfiomig_FramerType", "vfiomig_reorder_offer", "vfm_init", "PyInit__native"} <= seen


def test_global_names_finds_non_static_definitions() -> None:
    src = "static int a(void)\n{\n}\nint leak(void)\n{\n}\nPyObject *also = NULL;\nout:\n"
    assert _global_names(src) == ["leak", "also"]


def _unit_graph(texts: dict[str, str]) -> dict[str, set[str]]:
    """File -> the files it includes and, for a .c file, the other .c files whose
    non-static names it uses (a header only declares them)."""
    defined: dict[str, str] = {}
    for name, text in texts.items():
        if name.endswith(".c"):
            for n in _global_names(text):
                defined.setdefault(n, name)
    graph: dict[str, set[str]] = {}
    for name, text in texts.items():
        code = _COMMENT.sub(" ", text)
        words = set(re.findall(r"\w+", code)) if name.endswith(".c") else set()
        uses = {defined[w] for w in words if w in defined}
        includes = set(_LOCAL_INCLUDE.findall(code)) & set(texts)
        graph[name] = (uses | includes) - {name}
    return graph


def test_no_circle_between_files() -> None:
    graph = _unit_graph({p.name: p.read_text() for p in _sources()})
    # It sees the calls it must: the reorder buffer joins its budget, the pump offers.
    assert {"glue_budget.c", "glue_compact.c"} <= graph["glue_reorder.c"]
    assert "glue_reorder.c" in graph["glue_framer_pump.c"]
    assert circles(graph) == []


def test_the_circle_check_sees_calls_and_includes() -> None:
    texts = {
        "a.c": '#include "a.h"\nint vfiomig_a(void)\n{\n    return vfiomig_b();\n}\n',
        "b.c": '#include "a.h"\nint vfiomig_b(void)\n{\n    return vfiomig_a(); /* vfiomig_c */\n}\n',
        "c.c": "int vfiomig_c(void)\n{\n    return 0;\n}\n",
        "a.h": '#include "b.h"\n',
        "b.h": '#include "a.h"\n',
    }
    graph = _unit_graph(texts)
    assert graph["b.c"] == {"a.c", "a.h"}  # the comment's name is no call
    assert sorted(circles(graph)) == [["a.c", "b.c"], ["a.h", "b.h"]]
