"""The data-path cost model and the source's plan, in virtual numbers (no links, no QEMU)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from novacron.dwcp.mode import Mode
from novacron.migration.context import MigrationConfig, MigrationHost, MigrationRequest
from novacron.migration.datapath import DataPathKind as K
from novacron.migration.errors import MigrationInputError
from novacron.migration.pathcost import Codec, LinkView, PathCosts, candidates, choose_path
from novacron.migration.planning import choose_plan, link_view

ALL = frozenset({K.TUNNEL, K.DIRECT, K.PASSTHROUGH})
NO_KEY = frozenset({K.DIRECT, K.PASSTHROUGH})
COSTS = PathCosts()


def pick(
    bps: float, rtt: float | None, cores: float = 1.0, kinds: frozenset[K] = ALL, costs: PathCosts = COSTS
) -> str:
    choice = choose_path(LinkView(bps, rtt, cores), costs, kinds)
    assert choice is not None
    return choice.best.label


def test_the_issue_links_with_one_spare_core() -> None:
    # 100 Mbit/s: every path is link-bound; HDE's ratio (4.27) beats QEMU zstd-1's (2.91).
    assert pick(100e6, 0.05) == "tunnel"
    # 1 Gbit/s: the tunnel is CPU-bound near 105 MB/s, QEMU's C zstd near 240 MB/s.
    assert pick(1e9, 0.01) == "direct+zstd"
    # Unshaped: QEMU's TLS alone is the cheapest way to move bytes.
    assert pick(10e9, 0.0002) == "direct"


def test_rates_follow_the_figures() -> None:
    c = {x.label: x for x in candidates(LinkView(100e6, 0.05, 1.0), COSTS, ALL)}
    assert c["tunnel"].rate == pytest.approx(12.5e6 * 4.27) and c["tunnel"].bound == "link"
    assert c["direct+zstd"].rate == pytest.approx(12.5e6 * 2.91)
    c = {x.label: x for x in candidates(LinkView(1e9, 0.01, 1.0), COSTS, ALL)}
    assert c["tunnel"].bound == "cpu" and c["tunnel"].ratio == 2.94  # the fast HDE point wins there
    assert c["direct+zstd"].rate == pytest.approx(1 / (1 / 263e6 + 1 / (2.91 * 1000e6)))


def test_more_cpu_or_a_faster_encoder_moves_the_crossover() -> None:
    fast = PathCosts(hde_fast=Codec(2.99, 800e6), tunnel_wire_bytes_per_cpu_s=400e6)
    assert pick(1e9, 0.01, costs=fast) == "tunnel"
    # With no spare core at all (floor 0.5) even 100 Mbit/s is CPU-bound for HDE's dense point.
    assert pick(100e6, 0.05, cores=0.5) == "tunnel"
    assert pick(20e6, 0.2, cores=0.5) == "tunnel"


def test_without_the_tunnel_qemu_compresses_on_slow_links() -> None:
    assert pick(100e6, 0.05, kinds=NO_KEY) == "direct+zstd"
    assert pick(10e9, 0.0002, kinds=NO_KEY) == "direct"
    assert choose_path(LinkView(1e9, 0.01, 1), COSTS, frozenset({K.PASSTHROUGH})) is None


def test_a_near_tie_goes_to_fewer_link_bytes() -> None:
    # 1 GB/s everywhere: tunnel and direct+zstd CPU-bound, plain direct link-bound; the tunnel sends
    # the fewest bytes. With no margin the strictly fastest (QEMU's zstd, 1 % faster) wins.
    even = PathCosts(
        hde_fast=Codec(3.5, 1e9), hde_dense=Codec(3.6, 1e9), tunnel_wire_bytes_per_cpu_s=1e12,
        qemu_zstd=Codec(2.9, 1.01e9), qemu_tls_bytes_per_cpu_s=1e12, tunnel_max_cores=4,
    )  # fmt: skip
    assert pick(8e9, None, costs=even) == "tunnel"
    strict = PathCosts(**{**even.__dict__, "tie_margin": 0.0})
    assert pick(8e9, None, costs=strict) == "direct+zstd"


def test_the_window_bounds_long_fat_links() -> None:
    c = {x.label: x for x in candidates(LinkView(10e9, 0.2, 8.0), COSTS, ALL)}
    assert c["direct"].rate == pytest.approx(4 * (6 << 20) / 0.2)


def test_link_view_from_what_the_session_knows() -> None:
    v = link_view(hint_bps=50e6, measured_bps=900e6, rtt_s=0.0001, guest_vcpus=1, host_cores=2)
    assert v.bandwidth_bps == 50e6 and v.spare_cores == 1
    v = link_view(hint_bps=None, measured_bps=3e6, rtt_s=0.0003, guest_vcpus=1, host_cores=2)
    assert v.bandwidth_bps == 10e9  # an idle session's goodput says little; a LAN RTT says more
    assert (
        link_view(hint_bps=None, measured_bps=None, rtt_s=0.011, guest_vcpus=4, host_cores=2).bandwidth_bps
        == 1e9
    )
    v = link_view(hint_bps=None, measured_bps=300e6, rtt_s=0.05, guest_vcpus=4, host_cores=2)
    assert v.bandwidth_bps == 300e6 and v.spare_cores == 0.5
    assert link_view(hint_bps=None, measured_bps=None, rtt_s=None, guest_vcpus=1).bandwidth_bps == 100e6
    with pytest.raises(MigrationInputError):
        LinkView(0, 0.01, 1)
    with pytest.raises(MigrationInputError):
        Codec(0.5, 1e6)


def host() -> MigrationHost:
    return cast(MigrationHost, SimpleNamespace(config=MigrationConfig()))  # choose_plan reads config only


def test_plan_precedence() -> None:
    wan = LinkView(100e6, 0.05, 1)
    fast = LinkView(1e9, 0.01, 1)
    auto = MigrationRequest("vm", "b")
    assert choose_plan(Mode.INTERNET, auto, ALL, host(), link=wan).kind is K.TUNNEL
    plan = choose_plan(Mode.HYBRID, auto, ALL, host(), link=fast)
    assert (plan.kind, plan.compression, plan.multifd_channels) == (K.DIRECT, "zstd", 4)
    # A forced mode keeps its path; so does an explicit path; post-copy takes the direct path.
    forced = MigrationRequest("vm", "b", mode=Mode.HYBRID)
    assert choose_plan(Mode.HYBRID, forced, ALL, host(), link=fast).kind is K.TUNNEL
    asked = MigrationRequest("vm", "b", data_path=K.PASSTHROUGH)
    assert choose_plan(Mode.INTERNET, asked, ALL, host(), link=wan).kind is K.PASSTHROUGH
    post = choose_plan(Mode.INTERNET, MigrationRequest("vm", "b", allow_postcopy=True), ALL, host(), link=wan)
    assert (post.kind, post.multifd_channels, post.compression) == (K.DIRECT, 0, "none")
    # Unknown link: the mode decides, as before.
    assert choose_plan(Mode.DATACENTER, auto, ALL, host()).kind is K.DIRECT
    assert choose_plan(Mode.INTERNET, auto, NO_KEY, host()).kind is K.DIRECT
    with pytest.raises(MigrationInputError, match="cannot run the tunnel"):
        choose_plan(Mode.INTERNET, MigrationRequest("vm", "b", data_path=K.TUNNEL), NO_KEY, host())
