"""Host-side client of the test guest's control channel (second serial port)."""

from novacron.guest.control import (
    ChecksumResult,
    DirtyAck,
    GuestCommandError,
    GuestControl,
    GuestControlError,
    GuestControlLimits,
    GuestStatus,
    VerifyResult,
)

__all__ = [
    "ChecksumResult",
    "DirtyAck",
    "GuestCommandError",
    "GuestControl",
    "GuestControlError",
    "GuestControlLimits",
    "GuestStatus",
    "VerifyResult",
]
