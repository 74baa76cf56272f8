"""The receiver's baseline store: references to earlier copies and siblings, limits, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from novacron.dwcp.encoding import (
    BaselineLimits,
    BaselineStore,
    BaselineStoreError,
    BaselineSummary,
    BaselineView,
    DefaultPageHasher,
    HdeConfigError,
    HdeDecodeError,
    HdeDecoder,
    HdeEncoder,
    HdeLimits,
    PageKind,
    copy_digest,
)
from test_hde_support import KEY, batch, text_pages

LIM = HdeLimits(session_cache_bytes=16 << 20)
HASHER = DefaultPageHasher(KEY)


def vm_memory(seed: int, n: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pages = text_pages(rng, n)
    pages[rng.random(n) < 0.3] = 0
    return pages


def send(enc: HdeEncoder, dec: HdeDecoder, pages: np.ndarray, block: str = "pc.ram") -> int:
    total = 0
    for i in range(0, pages.shape[0], 128):
        b = batch(block, range(i, min(i + 128, pages.shape[0])), pages[i : i + 128])
        wire = enc.encode(b)
        assert dec.decode(wire) == b
        total += len(wire)
    return total


def test_resent_vm_uses_its_previous_copy(tmp_path: Path) -> None:
    old = vm_memory(1)
    new = old.copy()
    new[::50, :64] = 9  # some pages changed since the copy was taken
    with BaselineStore(tmp_path, HASHER) as store:
        for i in range(0, old.shape[0], 128):
            store.add_batch("vm1", batch("pc.ram", range(i, i + 128), old[i : i + 128]))
        summary = BaselineSummary.from_bytes(store.summary("vm1").to_bytes())  # as sent over the wire
        enc = HdeEncoder(HASHER, LIM, baseline=BaselineView(summary))
        with_base = send(enc, HdeDecoder(LIM, baseline=store.session("vm1")), new)
        plain = send(HdeEncoder(HASHER, LIM), HdeDecoder(LIM), new)
    kinds = enc.stats.pages_by_kind
    changed = int(new[::50].any(axis=1).sum())
    assert kinds[PageKind.BASE_SAME_ADDR] == int(new.any(axis=1).sum()) - changed
    assert with_base * 10 < plain


def both_hold_a_copy(
    tmp_path: Path, *, seed: int
) -> tuple[np.ndarray, np.ndarray, BaselineStore, BaselineStore]:
    """A VM's memory recorded as the same copy on two hosts, and that memory with every 10th page changed."""
    old = vm_memory(seed)
    new = old.copy()
    new[::10, 100:164] = 5
    receiver = BaselineStore(tmp_path / "receiver", HASHER)
    sender = BaselineStore(tmp_path / "sender", HASHER)
    for store in (receiver, sender):
        store.add_batch("vm1", batch("pc.ram", range(old.shape[0]), old))
    return old, new, receiver, sender


def test_changed_pages_go_as_deltas_against_the_receivers_copy(tmp_path: Path) -> None:
    """The sender holds the same copy as the receiver (the VM came from there): deltas against it."""
    old, new, receiver, sender = both_hold_a_copy(tmp_path, seed=7)
    summary = receiver.summary("vm1")
    plain_base = HdeEncoder(HASHER, LIM, baseline=BaselineView(summary))
    without = send(plain_base, HdeDecoder(LIM, baseline=receiver.session("vm1")), new)
    enc = HdeEncoder(HASHER, LIM, baseline=BaselineView(summary), peer_copy=sender.session("vm1"))
    with_delta = send(enc, HdeDecoder(LIM, baseline=receiver.session("vm1")), new)
    changed = int(old[::10].any(axis=1).sum())  # pages that were zero have no copy to delta against
    assert enc.stats.pages_by_kind[PageKind.BASE_DELTA] == changed
    assert with_delta * 3 < without
    receiver.close()
    sender.close()


class CountingHasher(DefaultPageHasher):
    def __init__(self) -> None:
        super().__init__(KEY)
        self.tagged = 0

    def tags(self, pages: np.ndarray) -> np.ndarray:
        self.tagged += pages.shape[0]
        return super().tags(pages)


def test_sender_holding_the_same_copy_compares_bytes_not_tags(tmp_path: Path) -> None:
    """Unchanged pages are found by comparing bytes with the sender's own copy (no keyed hash of each
    page); pages its copy lacks or holds differently are still decided by their tags."""
    old = vm_memory(11)
    new = old.copy()
    new[::10, 100:164] = 5
    receiver = BaselineStore(tmp_path / "receiver", HASHER)
    sender = BaselineStore(tmp_path / "sender", HASHER)
    receiver.add_batch("vm1", batch("pc.ram", range(old.shape[0]), old))
    differs = old.copy()
    differs[3::16, :8] = 77  # where the sender's copy is not the receiver's: tags must decide
    sender.add_batch("vm1", batch("pc.ram", range(old.shape[0]), differs))
    hasher = CountingHasher()
    enc = HdeEncoder(
        hasher, LIM, baseline=BaselineView(receiver.summary("vm1")), peer_copy=sender.session("vm1")
    )
    send(enc, HdeDecoder(LIM, baseline=receiver.session("vm1")), new)
    unchanged = (new == old).all(axis=1) & old.any(axis=1)
    assert enc.stats.pages_by_kind[PageKind.BASE_SAME_ADDR] == int(unchanged.sum())
    not_same_copy = np.zeros(old.shape[0], dtype=bool)
    not_same_copy[3::16] = True
    assert hasher.tagged == int((not_same_copy & old.any(axis=1)).sum())
    receiver.close()
    sender.close()


def test_sibling_content_is_referenced_with_tags(tmp_path: Path) -> None:
    sibling = vm_memory(2)
    mine = sibling.copy()
    mine[5::7] = text_pages(np.random.default_rng(9), mine[5::7].shape[0])  # private pages
    order = np.random.default_rng(3).permutation(mine.shape[0])
    mine = mine[order]  # same content at other addresses
    with BaselineStore(tmp_path, HASHER) as store:
        store.add_content(sibling)
        enc = HdeEncoder(HASHER, LIM, baseline=BaselineView(store.summary("vm2")))
        send(enc, HdeDecoder(LIM, baseline=store.session("vm2")), mine)
    shared = np.count_nonzero(sibling.any(axis=1)) * 6 / 7
    assert enc.stats.pages_by_kind[PageKind.BASE_CONTENT] > 0.8 * shared


def test_store_persists_dedups_and_keeps_its_index_small(tmp_path: Path) -> None:
    pages = vm_memory(4, 2048)
    with BaselineStore(tmp_path, HASHER) as store:
        written = store.add_batch("vm", batch("pc.ram", range(2048), pages))
        again = store.add_batch("other", batch("pc.ram", range(2048), pages))
        assert written == store.records
        assert again == 0  # equal content is stored once
    with BaselineStore(tmp_path, HASHER) as store:
        assert store.records == written
        summary = store.summary("vm")
        described = store.described_bytes()
        assert store.index_bytes() <= 0.01 * described
        assert summary.nbytes <= 0.01 * pages.nbytes
        nonzero = np.flatnonzero(pages.any(axis=1))
        got = store.session("vm").same_address("pc.ram", nonzero.astype(np.uint64), seq=0)
        assert np.array_equal(got, pages[nonzero])


def test_reads_come_from_disk_after_reopening_and_reject_unknown_records(tmp_path: Path) -> None:
    pages = vm_memory(5, 2048)
    with BaselineStore(tmp_path, HASHER) as store:
        store.add_batch("vm", batch("pc.ram", range(2048), pages))
    with BaselineStore(tmp_path, HASHER) as store:
        nonzero = np.flatnonzero(pages.any(axis=1)).astype(np.uint64)
        got = store.session("vm").same_address("pc.ram", nonzero, seq=0)
        assert np.array_equal(got, pages[nonzero.astype(np.int64)])
        with pytest.raises(BaselineStoreError):
            store.read(np.array([store.records], dtype=np.int32))


def test_store_respects_its_record_limit(tmp_path: Path) -> None:
    limits = BaselineLimits(max_records=100)
    with BaselineStore(tmp_path, HASHER, limits) as store:
        store.add_content(text_pages(np.random.default_rng(6), 300))
        assert store.records == 100
        assert store.skipped_pages == 200


def test_a_receiver_holding_the_senders_copy_names_it_by_digest(tmp_path: Path) -> None:
    """Both hosts recorded the same memory: the summary carries a 32-byte digest instead of 20 bytes per
    address, and the sender, putting its own copy's tags in its place, encodes exactly as with the list."""
    _, new, receiver, sender = both_hold_a_copy(tmp_path, seed=21)
    own_tags, own_session = sender.own_copy("vm1")
    digest = copy_digest(own_tags)
    assert len(digest) == 32
    full = receiver.summary("vm1")
    named = BaselineSummary.from_bytes(receiver.summary("vm1", digest).to_bytes())
    assert named.copy == {} and named.copy_digest == digest
    assert np.array_equal(named.content_fps, full.content_fps)
    addresses = full.copy["pc.ram"].index.shape[0]
    assert len(full.to_bytes()) - len(named.to_bytes()) >= 20 * addresses - 32
    # A digest of some other copy gets the full list.
    other = receiver.summary("vm1", bytes(31) + b"\x01")
    assert other.copy_digest == b"" and other.copy.keys() == full.copy.keys()

    resolved = BaselineSummary(copy=own_tags, content_fps=named.content_fps)
    outputs = []
    for summary in (full, resolved):
        enc = HdeEncoder(HASHER, LIM, baseline=BaselineView(summary), peer_copy=own_session)
        batches = [batch("pc.ram", range(i, i + 128), new[i : i + 128]) for i in range(0, 1024, 128)]
        outputs.append([enc.encode(b) for b in batches])
    assert outputs[0] == outputs[1]
    receiver.close()
    sender.close()


def test_summary_v3_leaves_out_the_named_copys_fingerprints(tmp_path: Path) -> None:
    """A receiver naming the sender's copy lists only the fingerprints of its other content; the
    sender adds its own copy's and then encodes exactly as with the full list, moved pages included
    (found by content, not address), and the receiver decodes the result."""
    old, _, receiver, sender = both_hold_a_copy(tmp_path, seed=23)
    sibling = text_pages(np.random.default_rng(24), 64)
    receiver.add_content(sibling)
    own_tags, own_session = sender.own_copy("vm1")
    digest = copy_digest(own_tags)
    full = receiver.summary("vm1")
    v2 = receiver.summary("vm1", digest)
    raw = receiver.summary("vm1", digest, omit_copy_fps=True).to_bytes()
    v3 = BaselineSummary.from_bytes(raw)
    assert raw[3] == 3 and v3.copy_fps_omitted and v3.copy_digest == digest
    sibling_fps = np.unique(HASHER.fingerprints(sibling))
    assert np.array_equal(v3.content_fps, sibling_fps)  # the copy's pages are left out, the rest kept
    assert len(v2.to_bytes()) - len(raw) == 8 * (full.content_fps.shape[0] - sibling_fps.shape[0])
    resolved = v3.with_own_copy(own_tags, own_session.fingerprints)
    assert np.array_equal(resolved.content_fps, full.content_fps)
    assert resolved.copy.keys() == full.copy.keys()
    assert np.array_equal(resolved.copy["pc.ram"].tags, full.copy["pc.ram"].tags)

    # A v2 summary (an older receiver) already lists everything: the sender adds nothing, and does
    # not even look up its own copy's fingerprints.
    def not_needed() -> np.ndarray:
        raise AssertionError("a v2 summary lists the copy's fingerprints already")

    assert np.array_equal(
        BaselineSummary.from_bytes(v2.to_bytes()).with_own_copy(own_tags, not_needed).content_fps,
        full.content_fps,
    )

    moved = np.roll(old, 37, axis=0)  # every page at another address: only its content matches
    moved[:8] = sibling[:8]
    pages = [batch("pc.ram", range(i, i + 128), moved[i : i + 128]) for i in range(0, moved.shape[0], 128)]
    outputs = []
    for summary in (full, resolved):
        enc = HdeEncoder(HASHER, LIM, baseline=BaselineView(summary), peer_copy=own_session)
        outputs.append([enc.encode(b) for b in pages])
    assert outputs[0] == outputs[1]
    dec = HdeDecoder(LIM, baseline=receiver.session("vm1"))
    for b, wire in zip(pages, outputs[1], strict=True):
        assert dec.decode(wire).data == b.data
    assert enc.stats.pages_by_kind[PageKind.BASE_CONTENT] > moved.shape[0] // 2
    receiver.close()
    sender.close()


def test_copy_digest_changes_with_any_page_of_the_copy(tmp_path: Path) -> None:
    pages = vm_memory(22, 256)
    digests = []
    for i, variant in enumerate((pages, pages.copy())):
        if i:
            variant[np.flatnonzero(variant.any(axis=1))[-1], 4000] ^= 1  # one byte of one page
        with BaselineStore(tmp_path / str(i), HASHER) as store:
            store.add_batch("vm1", batch("pc.ram", range(256), variant))
            digests.append(copy_digest(store.own_copy("vm1")[0]))
            assert copy_digest(store.own_copy("nobody")[0]) == b""
    assert digests[0] != digests[1]


def test_summary_v2_is_checked_on_parsing() -> None:
    fps = np.array([3, 8], dtype=np.uint64)
    raw = BaselineSummary(content_fps=fps, copy_digest=b"\x07" * 32).to_bytes()
    back = BaselineSummary.from_bytes(raw)
    assert back.copy_digest == b"\x07" * 32 and np.array_equal(back.content_fps, fps)
    zero_digest = raw[:14] + bytes(32) + raw[46:]  # a 14-byte header, then the digest
    for bad in (raw[:-1], raw[:20], zero_digest):
        with pytest.raises(HdeDecodeError):
            BaselineSummary.from_bytes(bad)
    with pytest.raises(HdeConfigError):
        BaselineSummary(content_fps=fps, copy_digest=b"short").to_bytes()
    with pytest.raises(HdeConfigError, match="only a summary naming its copy"):
        BaselineSummary(content_fps=fps, copy_fps_omitted=True).to_bytes()
    v3 = BaselineSummary(content_fps=fps, copy_digest=b"\x07" * 32, copy_fps_omitted=True).to_bytes()
    assert v3[3] == 3 and BaselineSummary.from_bytes(v3).copy_fps_omitted
    for bad_version in (0, 4):
        with pytest.raises(HdeDecodeError, match="v1, v2 or v3"):
            BaselineSummary.from_bytes(v3[:3] + bytes([bad_version]) + v3[4:])
