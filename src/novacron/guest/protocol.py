"""The control channel's line protocol, without I/O (grammar in docs/guest.md).

Request:  ``<id> <COMMAND> [args...]\\n``      Reply: ``<id> OK key=value ...`` or ``<id> ERR <code> <text>``
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LINE_BYTES = 256  # the guest rejects longer requests
MAX_REPLY_BYTES = 1024
_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_COMMAND = re.compile(r"^[A-Z]{1,16}$")


class ProtocolViolation(ValueError):
    """A reply that does not follow the grammar."""


@dataclass(frozen=True)
class Reply:
    request_id: str
    ok: bool
    fields: dict[str, str]
    text: str  # everything after OK/ERR


def encode_request(request_id: str, command: str, *args: int | str) -> bytes:
    if not _ID.match(request_id):
        raise ValueError(f"bad request id {request_id!r}")
    if not _COMMAND.match(command):
        raise ValueError(f"bad command {command!r}")
    parts = [request_id, command, *(str(a) for a in args)]
    if any(not p or any(c.isspace() for c in p) for p in parts):
        raise ValueError("request arguments must be non-empty words")
    line = (" ".join(parts) + "\n").encode("ascii")
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"request longer than {MAX_LINE_BYTES} bytes")
    return line


def parse_reply(line: str) -> Reply:
    parts = line.strip().split(" ", 2)
    if len(parts) < 2 or parts[1] not in ("OK", "ERR"):
        raise ProtocolViolation(f"not a reply: {line[:80]!r}")
    text = parts[2] if len(parts) == 3 else ""
    fields: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep:
            fields[key] = value
    return Reply(request_id=parts[0], ok=parts[1] == "OK", fields=fields, text=text)
