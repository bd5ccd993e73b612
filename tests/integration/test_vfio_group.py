"""``vfio:/dev/vfio/GROUP,device=NAME``: the sink and source opened through the
group/container API, against the fake group (`FakeVfioGroup`) around the fake device.

The same form runs against Linux's mtty driver in tests/vm/test_mtty.py; here, the
calls' order and every refusal the kernel gives. No fd is left open (autouse fixture).
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator

import pytest
import trio

from vfiomig._core._errors import SinkError, SourceError, UsageError
from vfiomig.cli._specs import open_sink, open_source
from vfiomig.testing import FakeVfioDevice, FakeVfioGroup, SavingModel
from vfiomig.vfio import VfioSink, VfioSource
from vfiomig.vfio import _uapi as uapi
from vfiomig.vfio._uapi import MigState as S

TIMEOUT = 10
NAME = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = set(os.listdir("/proc/self/fd"))
    yield
    assert set(os.listdir("/proc/self/fd")) == before


@pytest.fixture
def group() -> Iterator[FakeVfioGroup]:
    stream = random.Random(3).randbytes(96)
    flags = uapi.VFIO_MIGRATION_STOP_COPY | uapi.VFIO_MIGRATION_P2P
    saving = SavingModel(initial=24, stop_copy=72)
    dev = FakeVfioDevice(expected=stream, flags=flags, saving=saving)
    with dev, FakeVfioGroup(dev, name=NAME) as grp:
        yield grp


def sink_of(grp: FakeVfioGroup, name: str = NAME) -> VfioSink:
    return VfioSink.open(
        grp.path,
        device=name,
        ioctl=grp.ioctl,
        write=grp.device.write,
        container_path=grp.container_path,
    )


async def test_sink_loads_a_device_opened_through_its_group(group: FakeVfioGroup) -> None:
    dev = group.device
    assert dev.expected is not None
    sink = sink_of(group)
    assert sink.description == f"vfio:{group.path},device={NAME}"
    with trio.fail_after(TIMEOUT):
        await sink.start()
        await sink.write([dev.expected])
        await sink.finish()
        await sink.aclose()
    assert dev.loaded == dev.expected
    assert dev.arcs[-1] == (S.RESUMING, S.STOP)
    # The kernel's order: the group joins the container, which then gets its IOMMU model
    # (type1v2 preferred), and only then hands out the device.
    assert [r for r, _ in group.calls] == [
        uapi.VFIO_GET_API_VERSION,
        uapi.VFIO_GROUP_GET_STATUS,
        uapi.VFIO_GROUP_SET_CONTAINER,
        uapi.VFIO_CHECK_EXTENSION,
        uapi.VFIO_SET_IOMMU,
        uapi.VFIO_GROUP_GET_DEVICE_FD,
    ]
    assert group.iommu_type == uapi.VFIO_TYPE1v2_IOMMU
    assert len(group.device_fds) == 1


async def test_source_reads_a_device_opened_through_its_group(group: FakeVfioGroup) -> None:
    dev = group.device
    source = VfioSource.open(
        group.path,
        device=NAME,
        ioctl=group.ioctl,
        read=dev.read,
        container_path=group.container_path,
    )
    with trio.fail_after(TIMEOUT):
        await source.start()
        data = b""
        while chunk := await source.read(1000):
            data += chunk
        await source.finish()
        await source.aclose()
    assert len(data) == 96 and dev.saving_session is not None
    assert data == bytes(dev.saving_session.saved)
    assert dev.state is S.STOP


async def test_type1_when_the_container_has_no_type1v2() -> None:
    with FakeVfioDevice() as dev, FakeVfioGroup(dev, iommu_types=[uapi.VFIO_TYPE1_IOMMU]) as grp:
        sink = sink_of(grp, grp.name)
        with trio.fail_after(TIMEOUT):
            await sink.start()
            await sink.aclose()
        assert grp.iommu_type == uapi.VFIO_TYPE1_IOMMU
        assert dev.resets == 1  # the session was open: the sink resets on close


@pytest.mark.parametrize(
    ("case", "text", "code"),
    [
        ("name", "getting the device fd from the group failed: [Errno 19]", errno.ENODEV),
        ("viable", "group not viable: every device in it must be bound", None),
        ("iommu", "the container offers no type1 IOMMU (modprobe vfio_iommu_type1)", None),
        ("missing", "cannot open the group: [Errno 2]", errno.ENOENT),
        ("container", "cannot open the VFIO container", errno.ENOENT),
    ],
)
async def test_refusals_name_the_device_and_the_cause(
    case: str, text: str, code: int | None
) -> None:
    with FakeVfioDevice() as dev:
        grp = FakeVfioGroup(
            dev,
            viable=case != "viable",
            iommu_types=() if case == "iommu" else (uapi.VFIO_TYPE1v2_IOMMU,),
        )
        with grp:
            path = grp.path + "-gone" if case == "missing" else grp.path
            sink = VfioSink.open(
                path,
                device="nope" if case == "name" else grp.name,
                ioctl=grp.ioctl,
                write=dev.write,
                container_path=grp.container_path + ("-gone" if case == "container" else ""),
            )
            with trio.fail_after(TIMEOUT), pytest.raises(SinkError) as info:
                await sink.start()
            await sink.aclose()
        assert str(info.value).startswith(f"vfio device {path},device=")
        assert text in str(info.value)
        assert info.value.errno == code
        if case == "name":
            assert "(the group holds no device 'nope')" in str(info.value)
        assert dev.arcs == [] and dev.resets == 0  # never touched


async def test_source_refusal_on_a_group_leaves_the_device_alone() -> None:
    with FakeVfioDevice() as dev, FakeVfioGroup(dev) as grp:
        source = VfioSource.open(
            grp.path, device="other", ioctl=grp.ioctl, read=dev.read,
            container_path=grp.container_path,
        )  # fmt: skip
        with trio.fail_after(TIMEOUT), pytest.raises(SourceError, match="holds no device 'other'"):
            await source.start()
        await source.aclose()
        assert dev.arcs == [] and dev.state is S.RUNNING


def test_the_spec_form() -> None:
    sink = open_sink("vfio:/dev/vfio/7,device=0000:00:04.0")
    assert sink.description == "vfio:/dev/vfio/7,device=0000:00:04.0"
    source = open_source(f"vfio:/dev/vfio/noiommu-0,device={NAME}")
    assert source.description == f"vfio:/dev/vfio/noiommu-0,device={NAME}"
    for bad in ("/dev/vfio/7,device=", "/dev/vfio/7,dev=x", ",device=x", "/dev/vfio/7,"):
        with pytest.raises(UsageError, match="expected vfio:/dev/vfio/GROUP,device=NAME"):
            open_sink(f"vfio:{bad}")


async def test_a_group_path_without_device_says_how() -> None:
    """The cdev form given a group: the bind is refused (ENOTTY), and the error names the
    group form."""
    with FakeVfioDevice() as dev, FakeVfioGroup(dev) as grp:
        iommu = grp.container_path  # any file stands in for /dev/iommu here
        sink = VfioSink.open(grp.path, ioctl=grp.ioctl, write=dev.write, iommu_path=iommu)
        with trio.fail_after(TIMEOUT), pytest.raises(SinkError) as info:
            await sink.start()
        await sink.aclose()
    assert "takes vfio:/dev/vfio/N,device=NAME" in str(info.value)


async def test_a_noiommu_group_gets_the_noiommu_model() -> None:
    """/dev/vfio/noiommu-N (vfio's unsafe no-IOMMU mode): type1 is not offered there."""
    with FakeVfioDevice() as dev, FakeVfioGroup(dev, noiommu=True) as grp:
        assert os.path.basename(grp.path).startswith("noiommu-")
        sink = sink_of(grp, grp.name)
        with trio.fail_after(TIMEOUT):
            await sink.start()
            await sink.aclose()
        assert grp.iommu_type == uapi.VFIO_NOIOMMU_IOMMU
        assert uapi.VFIO_CHECK_EXTENSION not in [r for r, _ in grp.calls]
