"""The CLI as a user runs it: VMs outlive the CLI process and a new process re-attaches to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from novacron.hypervisor import VMState
from novacron.hypervisor.qemu import QemuDriver
from novacron.store import SqliteStore
from novacron.vm import VMService

NOVACRON = [str(Path(sys.executable).parent / "novacron")]


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NOVACRON_STATE_DIR=str(state), COLUMNS="200")
    return subprocess.run(
        [*NOVACRON, *args], capture_output=True, text=True, env=env, timeout=180, check=False
    )


@pytest.mark.qemu
async def test_cli_lifecycle_and_reattach(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = _cli(state, "vm", "create", "cli1", "--accel", "tcg", "--start", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["state"] == "running" and created["machine"].startswith("pc-i440fx-")

    # A second VM with the same name is refused as a user error (exit code 2).
    dup = _cli(state, "vm", "create", "cli1", "--accel", "tcg")
    assert dup.returncode == 2 and "already exists" in dup.stderr

    # The CLI process is gone; QEMU is not. A fresh driver in this process re-attaches.
    store = SqliteStore(state / "store.db")
    try:
        svc = VMService(store, QemuDriver(state / "vms"))
        info = await svc.show("cli1")
        assert info.status.state == VMState.RUNNING and info.status.pid == created["pid"]
        async with await svc.guest("cli1") as ctl:
            assert (await ctl.verify()).corrupted == 0
        assert (await svc.pause("cli1")).status.state == VMState.PAUSED
    finally:
        await store.close()

    listed = json.loads(_cli(state, "vm", "list", "--json").stdout)
    assert [(v["name"], v["state"], v["desired_state"]) for v in listed] == [("cli1", "paused", "paused")]
    assert _cli(state, "vm", "resume", "cli1").returncode == 0
    verify = _cli(state, "vm", "guest", "verify", "cli1", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["corrupted"] == 0
    assert "NOVACRON-READY" in _cli(state, "vm", "console", "cli1", "-n", "500").stdout

    busy = _cli(state, "vm", "delete", "cli1")
    assert busy.returncode == 2 and "stop it first" in busy.stderr
    assert _cli(state, "vm", "stop", "cli1", "--force").returncode == 0
    assert _cli(state, "vm", "delete", "cli1").returncode == 0
    assert _cli(state, "vm", "list", "--json").stdout.strip() == "[]"


def test_cli_user_errors_exit_2_and_name_the_problem(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = _cli(state, "vm", "create", "x1", "--kernel", "/nonexistent/vmlinuz", "--json")
    assert r.returncode == 2
    err = json.loads(r.stdout)
    assert err["kind"] == "SpecError" and err["field"] == "kernel" and "does not exist" in err["error"]
    r = _cli(state, "vm", "create", "Bad_Name", "--kernel", "/bin/true")
    assert r.returncode == 2 and "not a valid name" in r.stderr
    r = _cli(state, "vm", "show", "ghost")
    assert r.returncode == 2 and "no VM named 'ghost'" in r.stderr
    r = _cli(state, "vm", "create", "x2", "--kernel", "/bin/true", "--memory", "99999999")
    assert r.returncode == 2 and "memory_mib" in r.stderr and "host limit" in r.stderr
