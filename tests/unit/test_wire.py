from __future__ import annotations

import pytest

from vfiomig._core import ConfigStateError, HandshakeError
from vfiomig._core._wire import (
    DEV_CONFIG_STATE,
    END_OF_STATE,
    check_config_blob,
    decode_handshake,
    encode_device_header,
    encode_handshake,
    encode_packet,
    encode_vfio_header,
    format_uuid,
    parse_uuid,
    wrap_config,
)

UUID = bytes(range(16))


def test_handshake_layout_is_qemus_multifdinit() -> None:
    raw = encode_handshake(UUID, 3)
    assert len(raw) == 64
    assert raw[:4] == b"\x11\x22\x33\x44"
    assert raw[4:8] == b"\x00\x00\x00\x01"
    assert raw[8:24] == UUID
    assert raw[24] == 3
    assert raw[25:] == bytes(39)
    assert decode_handshake(raw, uuid=UUID, channels=4) == 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x11\x22\x33\x45" + encode_handshake(UUID, 0)[4:], "magic 0x11223345"),
        (encode_handshake(UUID, 0)[:4] + b"\0\0\0\2" + encode_handshake(UUID, 0)[8:], "version 2"),
        (encode_handshake(bytes(16), 0), "channel 0 has uuid 00000000-0000"),
        (encode_handshake(UUID, 4), "channel id 4 is not below the channel count 4"),
    ],
)
def test_handshake_refusals(raw: bytes, message: str) -> None:
    with pytest.raises(HandshakeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_handshake(raw, uuid=UUID, channels=4)


def test_device_header_layout() -> None:
    raw = encode_device_header("0000:00:04.0/vfio", 7, 1234)
    assert len(raw) == 276
    assert raw[8:12] == b"\x00\x00\x00\x40"
    assert raw[12:29] == b"0000:00:04.0/vfio"
    assert raw[29:268] == bytes(239)
    assert raw[268:272] == (7).to_bytes(4, "big")
    assert raw[272:276] == (1234).to_bytes(4, "big")


def test_vfio_header_big_endian_and_host() -> None:
    assert encode_vfio_header(5, 1) == b"\0\0\0\0\0\0\0\5\0\0\0\1"
    assert encode_vfio_header(5, 1, endian="host") == (0).to_bytes(4, "little") + (5).to_bytes(
        4, "little"
    ) + (1).to_bytes(4, "little")


def test_packet_is_header_vfio_header_data() -> None:
    raw = encode_packet("dev", 0, 2, 0, b"abc")
    assert len(raw) == 276 + 12 + 3
    assert raw[272:276] == (15).to_bytes(4, "big")
    assert raw[-3:] == b"abc"


def test_config_blob_markers() -> None:
    blob = wrap_config(b"body")
    assert blob[:8] == DEV_CONFIG_STATE.to_bytes(8, "big")
    assert blob[-8:] == END_OF_STATE.to_bytes(8, "big")
    check_config_blob("d/0", 3, blob)
    check_config_blob("d/0", 3, wrap_config(b""))
    with pytest.raises(ConfigStateError, match=r"d/0: config packet idx 3 is too short at 15"):
        check_config_blob("d/0", 3, blob[:15])
    with pytest.raises(ConfigStateError, match="starts with 0x0"):
        check_config_blob("d/0", 3, bytes(8) + blob[8:])
    with pytest.raises(ConfigStateError, match="ends with 0x0"):
        check_config_blob("d/0", 3, blob[:-8] + bytes(8))


def test_uuid_text_round_trip() -> None:
    text = format_uuid(UUID)
    assert text == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert parse_uuid(text) == UUID
    with pytest.raises(ValueError, match="32 hex digits"):
        parse_uuid("1234")
