"""AMST: the multi-stream transport of DWCP (session, channels, streams, stream-count controller).

Public API (docs/transport.md): :func:`connect_session`, :class:`AmstListener`, :class:`AmstSession`,
:class:`Channel`, :class:`SessionOptions`, :class:`AmstConfig`, :class:`SocketTuning`, the errors, and
the metrics hooks (:class:`TransportObserver`, :class:`TransportMetrics`). The sans-IO core
(:mod:`.core`), path monitor (:mod:`.monitor`) and controller (:mod:`.controller`) are importable from
their modules.
"""

from novacron.dwcp.transport.config import INITIAL_CHANNEL_WINDOW, AmstConfig
from novacron.dwcp.transport.endpoints import AmstListener, connect_session
from novacron.dwcp.transport.errors import (
    ChannelAborted,
    ChannelClosedError,
    ChannelError,
    ChannelLimitError,
    MessageTooLarge,
    SessionFailed,
    TransportConfigError,
    TransportError,
)
from novacron.dwcp.transport.metrics import PrometheusObserver, TransportMetrics, TransportObserver
from novacron.dwcp.transport.session import AmstSession, Channel, SessionOptions
from novacron.dwcp.transport.tuning import SocketTuning

__all__ = [
    "INITIAL_CHANNEL_WINDOW",
    "AmstConfig",
    "AmstListener",
    "AmstSession",
    "Channel",
    "ChannelAborted",
    "ChannelClosedError",
    "ChannelError",
    "ChannelLimitError",
    "MessageTooLarge",
    "PrometheusObserver",
    "SessionFailed",
    "SessionOptions",
    "SocketTuning",
    "TransportConfigError",
    "TransportError",
    "TransportMetrics",
    "TransportObserver",
    "connect_session",
]
