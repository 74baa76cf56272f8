"""Sans-IO frame codec: frames in, bytes out; bytes in (any split), frames out.

Encoding returns the header+body and the payload separately (:meth:`FrameEncoder.encode_parts`), so a
1 MiB data chunk goes to the socket without being copied; :meth:`FrameEncoder.encode` joins them (one
copy). Decoding copies each byte at most once: a frame that lies inside one received chunk is sliced
out of it (zero copy); a frame split across chunks is assembled in a buffer allocated for exactly that
frame. The decoder therefore holds at most one frame of at most ``max_frame_size`` bytes plus a partial
header, whatever it is fed, and every failure is a :class:`ProtocolError` that says what was wrong.
After a failure the decoder is dead and repeats the same error.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import msgpack

from novacron.dwcp.errors import ProtocolError, ProtocolErrorKind
from novacron.dwcp.frames.limits import (
    CONTROL_CHANNEL,
    FRAME_FORMAT_VERSION,
    HANDSHAKE_MAX_FRAME_SIZE,
    HARD_MAX_FRAME_SIZE,
    HEADER,
    HEADER_AFTER_LENGTH,
    HEADER_SIZE,
    LENGTH_PREFIX_SIZE,
    MAX_BODY_FIELDS,
    MAX_BODY_SIZE,
    MAX_BYTES_LEN,
    MAX_CHANNEL_ID,
    MAX_LIST_ITEMS,
    MAX_STRING_BYTES,
    check_max_frame_size,
)
from novacron.dwcp.frames.messages import (
    REGISTRY,
    SPEC_BY_BODY,
    ChannelRule,
    FrameSpec,
    FrameType,
    Message,
)
from novacron.dwcp.frames.schema import check_value

Payload = bytes | bytearray | memoryview
_Header = tuple[int, FrameSpec, int, int, int]  # bytes after the header, spec, flags, channel, body length
_SPECS: dict[int, FrameSpec] = {int(code): spec for code, spec in REGISTRY.items()}

_UNPACK_OPTIONS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": False,  # integer field numbers as keys
    "use_list": True,
    "max_str_len": MAX_STRING_BYTES,
    "max_bin_len": MAX_BYTES_LEN,
    "max_array_len": MAX_LIST_ITEMS,
    "max_map_len": MAX_BODY_FIELDS,
    "max_ext_len": 0,  # no extension types in DWCP bodies
}
_MSGPACK_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: a typed body, the channel (0 = control), flags, and raw payload bytes (DATA only)."""

    body: Message
    channel: int = CONTROL_CHANNEL
    flags: int = 0
    payload: Payload = b""

    @property
    def type(self) -> FrameType:
        return SPEC_BY_BODY[type(self.body)].frame_type


def _payload_len(payload: Payload) -> int:
    return payload.nbytes if isinstance(payload, memoryview) else len(payload)


def _check_envelope(spec: FrameSpec, channel: int, flags: int, payload_len: int, **ctx: Any) -> None:
    name = spec.name
    if spec.channel is ChannelRule.CONTROL and channel != CONTROL_CHANNEL:
        raise ProtocolError(
            f"malformed {name} frame: must be on the control channel 0, not {channel}",
            what=ProtocolErrorKind.MALFORMED,
            frame=name,
            **ctx,
        )
    if spec.channel is ChannelRule.DATA and not 1 <= channel <= MAX_CHANNEL_ID:
        raise ProtocolError(
            f"malformed {name} frame: needs a channel id >= 1, got {channel}",
            what=ProtocolErrorKind.MALFORMED,
            frame=name,
            **ctx,
        )
    if flags & ~spec.flags:
        raise ProtocolError(
            f"malformed {name} frame: unknown flags {flags & ~spec.flags:#06x}",
            what=ProtocolErrorKind.MALFORMED,
            frame=name,
            **ctx,
        )
    if payload_len and not spec.payload:
        raise ProtocolError(
            f"malformed {name} frame: carries {payload_len} payload bytes but this type has no payload",
            what=ProtocolErrorKind.MALFORMED,
            frame=name,
            **ctx,
        )


def encode_body(spec: FrameSpec, body: Message) -> bytes:
    fields: dict[int, Any] = {}
    for f in spec.fields:
        value = getattr(body, f.name)
        if value is None or value == ():
            if f.required:
                raise ProtocolError(
                    f"cannot encode {spec.name}: required field {f.name} is missing",
                    what=ProtocolErrorKind.MALFORMED,
                    frame=spec.name,
                    field=f.name,
                )
            continue
        checked = check_value(spec.name, f, value)
        fields[f.number] = list(checked) if isinstance(checked, tuple) else checked
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


def decode_body(
    spec: FrameSpec, data: Payload, offset: int | None = None, channel: int | None = None
) -> Message:
    """Decode and check a body; ``offset``/``channel`` only go into error context."""
    name = spec.name
    try:
        raw = msgpack.unpackb(data, **_UNPACK_OPTIONS)
    except _MSGPACK_ERRORS as exc:
        raise ProtocolError(
            f"malformed {name} body: not a valid msgpack value ({exc})",
            what=ProtocolErrorKind.MALFORMED,
            frame=name,
            offset=offset,
            channel=channel,
        ) from None
    if not isinstance(raw, dict):
        raise ProtocolError(
            f"malformed {name} body: expected a map, got {type(raw).__name__}",
            what=ProtocolErrorKind.MALFORMED,
            frame=name,
            offset=offset,
            channel=channel,
        )
    kwargs: dict[str, Any] = {}
    by_number = spec.by_number
    for key, value in raw.items():
        # Keys that are not field numbers we know are unknown optional fields: ignored.
        if type(key) is int and key in by_number:
            f = by_number[key]
            try:
                kwargs[f.name] = check_value(name, f, value)
            except ProtocolError as exc:
                exc.context.update(offset=offset, channel=channel)
                raise
    if not spec.required <= kwargs.keys():
        missing = next(f for f in spec.fields if f.required and f.name not in kwargs)
        raise ProtocolError(
            f"malformed {name} body: required field {missing.name} ({missing.number}) is missing",
            what=ProtocolErrorKind.MALFORMED,
            frame=name,
            field=missing.name,
            offset=offset,
            channel=channel,
        )
    body: Message = spec.body(**kwargs)
    return body


class FrameEncoder:
    """Encodes frames, refusing any that the peer's negotiated limit would reject."""

    def __init__(self, max_frame_size: int = HANDSHAKE_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = check_max_frame_size(max_frame_size)

    def set_max_frame_size(self, value: int) -> None:
        self.max_frame_size = check_max_frame_size(value)

    def encode_parts(self, frame: Frame) -> tuple[bytes, Payload]:
        """Header+body bytes, and the payload as given (not copied). Write both, in order."""
        spec = SPEC_BY_BODY.get(type(frame.body))
        if spec is None:
            raise ProtocolError(
                f"cannot encode {type(frame.body).__name__}: not a registered frame body",
                what=ProtocolErrorKind.UNKNOWN_TYPE,
            )
        payload_len = _payload_len(frame.payload)
        _check_envelope(spec, frame.channel, frame.flags, payload_len, direction="encode")
        body = encode_body(spec, frame.body)
        if len(body) > MAX_BODY_SIZE:
            raise ProtocolError(
                f"cannot encode {spec.name}: body of {len(body)} bytes exceeds {MAX_BODY_SIZE}",
                what=ProtocolErrorKind.OVERSIZE,
                frame=spec.name,
            )
        frame_len = HEADER_AFTER_LENGTH + len(body) + payload_len
        if frame_len + LENGTH_PREFIX_SIZE > self.max_frame_size:
            raise ProtocolError(
                f"cannot encode {spec.name}: frame of {frame_len + LENGTH_PREFIX_SIZE} bytes exceeds "
                f"the limit of {self.max_frame_size}",
                what=ProtocolErrorKind.OVERSIZE,
                frame=spec.name,
            )
        head = HEADER.pack(
            frame_len, FRAME_FORMAT_VERSION, spec.frame_type, frame.flags, frame.channel, len(body)
        )
        return head + body, frame.payload

    def encode(self, frame: Frame) -> bytes:
        head, payload = self.encode_parts(frame)
        return head + payload if payload else head


def encode_frame(frame: Frame, max_frame_size: int = HARD_MAX_FRAME_SIZE) -> bytes:
    return FrameEncoder(max_frame_size).encode(frame)


class FrameDecoder:
    """Incremental decoder. Feed with :meth:`receive_data` / :meth:`receive_eof`, pull with
    :meth:`next_frame` until it returns None. Inputs are referenced, not copied, until pulled."""

    def __init__(self, max_frame_size: int = HANDSHAKE_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = check_max_frame_size(max_frame_size)
        self._pending: deque[memoryview] = deque()  # inputs not yet decoded ...
        self._pos = 0  # ... of which the first is consumed up to here
        self._pending_bytes = 0
        self._head = bytearray()  # a header split across inputs
        self._header: _Header | None = None  # parsed header of the frame being completed
        self._asm: bytearray | None = None  # a frame split across inputs
        self._asm_fill = 0
        self._consumed = 0  # stream offset of the next byte to decode (for error context)
        self._frame_offset = 0
        self._eof = False
        self._error: ProtocolError | None = None

    # ------------------------------------------------------------------------------------ inputs

    def set_max_frame_size(self, value: int) -> None:
        """Apply a newly negotiated limit to the frames not yet started."""
        self.max_frame_size = check_max_frame_size(value)

    def receive_data(self, data: Payload) -> None:
        if self._error is not None:
            raise self._error
        if self._eof:
            raise ProtocolError("data received after end of stream", what=ProtocolErrorKind.MALFORMED)
        if not data:
            return
        # We keep a reference until the frame is pulled: a mutable buffer could change under us.
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._pending.append(memoryview(chunk))
        self._pending_bytes += len(chunk)

    def receive_eof(self) -> None:
        self._eof = True

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for frames not yet returned: referenced input plus copies."""
        return self._pending_bytes + len(self._head) + (len(self._asm) if self._asm is not None else 0)

    @property
    def copied_bytes(self) -> int:
        """Bytes this decoder has allocated itself (partial header + one frame under assembly)."""
        return len(self._head) + (len(self._asm) if self._asm is not None else 0)

    @property
    def is_idle(self) -> bool:
        """True when no partial frame is buffered (safe point to end the stream)."""
        return self.buffered_bytes == 0 and self._header is None

    # ----------------------------------------------------------------------------------- outputs

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed (or the stream ended cleanly)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            self._pending.clear()
            self._pending_bytes = 0
            self._head = bytearray()
            self._asm = None
            raise

    def frames(self) -> list[Frame]:
        """Every complete frame available now."""
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    # ---------------------------------------------------------------------------------- internals

    def _take(self, n: int) -> memoryview:
        """Up to ``n`` bytes from the front of the pending input (a view, no copy)."""
        chunk, pos = self._pending[0], self._pos
        end = min(pos + n, len(chunk))
        piece = chunk[pos:end]
        if end == len(chunk):
            self._pending.popleft()
            self._pos = 0
        else:
            self._pos = end
        taken = end - pos
        self._pending_bytes -= taken
        self._consumed += taken
        return piece

    def _next(self) -> Frame | None:
        # Fast path: a whole frame inside the first input (the common case for control frames).
        if self._header is None and not self._head and self._pending:
            chunk, pos = self._pending[0], self._pos
            if len(chunk) - pos >= HEADER_SIZE:
                self._frame_offset = self._consumed
                fast = self._check_header(HEADER.unpack_from(chunk, pos))
                end = pos + HEADER_SIZE + fast[0]
                if end <= len(chunk):  # consume header and frame in one step
                    view = chunk[pos + HEADER_SIZE : end]
                    if end == len(chunk):
                        self._pending.popleft()
                        self._pos = 0
                    else:
                        self._pos = end
                    self._pending_bytes -= end - pos
                    self._consumed += end - pos
                    return self._finish(view, fast)
                self._take(HEADER_SIZE)
                self._header = fast
        header = self._header if self._header is not None else self._read_header()
        if header is None:
            self._check_truncated()
            return None
        rest = header[0]
        if self._asm is None:
            if self._pending and len(self._pending[0]) - self._pos >= rest:
                self._header = None
                return self._finish(self._take(rest), header)  # rest of the frame in one input
            self._asm = bytearray(rest)
            self._asm_fill = 0
        while self._asm_fill < rest and self._pending:
            piece = self._take(rest - self._asm_fill)
            self._asm[self._asm_fill : self._asm_fill + len(piece)] = piece
            self._asm_fill += len(piece)
        if self._asm_fill < rest:
            self._check_truncated()
            return None
        view = memoryview(self._asm)
        self._asm = None
        self._header = None
        return self._finish(view, header)

    def _check_truncated(self) -> None:
        if self._eof and not self.is_idle:
            raise ProtocolError(
                "stream ended in the middle of a frame",
                what=ProtocolErrorKind.TRUNCATED,
                offset=self._frame_offset,
                buffered=self.buffered_bytes,
            )

    def _read_header(self) -> _Header | None:
        """A header that may be split across inputs (copied into a 16-byte buffer)."""
        if not self._head:
            self._frame_offset = self._consumed
        while len(self._head) < HEADER_SIZE and self._pending:
            self._head += self._take(HEADER_SIZE - len(self._head))
        if len(self._head) < HEADER_SIZE:
            return None
        fields = HEADER.unpack(self._head)
        self._head = bytearray()
        self._header = self._check_header(fields)
        return self._header

    def _check_header(self, fields: tuple[int, ...]) -> _Header:
        frame_len, fmt, ftype, flags, channel, body_len = fields
        offset = self._frame_offset
        total = frame_len + LENGTH_PREFIX_SIZE
        if total > self.max_frame_size:
            raise ProtocolError(
                f"frame length {total} exceeds the limit of {self.max_frame_size} bytes",
                what=ProtocolErrorKind.OVERSIZE,
                offset=offset,
            )
        if frame_len < HEADER_AFTER_LENGTH:
            raise ProtocolError(
                f"frame length {total} is shorter than the {HEADER_SIZE}-byte header",
                what=ProtocolErrorKind.MALFORMED,
                offset=offset,
            )
        if fmt != FRAME_FORMAT_VERSION:
            raise ProtocolError(
                f"unsupported frame format version {fmt} (this node speaks {FRAME_FORMAT_VERSION})",
                what=ProtocolErrorKind.VERSION,
                offset=offset,
            )
        spec = _SPECS.get(ftype)
        if spec is None:
            raise ProtocolError(
                f"unknown frame type {ftype:#04x}", what=ProtocolErrorKind.UNKNOWN_TYPE, offset=offset
            )
        rest = frame_len - HEADER_AFTER_LENGTH
        if body_len == 0 or body_len > rest:
            raise ProtocolError(
                f"malformed {spec.name} frame: body length {body_len} does not fit frame of {total} bytes",
                what=ProtocolErrorKind.MALFORMED,
                frame=spec.name,
                offset=offset,
            )
        if body_len > MAX_BODY_SIZE:
            raise ProtocolError(
                f"{spec.name} body of {body_len} bytes exceeds the limit of {MAX_BODY_SIZE}",
                what=ProtocolErrorKind.OVERSIZE,
                frame=spec.name,
                offset=offset,
            )
        _check_envelope(spec, channel, flags, rest - body_len, offset=offset)
        return rest, spec, flags, channel, body_len

    def _finish(self, view: memoryview, header: _Header) -> Frame:
        _, spec, flags, channel, body_len = header
        body = decode_body(spec, view[:body_len], self._frame_offset, channel)
        payload: Payload = view[body_len:] if len(view) > body_len else b""
        return Frame(body=body, channel=channel, flags=flags, payload=payload)
