"""Public paths for the names a package re-exports (trio's ``fixup_module_metadata``).

A class defined in ``vfiomig.sinks._callback`` and exported by ``vfiomig.sinks`` should say
so: ``repr``, pickling, tracebacks, documentation and ``help()`` show ``__module__``, and a
user who copies ``vfiomig.sinks._callback.CallbackSink`` from one has imported a private
path. Each public package calls `claim` once, after its imports; a name is claimed by the
package whose private modules define it (``vfiomig`` claims ``vfiomig._core``), so the
order in which packages are imported never changes the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def claim(package: str, namespace: Mapping[str, object], exported: Iterable[str]) -> None:
    """Set ``__module__`` of the exported classes and functions that ``package``'s own
    private modules define (``package._x``, ``package._x._y``) to ``package``."""
    prefix = f"{package}._"
    for name in exported:
        obj = namespace[name]
        if not (isinstance(obj, type) or callable(obj)):
            continue
        module = getattr(obj, "__module__", None)
        if isinstance(module, str) and module.startswith(prefix):
            try:
                obj.__module__ = package
            except (AttributeError, TypeError):  # a C type: its tp_name says where it lives
                continue
