"""``novacron demo`` end to end, small: the test guest over a short link, there and back, then QEMU's
own best migration; the summary must show all three migrations with the guest intact."""

from __future__ import annotations

import asyncio
import os

import pytest

from novacron.testing.agents import NOVACRON

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(180)]


async def test_demo_migrates_there_and_back_and_compares_with_qemu() -> None:
    env = {**os.environ, "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        NOVACRON, "demo", "--profile", "test", "--link", "1gbit/10ms", "--dwell", "2", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 150)
    text = out.decode()
    assert proc.returncode == 0, (text[-3000:], err.decode()[-2000:])
    summary = text[text.index("summary:") :]
    for label in ("DWCP hosta -> hostb (cold)", "DWCP hostb -> hosta (back)", "QEMU multifd x4 + zstd-3"):
        line = next((x for x in summary.splitlines() if label in x), "")
        assert "intact" in line, (label, summary)
    assert "baseline saving" in summary and "FAILED" not in text
    assert "result: done" in text  # the live display's final report, once per DWCP migration
