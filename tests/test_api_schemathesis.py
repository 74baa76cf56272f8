"""Schemathesis against the published OpenAPI spec of a real server (uvicorn on loopback TCP).

Every operation is fuzzed with an admin token (the widest surface). The server's services are real:
SQLite store, QEMU driver. Its image cache is empty, so a create request that passes validation
fails with "no guest image" (404) instead of booting guests at random; kernel paths must be absolute
and exist, which generated strings do not. Checks: no server errors, and responses (status codes,
content types, bodies) conform to the published spec.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from novacron.api.harness import api_harness
from novacron.api.server import Listen, running_api
from novacron.security.rbac import Role

STARTUP_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root: Path = tmp_path_factory.mktemp("api")
    holder: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        async with api_harness(root, control=True) as h:
            stop = asyncio.Event()
            async with running_api(h.app, Listen(tcp_host="127.0.0.1", tcp_port=0)) as bound:
                holder.update(port=bound.tcp_port, token=h.tokens[Role.ADMIN], stop=stop,
                              loop=asyncio.get_running_loop())  # fmt: skip
                ready.set()
                await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            holder["error"] = exc
        finally:
            ready.set()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOVACRON_CACHE_DIR", str(root / "empty-cache"))
        thread = threading.Thread(target=run, name="api-server", daemon=True)
        thread.start()
        assert ready.wait(STARTUP_TIMEOUT_S), "API server did not start"
        if "error" in holder:
            raise holder["error"]
        try:
            yield holder
        finally:
            holder["loop"].call_soon_threadsafe(holder["stop"].set)
            thread.join(STARTUP_TIMEOUT_S)


MAX_EXAMPLES = 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]  # fmt: skip


def test_openapi_spec_fuzz(live_api: dict[str, Any]) -> None:
    """Each operation of the spec, fuzzed by Hypothesis through schemathesis' strategies.

    (Driven directly rather than with schemathesis' pytest plugin, which does not run on pytest 9.)
    """
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{live_api['port']}/openapi.json")
    headers = {"Authorization": f"Bearer {live_api['token']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, report all
            failures.append(f"{op.method.upper()} {op.path}: {exc}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_schemathesis_cli_finds_no_server_errors(live_api: dict[str, Any], tmp_path: Path) -> None:
    """The same spec through the `schemathesis run` command (examples, boundary coverage, fuzzing)."""
    exe = Path(sys.executable).with_name("schemathesis")
    proc = subprocess.run(
        [str(exe), "run", f"http://127.0.0.1:{live_api['port']}/openapi.json",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
         "--header", f"Authorization: Bearer {live_api['token']}",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "15", "--seed", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout.lower()
