"""Choosing the guest's realistic data from the build host.

Program files are ELF binaries and shared libraries; text is source code and documentation that is
stored uncompressed. Both are picked deterministically (sorted paths, first come first taken, hard
links and duplicates counted once) until a byte budget is met, so the same host gives the same corpus.
Random data is not chosen here: the guest generates it at boot from a per-boot seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROGRAM_ROOTS = ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/lib/gcc")
TEXT_ROOTS = ("/usr/lib/python3.11", "/usr/lib/python3/dist-packages", "/usr/include", "/usr/share")
TEXT_SUFFIXES = frozenset(
    {
        ".py",
        ".h",
        ".hpp",
        ".c",
        ".txt",
        ".md",
        ".rst",
        ".html",
        ".css",
        ".js",
        ".json",
        ".xml",
        ".pl",
        ".pm",
        ".sh",
        ".conf",
        ".cfg",
        ".yaml",
        ".yml",
        ".ini",
        ".csv",
        ".tcl",
        ".po",
        ".tex",
        ".el",
    }
)
MIN_FILE_BYTES = 4096
MAX_PROGRAM_FILE_BYTES = 8 << 20  # one huge library must not become the whole corpus
MAX_TEXT_FILE_BYTES = 2 << 20
SNIFF_BYTES = 4096
ELF_MAGIC = b"\x7fELF"
# Each class is picked a little beyond its budget: the guest keeps whole files until it reaches the
# budget, so it needs at least that much to choose from.
SLACK_BYTES = 2 << 20


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Corpus:
    programs: tuple[CorpusFile, ...]
    texts: tuple[CorpusFile, ...]

    @property
    def program_bytes(self) -> int:
        return sum(f.size for f in self.programs)

    @property
    def text_bytes(self) -> int:
        return sum(f.size for f in self.texts)

    def fingerprint_lines(self) -> Iterator[str]:
        for cls, files in (("prog", self.programs), ("text", self.texts)):
            for f in files:
                yield f"{cls} {f.path} {f.size} {f.mtime_ns}\n"


def _walk_sorted(root: str) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _sniff(path: Path) -> bytes | None:
    try:
        with path.open("rb") as fh:
            return fh.read(SNIFF_BYTES)
    except OSError:
        return None


def _is_program(path: Path, head: bytes) -> bool:
    return head.startswith(ELF_MAGIC)


def _is_text(path: Path, head: bytes) -> bool:
    if path.suffix not in TEXT_SUFFIXES or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the sniff boundary is still text.
        return exc.start >= len(head) - 4
    return True


def _select(
    roots: tuple[str, ...], budget: int, max_size: int, accept: str, seen: set[tuple[int, int]]
) -> tuple[CorpusFile, ...]:
    picked: list[CorpusFile] = []
    total = 0
    check = _is_program if accept == "program" else _is_text
    for root in roots:
        for path in _walk_sorted(root):
            if total >= budget:
                return tuple(picked)
            try:
                st = path.lstat()
            except OSError:
                continue
            if not path.is_file() or path.is_symlink():
                continue
            if not MIN_FILE_BYTES <= st.st_size <= max_size or (st.st_dev, st.st_ino) in seen:
                continue
            if total + st.st_size > budget + SLACK_BYTES:
                continue
            head = _sniff(path)
            if head is None or not check(path, head):
                continue
            seen.add((st.st_dev, st.st_ino))
            picked.append(CorpusFile(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns))
            total += st.st_size
    return tuple(picked)


def select_corpus(program_budget: int, text_budget: int) -> Corpus:
    seen: set[tuple[int, int]] = set()
    programs = _select(PROGRAM_ROOTS, program_budget, MAX_PROGRAM_FILE_BYTES, "program", seen)
    texts = _select(TEXT_ROOTS, text_budget, MAX_TEXT_FILE_BYTES, "text", seen)
    return Corpus(programs=programs, texts=texts)
