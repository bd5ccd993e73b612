"""The public surface, pinned (trio's ``test_exports``): a name users import is a promise.

Each public namespace's ``__all__`` is written out here, so adding or dropping a name is a
deliberate change to this file; every exported class and function says its public path in
``__module__`` (`vfiomig._public.claim`) and can be imported from there; and the C core
(``vfiomig._native``) has exactly the surface its stub ``_native.pyi`` declares, with the
same instance surface as the pure-Python twin it accelerates.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import vfiomig
import vfiomig.vfio_user
from vfiomig import _core

PUBLIC: dict[str, set[str]] = {
    "vfiomig": {
        "AbortedError",
        "CallbackConfig",
        "CallbackSink",
        "ConfigDir",
        "ConfigStateError",
        "ConfigTarget",
        "DeviceReport",
        "DeviceSetup",
        "FdSink",
        "HandshakeError",
        "IMPLEMENTATION",
        "MigState",
        "MigrationFailed",
        "NullSink",
        "PacketError",
        "ReceiverConfig",
        "SendDevice",
        "SendError",
        "SendReport",
        "Session",
        "SessionReport",
        "Sink",
        "SinkError",
        "Source",
        "SourceError",
        "StallError",
        "StreamIncompleteError",
        "UsageError",
        "VfioMigError",
        "__version__",
        "send_migration",
        "serve_receiver",
    },
    "vfiomig.bench": {
        "Bound",
        "Case",
        "ConfigModel",
        "DeviceModelSink",
        "Models",
        "Overhead",
        "Run",
        "bench_main",
        "lower_bound",
    },
    "vfiomig.cli": {
        "main",
        "run",
    },
    "vfiomig.control": {
        "AttachSink",
        "ControlClient",
        "ControlServer",
        "control_task",
        "open_control_client",
    },
    "vfiomig.receive": {
        "Device",
        "DeviceReport",
        "DeviceSetup",
        "ExtraTask",
        "MigrationFailed",
        "ReceiverConfig",
        "Session",
        "SessionEvent",
        "SessionReport",
        "serve_receiver",
    },
    "vfiomig.send": {
        "ORDERS",
        "PrecopyOptions",
        "PrecopyReport",
        "SendDevice",
        "SendError",
        "SendReport",
        "SendStatus",
        "send_migration",
    },
    "vfiomig.sinks": {
        "CallbackConfig",
        "CallbackSink",
        "Chunk",
        "ConfigDir",
        "ConfigTarget",
        "FdSink",
        "NullSink",
        "Sink",
        "config_file_name",
    },
    "vfiomig.sources": {
        "FdSource",
        "PrecopyInfo",
        "Source",
        "SynthSource",
    },
    "vfiomig.testing": {
        "FakeVfioDevice",
        "FakeVfioGroup",
        "MemoryConfig",
        "MemorySink",
        "SavingModel",
        "channel_streams",
        "device_packets",
        "slices",
        "synth_bytes",
        "synth_config",
        "synth_sha256",
    },
    "vfiomig.transport": {
        "ACCEPT_CAPACITY_ERRNOS",
        "Address",
        "Admission",
        "AdmissionStatistics",
        "Listener",
        "MeteredStream",
        "Pending",
        "Throttle",
        "UnixListener",
        "check_socket_directory",
        "client_context",
        "close_fds",
        "connect",
        "default_max_pending",
        "inherited_sockets",
        "listener_kind",
        "nonblocking_twin",
        "open_listener",
        "options_to_contexts",
        "parse_address",
        "peer_label",
        "received_fds",
        "reset_on_close",
        "server_context",
        "tune_socket",
        "unix_socket_listening",
    },
    "vfiomig.vfio": {
        "DataFdSink",
        "VfioSink",
        "VfioSource",
        "open_vfio_sink",
        "open_vfio_source",
    },
    "vfiomig.vfio_user": {
        "BarDevice",
        "Capabilities",
        "Command",
        "Dma",
        "DmaRegion",
        "Emulator",
        "FileMemory",
        "IoEventFd",
        "IrqIndex",
        "Irqs",
        "MigState",
        "MigrationCallbacks",
        "PciCap",
        "PciConfig",
        "PciExtCap",
        "ProtocolError",
        "Region",
        "ResetReason",
        "Sg",
        "SharedMemory",
        "VfioUserClient",
        "VfioUserCommandError",
        "VfioUserDevice",
        "VfioUserThread",
        "VfioUserSink",
        "VfioUserSource",
        "WriteBuffer",
        "WriteFailed",
        "msi_cap",
        "msix_cap",
        "open_vfio_user_client",
        "open_vfio_user_sink",
        "open_vfio_user_source",
        "pcie_cap",
        "pm_cap",
        "serve_vfio_user",
        "serve_vfio_user_connection",
        "start_vfio_user_thread",
        "vendor_cap",
    },
    "vfiomig.vfio_user.client": {
        "DeviceRegion",
        "GuestMemory",
        "GuestRegion",
        "Interrupt",
        "MappedRegion",
        "RegionIoFd",
        "VfioUserClient",
        "VfioUserCommandError",
        "VfioUserSink",
        "VfioUserSource",
        "WriteFailed",
        "open_vfio_user_client",
        "open_vfio_user_sink",
        "open_vfio_user_source",
    },
    "vfiomig.vfio_user.server": {
        "BarDevice",
        "Dma",
        "DmaRegion",
        "Emulator",
        "FileMemory",
        "IoEventFd",
        "IrqIndex",
        "Irqs",
        "MigrationCallbacks",
        "PciCap",
        "PciConfig",
        "PciExtCap",
        "Region",
        "ResetReason",
        "Sg",
        "SharedMemory",
        "VfioUserDevice",
        "VfioUserThread",
        "WriteBuffer",
        "msi_cap",
        "msix_cap",
        "pcie_cap",
        "pm_cap",
        "serve_vfio_user",
        "serve_vfio_user_connection",
        "start_vfio_user_thread",
        "vendor_cap",
    },
}


@pytest.mark.parametrize("namespace", sorted(PUBLIC))
def test_all_is_pinned(namespace: str) -> None:
    module = importlib.import_module(namespace)
    assert set(module.__all__) == PUBLIC[namespace]
    assert len(module.__all__) == len(set(module.__all__)), "a name listed twice"
    for name in module.__all__:
        assert hasattr(module, name), f"{namespace}.{name} is in __all__ but not defined"


def test_every_public_package_is_pinned() -> None:
    """A new public package (no leading underscore) gets its line above."""
    root = Path(vfiomig.__file__).parent
    found = {"vfiomig"}
    for init in root.rglob("__init__.py"):
        parts = init.parent.relative_to(root.parent).parts
        if not any(p.startswith("_") for p in parts):
            found.add(".".join(parts))
    assert found == set(PUBLIC)


def _public_objects() -> list[tuple[str, str, object]]:
    out: list[tuple[str, str, object]] = []
    for namespace in sorted(PUBLIC):
        module = importlib.import_module(namespace)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                out.append((namespace, name, obj))
    return out


@pytest.mark.parametrize(("namespace", "name", "obj"), _public_objects())
def test_module_is_the_public_path(namespace: str, name: str, obj: object) -> None:
    module = getattr(obj, "__module__", "")
    assert module.startswith("vfiomig"), f"{namespace}.{name} comes from {module}"
    assert not any(part.startswith("_") for part in module.split(".")[1:]), (
        f"{namespace}.{name}.__module__ is the private {module}"
    )
    assert getattr(importlib.import_module(module), name) is obj


def test_claim_leaves_other_packages_names_alone() -> None:
    """`claim` is order-free: a package re-exporting another's name does not take it."""
    assert vfiomig.Sink.__module__ == "vfiomig.sinks"
    assert vfiomig.serve_receiver.__module__ == "vfiomig.receive"
    assert vfiomig.SinkError.__module__ == "vfiomig"
    assert vfiomig.vfio_user.VfioUserDevice.__module__ == "vfiomig.vfio_user.server"


def _stub_surface() -> dict[str, set[str]]:
    """``_native.pyi``: module-level public names, and each class's public members."""
    stub = Path(vfiomig.__file__).parent / "_native.pyi"
    tree = ast.parse(stub.read_text())
    surface: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            surface[""].add(node.name)
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            surface[node.name] = {m for m in members if not m.startswith("_")}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            surface[""].add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            surface[""].add(node.target.id)
    surface[""] = {n for n in surface[""] if not n.startswith("_")}
    return surface


@pytest.mark.skipif("native" not in _core.IMPLEMENTATIONS, reason="the C core is not built")
def test_native_matches_its_stub() -> None:
    from vfiomig import _native

    stub = _stub_surface()
    runtime = {n for n in dir(_native) if not n.startswith("_")}
    assert runtime == stub[""], "module names: stub vs C core"
    for cls in stub[""]:
        obj = getattr(_native, cls)
        if inspect.isclass(obj):
            members = {n for n in dir(obj) if not n.startswith("_")}
            assert members == stub[cls], f"{cls}: stub vs C core"


@pytest.mark.skipif("native" not in _core.IMPLEMENTATIONS, reason="the C core is not built")
def test_native_and_python_cores_have_one_surface() -> None:
    """What the C core accelerates has the Python twin's surface, instances included."""
    py, c = _core.IMPLEMENTATIONS["python"], _core.IMPLEMENTATIONS["native"]
    assert {n for n in dir(py) if not n.startswith("__")} == {
        n for n in dir(c) if not n.startswith("__")
    }

    def instances(ns: object) -> list[object]:
        budget = ns.Budget(1 << 20)  # type: ignore[attr-defined]
        return [
            budget,
            ns.ReorderBuffer("dev/0", budget),  # type: ignore[attr-defined]
            ns.Framer(uuid=bytes(16), channels=2),  # type: ignore[attr-defined]
        ]

    for a, b in zip(instances(py), instances(c), strict=True):
        surface_a = {n for n in dir(a) if not n.startswith("_")}
        surface_b = {n for n in dir(b) if not n.startswith("_")}
        assert surface_a == surface_b, type(a).__name__


def test_every_exception_class_is_on_the_errors_page() -> None:
    """docs/errors.md lists every exception class the package defines (STYLE.md rule 13)."""
    root = Path(vfiomig.__file__).parent
    page = (root.parent / "docs" / "errors.md").read_text()
    defined = set()
    for path in root.rglob("*.py"):
        if path.name == "__main__.py":  # importing it runs the command
            continue
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for name, obj in vars(importlib.import_module(module)).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__qualname__ == name
                and getattr(obj, "__module__", "").startswith("vfiomig")
            ):
                defined.add(name)
    missing = {name for name in defined if f"`{name}`" not in page}
    assert not missing, f"exception classes missing from docs/errors.md: {sorted(missing)}"
    assert "SinkError" in defined and "CloseConnection" in defined  # the scan sees them
