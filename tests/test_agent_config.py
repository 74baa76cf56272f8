"""The agent's configuration: defaults, shorthands, and errors that name the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from novacron.agent.config import AgentConfigError, load_config, parse_config, render_config
from novacron.agent.daemon import migration_config, read_cluster_key, write_cluster_key
from novacron.migration.datapath import DataPathKind


def base(**over: object) -> dict[str, object]:
    data: dict[str, object] = {"node_id": "hosta", "state_dir": "/tmp/x"}
    data.update(over)
    return data


def test_defaults_and_derived_paths() -> None:
    cfg = parse_config(
        base(peers={"hostb": "10.0.0.2:7400", "hostc": {"address": "[fd00::3]:7400", "link_mbit": 100}})
    )
    assert cfg.pki == Path("/tmp/x/pki") and cfg.cluster_key_path == Path("/tmp/x/pki/cluster.key")
    assert cfg.api_socket == Path("/tmp/x/api.sock")
    assert cfg.peers["hostb"].host_port == ("10.0.0.2", 7400)
    assert cfg.peers["hostc"].host_port == ("fd00::3", 7400) and cfg.peers["hostc"].link_mbit == 100
    mc = migration_config(cfg)
    assert (mc.max_incoming, mc.max_outgoing, mc.default_max_downtime_ms) == (2, 2, 300)
    assert mc.datacenter_path is DataPathKind.DIRECT and mc.timeouts.deadline_s == 600


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (base(node_id="bad id!"), "node_id", "node id"),
        (base(peers={"hostb": "10.0.0.2"}), "peers.hostb.address", "host:port"),
        (base(peers={"hostb": "10.0.0.2:99999"}), "peers.hostb.address", "out of range"),
        (base(peers={"hosta": "10.0.0.2:7400"}), "config", "must not list this node"),
        (base(migration={"max_incoming": 0}), "migration.max_incoming", "greater than or equal to 1"),
        (base(migration={"datacenter_path": "carrier-pigeon"}), "migration.datacenter_path", "direct"),
        (base(listen={"api_tls_cert": "/c.pem"}), "listen", "go together"),
        (base(surprise=1), "surprise", "Extra inputs"),
    ],
)
def test_errors_name_the_field(data: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(AgentConfigError) as exc:
        parse_config(data)
    assert exc.value.context["field"] == field
    assert words in str(exc.value)


def test_file_round_trip_and_bad_toml(tmp_path: Path) -> None:
    cfg = parse_config(
        base(peers={"hostb": "10.0.0.2:7400"}, migration={"max_incoming": 3, "timeouts": {"verify_s": 12}})
    )
    path = tmp_path / "agent.toml"
    path.write_text(render_config(cfg))
    assert load_config(path) == cfg
    path.write_text("node_id = ")
    with pytest.raises(AgentConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(AgentConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_cluster_key_file(tmp_path: Path) -> None:
    assert read_cluster_key(tmp_path / "none") is None
    key = write_cluster_key(tmp_path / "k")
    assert os.stat(key).st_mode & 0o777 == 0o600 and len(read_cluster_key(key) or b"") == 32
    with pytest.raises(FileExistsError):
        write_cluster_key(key)
    os.chmod(key, 0o644)
    with pytest.raises(AgentConfigError, match="readable by others"):
        read_cluster_key(key)
    bad = tmp_path / "bad"
    bad.write_text("abcd")
    os.chmod(bad, 0o600)
    with pytest.raises(AgentConfigError, match="32 bytes"):
        read_cluster_key(bad)
