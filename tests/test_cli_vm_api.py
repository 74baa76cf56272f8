"""``novacron vm`` through the REST API: with ``NOVACRON_SERVER`` set (or a non-local context) the CLI
acts on the server's host through the API, never on its own local state."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from novacron.api.harness import api_harness
from novacron.api.server import Listen, running_api
from novacron.security.rbac import Role

NOVACRON = str(Path(sys.executable).with_name("novacron"))


async def _cli(env: dict[str, str], *args: str) -> tuple[int, Any, str]:
    proc = await asyncio.create_subprocess_exec(
        NOVACRON, "vm", *args, "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out.strip() else None, err.decode() + out.decode()


async def test_vm_commands_go_through_the_api_when_a_server_is_set(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    own_state = tmp_path / "cli-state"
    async with api_harness(tmp_path / "server") as h:
        sock = tmp_path / "api.sock"
        async with running_api(h.app, Listen(unix=sock)):
            env = {**os.environ, "NOVACRON_SERVER": f"unix://{sock}", "NOVACRON_STATE_DIR": str(own_state)}
            env.pop("NOVACRON_CONTEXT", None)

            env["NOVACRON_TOKEN"] = h.tokens[Role.VIEWER]
            code, _, err = await _cli(env, "create", "k1", "--kernel", str(kernel), "--accel", "tcg")
            assert code == 2 and "permission" in err.lower(), err  # a viewer may not create VMs

            env["NOVACRON_TOKEN"] = h.tokens[Role.ADMIN]
            code, created, err = await _cli(env, "create", "k1", "--kernel", str(kernel), "--accel", "tcg")
            assert code == 0, err
            assert created["name"] == "k1" and created["state"] == "defined"
            code, listed, err = await _cli(env, "list")
            assert code == 0 and [v["name"] for v in listed] == ["k1"], err
            code, shown, err = await _cli(env, "show", "k1")
            assert code == 0 and shown["name"] == "k1", err
            code, _, err = await _cli(env, "show", "nope")
            assert code == 2 and "nope" in err, err
            code, _, err = await _cli(env, "delete", "k1")
            assert code == 0, err
            code, listed, err = await _cli(env, "list")
            assert code == 0 and listed == [], err
            assert not (own_state / "vms").exists()  # the CLI's own host state was never touched
