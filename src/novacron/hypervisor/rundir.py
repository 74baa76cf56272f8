"""One directory per VM: QEMU's sockets and logs, and the driver's own record of the VM.

Layout (``state_dir()/vms/<name>/``): spec.json (the VM as defined), state.json (pid, process start
time, accel, recorded stop), qemu.pid, qmp.sock, qmp-events.sock (a second QMP monitor for
long-lived event listeners), control.sock (guest control channel on ttyS1),
console.log (serial console, ttyS0), qemu.log (QEMU's stdout and stderr).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from novacron.hypervisor.spec import VMSpec, parse_spec

# Unix socket paths are limited to 107 bytes; run directories must stay short.
MAX_SOCKET_PATH = 107
# console.log grows ~100 bytes per second of guest life; keep it bounded across restarts.
CONSOLE_LOG_MAX_BYTES = 8 << 20
CONSOLE_LOG_KEEP_BYTES = 1 << 20
TAIL_READ_BYTES = 64 << 10


@dataclass
class RunState:
    """What the driver records about a VM's QEMU process (state.json)."""

    pid: int | None = None
    proc_start: int | None = None  # /proc/<pid>/stat starttime: guards against pid reuse
    started_at: float | None = None
    accel: str | None = None
    incoming: bool = False
    stopping: bool = False  # set before we stop QEMU: its disappearance is then not a crash
    console_offset: int = 0  # size of console.log when this run began
    last_exit: str | None = None  # "stopped" or "crashed" after a run ended


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.json"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def pid_file(self) -> Path:
        return self.path / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def events_socket(self) -> Path:
        """A second QMP monitor, for one long-lived client that follows events (e.g. a migration)."""
        return self.path / "qmp-events.sock"

    @property
    def sockets(self) -> tuple[Path, ...]:
        return (self.qmp_socket, self.events_socket, self.control_socket)

    @property
    def control_socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.path / "qemu.log"

    def exists(self) -> bool:
        return self.spec_file.is_file()

    def read_spec(self) -> VMSpec:
        # Re-validated on every use: the files it names (kernel, initrd) must still exist for QEMU.
        return parse_spec(json.loads(self.spec_file.read_text()))

    def write_spec(self, spec: VMSpec) -> None:
        _atomic_write(self.spec_file, spec.model_dump_json(indent=2) + "\n")

    def read_state(self) -> RunState:
        if not self.state_file.is_file():
            return RunState()
        data = json.loads(self.state_file.read_text())
        known = {k: v for k, v in data.items() if k in RunState.__dataclass_fields__}
        return RunState(**known)

    def write_state(self, state: RunState) -> None:
        _atomic_write(self.state_file, json.dumps(asdict(state), indent=2) + "\n")
        if state.pid is None:
            self.pid_file.unlink(missing_ok=True)
        else:
            _atomic_write(self.pid_file, f"{state.pid}\n")

    def trim_console_log(self) -> None:
        """Keep console.log bounded: when it is large, keep only its last part."""
        path = self.console_log
        if not path.is_file() or path.stat().st_size <= CONSOLE_LOG_MAX_BYTES:
            return
        with path.open("rb") as fh:
            fh.seek(-CONSOLE_LOG_KEEP_BYTES, os.SEEK_END)
            keep = fh.read()
        _atomic_write_bytes(path, keep)


def tail_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of a text file (reads at most TAIL_READ_BYTES from its end)."""
    if count <= 0 or not path.is_file():
        return []
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - TAIL_READ_BYTES))
        data = fh.read()
    return data.decode("utf-8", "replace").splitlines()[-count:]


def _atomic_write(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
