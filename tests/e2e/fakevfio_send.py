"""`vfiomig send` as a real process with a `FakeVfioDevice` behind its ``vfio:`` source.

The fake answers at the ioctl-function level, inside the process that calls it, so this
wrapper builds one (a cdev, with the `SavingModel` given as JSON), points the ``vfio:``
scheme's factory at it (the CLI resolves the factory when it parses ``--device``), and
runs the real command line: argument parsing, the specs table, `send_migration`, exit
status and stderr are vfiomig's own. ``{device}`` in the arguments is the fake's path.

    python -m tests.e2e.fakevfio_send MODEL_JSON RESULT_PREFIX send --device X=vfio:{device} ...

On exit it writes RESULT_PREFIX.json (the fake's final state, arcs and resets) and
RESULT_PREFIX.saved (every byte its data fds handed out).

The source reads through the fake's ``read`` (the trio sender's path, or the C send path's
push mode), except with a ``fed`` model: its data fd is a real socket a thread feeds, and
the source reads it with ``os.read``, i.e. the C send path reads the fd itself.
"""

from __future__ import annotations

import json
import os
import sys

from vfiomig.cli._main import main
from vfiomig.testing import FakeVfioDevice
from vfiomig.testing._fake_saving import SavingModel
from vfiomig.vfio import _source
from vfiomig.vfio._device import parse_spec
from vfiomig.vfio._uapi import VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY


def run(model_json: str, prefix: str, argv: list[str]) -> int:
    options = json.loads(model_json)
    flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P
    if options.pop("pre_copy", not options.get("fed", False)):
        flags |= VFIO_MIGRATION_PRE_COPY
    if "read_errno_at" in options:
        options["read_errno_at"] = tuple(options["read_errno_at"])
    with FakeVfioDevice(flags=flags, cdev=True, saving=SavingModel(**options)) as fake:
        assert fake.iommu_path is not None
        iommu = fake.iommu_path

        def open_fake(arg: str) -> _source.VfioSource:
            path, fd, _ = parse_spec("source", arg)
            assert path == fake.path and fd is None, arg
            read = os.read if fake.saving.fed else fake.read
            return _source.VfioSource.open(path, ioctl=fake.ioctl, read=read, iommu_path=iommu)

        _source.open_vfio_source = open_fake
        code = main([a.replace("{device}", fake.path) for a in argv])
        session = fake.saving_session
        with open(prefix + ".saved", "wb") as f:
            f.write(b"" if session is None else bytes(session.saved))
        with open(prefix + ".json", "w") as out:
            arcs = [[a.name, b.name] for a, b in fake.arcs]
            json.dump({"state": fake.state.name, "arcs": arcs, "resets": fake.resets}, out)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3:]))
