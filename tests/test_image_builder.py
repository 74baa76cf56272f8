"""Image builder pieces that need no network: cpio writer, corpus selection, boot-time overrides."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from novacron.image import ImageError, ImageSettingError, find_image
from novacron.image.builder import _compile_workload, guest_source_dir
from novacron.image.corpus import SLACK_BYTES, select_corpus
from novacron.image.cpio import CpioWriter
from novacron.image.model import GuestImage, ImageManifest


def test_cpio_archive_is_read_by_gnu_cpio(tmp_path: Path) -> None:
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello\n")
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as fh:
        w = CpioWriter(fh)
        w.directory("bin")
        w.file("bin/hello", src, 0o755)
        w.symlink("bin/hi", "hello")
        w.char_device("console", 5, 1)
        w.finish()
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive.read_bytes(), capture_output=True, check=True
    ).stdout.decode()
    assert "bin/hello" in listing and "bin/hi -> hello" in listing and "console" in listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "bin/hello"], input=archive.read_bytes(), cwd=out, check=True)
    assert (out / "bin/hello").read_bytes() == b"hello\n"


def test_corpus_selection_is_deterministic_and_bounded() -> None:
    budget = 3 << 20
    a = select_corpus(budget, budget)
    b = select_corpus(budget, budget)
    assert a == b
    for files, total in ((a.programs, a.program_bytes), (a.texts, a.text_bytes)):
        assert budget <= total <= budget + SLACK_BYTES
        assert len({f.path for f in files}) == len(files)
    assert all(f.path.read_bytes()[:4] == b"\x7fELF" for f in a.programs[:5])
    assert all(b"\0" not in f.path.read_bytes()[:4096] for f in a.texts[:20])


def _image(tmp_path: Path) -> GuestImage:
    manifest = ImageManifest.model_validate(
        {
            "manifest_version": 1, "profile": "test", "content_hash": "0", "built_at": 0.0,
            "kernel_package": "k", "kernel_version": "1", "kernel_release": "r", "busybox_version": "b",
            "gcc_version": "g", "memory_mib": 192, "vcpus": 1, "base_cmdline": "console=ttyS0",
            "defaults": {
                "data_mib": 24, "ws_mib": 8, "dirty_rate": 200, "dirty_bytes": 128, "rewrite_rate": 16,
            },
            "corpus": {"program_files": 1, "program_bytes": 1, "text_files": 1, "text_bytes": 1},
            "kernel_bytes": 1, "initrd_bytes": 1, "initrd_uncompressed_bytes": 1,
        }
    )  # fmt: skip
    return GuestImage(directory=tmp_path, manifest=manifest)


def test_cmdline_overrides_and_their_limits(tmp_path: Path) -> None:
    img = _image(tmp_path)
    line = img.kernel_cmdline(data_mib=8, dirty_rate=0)
    assert "novacron.data_mib=8 " in line and "novacron.dirty_rate=0 " in line and "novacron.ws_mib=8" in line
    with pytest.raises(ImageSettingError, match="exceeds what this image holds"):
        img.kernel_cmdline(data_mib=25)
    with pytest.raises(ImageSettingError, match="unknown workload setting"):
        img.kernel_cmdline(colour=3)
    with pytest.raises(ImageSettingError, match="at least 1"):
        img.kernel_cmdline(ws_mib=0)


def test_find_image_tells_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVACRON_CACHE_DIR", str(tmp_path))
    with pytest.raises(Exception, match="novacron image build --profile default"):
        find_image("default")


def test_compiler_failure_is_reported_with_its_output(tmp_path: Path) -> None:
    (tmp_path / "workload.c").write_text("int main(void) { return undefined_symbol; }\n")
    with pytest.raises(ImageError, match="compiling the guest workload failed") as exc:
        _compile_workload(tmp_path, tmp_path / "out")
    assert "undefined_symbol" in str(exc.value.context["detail"])


def test_guest_sources_missing_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVACRON_GUEST_SRC", str(tmp_path))
    with pytest.raises(ImageError, match="guest sources not found") as exc:
        guest_source_dir()
    assert "workload.c" in exc.value.context["missing"]
