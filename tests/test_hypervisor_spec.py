"""VM specs: every rejection names the field and the reason; machine types resolve to versions."""

from __future__ import annotations

from pathlib import Path

import pytest

from novacron.hypervisor import HostLimits, SpecError, parse_spec
from novacron.hypervisor.machine import resolve_machine

LIMITS = HostLimits(cpus=4, memory_mib=8192)


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"not really a kernel")
    return k


def _spec(kernel_path: Path, **over: object) -> dict[str, object]:
    return {"name": "web-1", "kernel": str(kernel_path), "memory_mib": 256, "vcpus": 1, **over}


def test_valid_spec_resolves_paths(kernel: Path) -> None:
    spec = parse_spec(_spec(kernel), LIMITS)
    assert spec.kernel == kernel.resolve() and spec.machine == "pc" and spec.accel == "auto"


@pytest.mark.parametrize(
    ("over", "field", "words"),
    [
        ({"name": "Web_1"}, "name", "not a valid name"),
        ({"name": ""}, "name", "not a valid name"),
        ({"vcpus": 5}, "vcpus", "exceed the host's 4 CPUs"),
        ({"vcpus": 0}, "vcpus", "greater than or equal to 1"),
        ({"memory_mib": 9000}, "memory_mib", "host limit"),
        ({"memory_mib": 16}, "memory_mib", "greater than or equal to 64"),
        ({"kernel": "/nonexistent/vmlinuz"}, "kernel", "does not exist"),
        ({"initrd": "/nonexistent/initrd"}, "initrd", "does not exist"),
        ({"machine": "PC; rm -rf"}, "machine", "pattern"),
        ({"accel": "hvf"}, "accel", "'auto', 'kvm' or 'tcg'"),
        ({"cmdline": "a\nb"}, "cmdline", "printable"),
        ({"bogus": 1}, "bogus", "Extra inputs"),
    ],
)
def test_bad_specs_name_field_and_reason(
    kernel: Path, over: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(_spec(kernel, **over), LIMITS)
    assert exc.value.context["field"] == field
    assert words in str(exc.value)


def test_directory_is_not_a_kernel(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not a regular file"):
        parse_spec({"name": "x", "kernel": str(tmp_path)}, LIMITS)


def test_needs_something_to_boot() -> None:
    with pytest.raises(SpecError, match="kernel or a disk image"):
        parse_spec({"name": "x"}, LIMITS)


def test_machine_alias_resolves_to_versioned_type() -> None:
    resolved = resolve_machine("qemu-system-x86_64", "pc")
    assert resolved.startswith("pc-i440fx-") and resolved != "pc"
    assert resolve_machine("qemu-system-x86_64", "q35").startswith("pc-q35-")
    with pytest.raises(SpecError) as exc:
        resolve_machine("qemu-system-x86_64", "no-such-machine")
    assert exc.value.context["field"] == "machine"


def test_tcg_guests_get_ram_off_qemus_aligned_dirty_sync_path(kernel: Path) -> None:
    """QEMU 7.2's fast dirty-bitmap sync (RAM block length a multiple of 64 pages) leaves TCG's
    software TLB able to skip dirty tracking: TCG guests get a RAM size off that multiple, KVM the spec's."""
    from novacron.hypervisor.qemu import TCG_RAM_PAD_KIB, ram_size

    spec = parse_spec(_spec(kernel, memory_mib=768), LIMITS)
    assert ram_size(spec, "kvm") == "768M"
    tcg = ram_size(spec, "tcg")
    kib = int(tcg.removesuffix("K"))
    assert tcg.endswith("K") and kib == 768 * 1024 + TCG_RAM_PAD_KIB
    assert kib % 8 == 0  # QEMU rounds -m up to 8 KiB
    assert kib % (64 * 4) != 0  # not a whole number of 64-page words of the dirty bitmap
