"""Structured logging on top of :mod:`logging`.

Call sites log *events* with fields: ``log_event(logger, "handshake.refused", peer=addr, step="hello")``.
With ``configure(json_output=True)`` each record is one JSON object per line (for daemons); otherwise a
compact ``event key=value`` line (for humans).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "novacron_fields"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS: fields})


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _FIELDS, {})
        kv = " ".join(f"{k}={v}" for k, v in fields.items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname[0]} {record.name}: {record.getMessage()}"
        if kv:
            line = f"{line} {kv}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def configure(level: int = logging.INFO, json_output: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_output else _TextFormatter())
    root = logging.getLogger("novacron")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
