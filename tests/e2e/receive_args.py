"""The command line of a `vfiomig receive` process with file sinks, and what it wrote."""

from __future__ import annotations

from pathlib import Path

UUID_TEXT = "5c6e8d2a-9b3f-4c1d-8e7a-6b5c4d3e2f10"
DEV = "0000:00:04.0/vfio"


def receive_args(
    tmp: Path, devices: list[tuple[str, int]], channels: int, *extra: str
) -> list[str]:
    args = ["--channels", str(channels), "--uuid", UUID_TEXT, "--config-out", str(tmp), "--json"]
    for idstr, inst in devices:
        path = tmp / f"{idstr.replace('/', '_')}.{inst}.out"
        args += ["--device", f"{idstr}/{inst}=file:{path}"]
    return args + list(extra)


def out_file(tmp: Path, idstr: str, inst: int) -> bytes:
    return (tmp / f"{idstr.replace('/', '_')}.{inst}.out").read_bytes()
