"""The guest control channel's line grammar (no I/O)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novacron.guest.protocol import MAX_LINE_BYTES, ProtocolViolation, encode_request, parse_reply


def test_encode_request() -> None:
    assert encode_request("r1", "DIRTY", 500, 64) == b"r1 DIRTY 500 64\n"
    with pytest.raises(ValueError, match="bad command"):
        encode_request("r1", "dirty")
    with pytest.raises(ValueError, match="bad request id"):
        encode_request("r 1", "PING")
    with pytest.raises(ValueError, match="non-empty words"):
        encode_request("r1", "DIRTY", "5 0")
    with pytest.raises(ValueError, match="longer than"):
        encode_request("r1", "DIRTY", "9" * MAX_LINE_BYTES)


def test_parse_ok_and_err() -> None:
    ok = parse_reply("r7 OK corrupted=0 pages=2048 retries=3 ms=40\r\n")
    assert ok.ok and ok.request_id == "r7" and ok.fields["pages"] == "2048"
    err = parse_reply("r8 ERR bad-args bytes_per_page must be 1..4064")
    assert not err.ok and err.text.startswith("bad-args")
    with pytest.raises(ProtocolViolation):
        parse_reply("NOVACRON-HEARTBEAT n=3")


@given(st.text(max_size=200))
def test_parse_never_crashes_on_garbage(line: str) -> None:
    with contextlib.suppress(ProtocolViolation):
        parse_reply(line)
