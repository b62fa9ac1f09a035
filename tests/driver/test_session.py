"""Which Ray cluster a run joins: the address given, RAY_ADDRESS, or the one `ray start`
recorded on this machine, and ``auto`` never anything else (no Ray processes start here)."""

from __future__ import annotations

import pytest
import ray._private.services as services

from apex_dqn.common.config import Config, ConfigError
from apex_dqn.driver import session


@pytest.fixture
def ray_tmp(tmp_path, monkeypatch):
    """Ray's temp directory of this test alone: `ray start` records its cluster here."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray"


def _record(ray_tmp, address: str, running: bool, monkeypatch) -> None:
    (ray_tmp / "ray_current_cluster").write_text(address + "\n")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: {address} if running else set())


def test_an_address_given_is_joined_as_given(ray_tmp, monkeypatch):
    _record(ray_tmp, "127.0.0.1:6390", True, monkeypatch)
    assert session.cluster_address(Config(address="10.0.0.5:6379")) == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.6:6379")
    assert session.cluster_address(Config()) == "10.0.0.6:6379"
    assert session.cluster_address(Config(address="auto")) == "10.0.0.6:6379"


def test_auto_and_no_address_join_the_cluster_ray_start_recorded(ray_tmp, monkeypatch):
    _record(ray_tmp, "127.0.0.1:6390", True, monkeypatch)
    assert session.cluster_address(Config(address="auto")) == "127.0.0.1:6390"
    assert session.cluster_address(Config()) == "127.0.0.1:6390"


def test_a_stopped_cluster_is_not_joined(ray_tmp, monkeypatch):
    """Without an address a local Ray starts; with auto the run ends in one line, even
    where another Ray runs on the machine (Ray's own auto would join that one)."""
    _record(ray_tmp, "127.0.0.1:6390", False, monkeypatch)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: {"192.0.2.9:6379"})
    assert session.cluster_address(Config()) is None
    with pytest.raises(ConfigError, match=r"^--address auto: no Ray cluster started by `ray"):
        session.cluster_address(Config(address="auto"))


def test_auto_with_nothing_recorded_names_where_it_looked(ray_tmp):
    with pytest.raises(ConfigError) as error:
        session.cluster_address(Config(address="auto"))
    assert str(ray_tmp / "ray_current_cluster") in str(error.value)
    assert "\n" not in str(error.value)
