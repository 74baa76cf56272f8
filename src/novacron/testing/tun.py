"""Create a TUN device inside a network namespace and hand back its file descriptor.

The device is not persistent: it disappears when the last fd to it is closed, so a forwarder that dies
takes its devices with it.
"""

from __future__ import annotations

import fcntl
import os
import struct

from novacron.testing.errors import WanError
from novacron.testing.netns import TUN_DEVICE, in_namespace

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNSETOFFLOAD = 0x400454D0
_TUN_F_CSUM = 0x01
_TUN_F_TSO4 = 0x02
IFNAMSIZ = 16


def open_tun(namespace: str, ifname: str, offload: bool = False) -> int:
    """Open /dev/net/tun from inside `namespace` and attach a new layer-3 device `ifname` to it.

    With `offload`, packets carry a virtio_net_hdr and the kernel may hand over unchecksummed TCP
    super-packets (TSO) instead of MTU-sized segments; the forwarder must then run with --vnet-hdr.
    """
    if not 0 < len(ifname.encode()) < IFNAMSIZ:
        raise WanError("bad TUN interface name", name=ifname, max_len=IFNAMSIZ - 1)
    with in_namespace(namespace):
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if offload else 0)
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
            if offload:
                fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4)
        except OSError as exc:
            os.close(fd)
            raise WanError(
                "cannot create TUN device", namespace=namespace, name=ifname, error=exc.strerror
            ) from None
    return fd
