"""Helpers that users and vfiomig's own tests share.

Synthetic states and their digests, packet streams in chosen arrival orders, an in-memory
sink and config target (`_helpers`), and `FakeVfioDevice`, a kernel VFIO device behind the
injectable ioctl layer of `vfiomig.vfio` with the kernel's FSM tables and errnos
(`_fake_vfio`, `_fake_fsm`), whose saving side follows a `SavingModel` (`_fake_saving`),
and `FakeVfioGroup`, the group and container such a device is opened through on kernels
without iommufd (`_fake_group`).
Nothing in the receive or send path imports this package.
May import: every stage below it (`_core` .. `send`).
"""

from vfiomig._public import claim
from vfiomig.testing._fake_group import FakeVfioGroup
from vfiomig.testing._fake_saving import SavingModel
from vfiomig.testing._fake_vfio import FakeVfioDevice
from vfiomig.testing._helpers import (
    MemoryConfig,
    MemorySink,
    channel_streams,
    device_packets,
    slices,
    synth_bytes,
    synth_config,
    synth_sha256,
)

__all__ = [
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
]

claim(__name__, globals(), __all__)
