"""``prepare``: a new run's ``--preset auto`` is chosen for the machine, printed, and
recorded in the run's config; flags given still win."""

from __future__ import annotations

import pytest

from apex_dqn.driver import prepare, session

GIB = 1 << 30


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """``prepare`` on a machine of the given (CPUs, GPUs), Ray local, in an empty directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(session, "cluster_address", lambda cfg: None)

    def on(cpus: int, gpus: int) -> None:
        monkeypatch.setattr(prepare, "_local_resources", lambda: (cpus, gpus, 8 * GIB))

    return on


def test_a_laptop_gets_the_laptop_preset_and_says_so(machine, capsys):
    machine(2, 0)
    cfg, _, _, _ = prepare.prepare([])
    assert capsys.readouterr().out.splitlines()[0] == "preset auto -> laptop: no GPU, 2 CPUs"
    assert (cfg.preset, cfg.network, cfg.batch_size, cfg.num_actors) == ("laptop", "dqn2013", 32, 1)
    cfg, _, _, _ = prepare.prepare(["--network", "nature", "--batch-size", "64"])
    assert (cfg.preset, cfg.network, cfg.batch_size, cfg.num_actors) == ("laptop", "nature", 64, 1)


def test_a_gpu_machine_gets_the_defaults(machine, capsys):
    machine(16, 1)
    cfg, _, _, _ = prepare.prepare([])
    assert capsys.readouterr().out.splitlines()[0].startswith("preset auto -> none: 1 GPU")
    assert (cfg.preset, cfg.network, cfg.device, cfg.batch_size) == ("none", "nature", "cuda", 512)
    assert cfg.num_actors == 15


def test_a_cluster_joined_gets_the_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(session, "cluster_address", lambda cfg: "10.0.0.1:6379")
    cfg, _, address, _ = prepare.prepare(["--address", "10.0.0.1:6379"])
    assert address == "10.0.0.1:6379"
    assert capsys.readouterr().out.startswith("preset auto -> none: a Ray cluster joined")
    assert (cfg.preset, cfg.network, cfg.num_actors) == ("none", "nature", 0)  # sized there
