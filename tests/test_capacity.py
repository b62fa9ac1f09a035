"""The sizing model of ``benchmarks.capacity`` as pure functions, its command line, and a
``--quick`` run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest

from apex_dqn.benchmarks.capacity import Cluster, Costs, main, predict, shard_load
from apex_dqn.benchmarks.capacity_check import (
    compare,
    cross_node_bytes,
    given,
    placement,
    steady_rates,
)
from apex_dqn.benchmarks.capacity_check import main as check_main
from apex_dqn.benchmarks.train_run import ROOT
from apex_dqn.common.config import BYTES_PER_TRANSITION

# Round per-core figures, of the size measured on a 2-core x86 machine.
COSTS = Costs(
    actor_steps_per_core=1_000.0,
    insert_s=5e-6,
    sample_s={"raw": 1e-5, "frames": 8e-6, "zstd": 1.5e-5},
    decode_s={"raw": 1e-7, "frames": 4e-6, "zstd": 5e-6},
    learner_samples_per_core=500.0,
    push_bytes=7_200.0,
    wire_bytes={"raw": 56_500.0, "frames": 30_000.0, "zstd": 500.0},
    update_bytes=12.0,
    param_bytes=13_000_000,
)


@pytest.mark.parametrize(
    "cluster, first, limited_by",
    [
        # 256k transitions/s produced, 100k sampled at target 1: the learner is short.
        (Cluster(actors=256, link_gbps=100), "learner", "learner"),
        (Cluster(actors=256, link_gbps=100, wire="zstd"), "learner", "learner"),
        # 8k produced for a learner wanting 100k: the actors are short.
        (Cluster(actors=8), "actors", "learner"),
        # One shard for 64k inserts and 100k samples of zstd: 0.32 + 1.5 cores.
        (Cluster(actors=64, shards=1, link_gbps=100, wire="zstd"), "shards", "shards"),
        # Stacked batches across nodes: 100k x 56.5 kB into the learner's 1.25 GB/s.
        (
            Cluster(actors=256, placement="spread", wire="raw"),
            "network: learner node in",
            "network",
        ),
        # The same cluster with compressed batches: 50 MB/s, and the learner is short again.
        (Cluster(actors=256, placement="spread", wire="zstd"), "learner", "learner"),
        # A learner of 400k samples/s: its one thread decodes 200k compressed ones a second.
        (
            Cluster(
                actors=512,
                shards=32,
                learner_samples_per_s=400_000,
                placement="spread",
                wire="zstd",
                link_gbps=100,
            ),
            "learner decode",
            "learner decode",
        ),
    ],
)
def test_what_saturates_first(cluster: Cluster, first: str, limited_by: str):
    p = predict(COSTS, cluster)
    assert p.saturates_first == first
    assert p.utilisation[first] == max(p.utilisation.values())
    assert p.limited_by == limited_by
    assert p.utilisation["learner"] * p.utilisation["actors"] == pytest.approx(1.0)


def test_equations_of_a_spread_cluster():
    k = Cluster(actors=100, shards=4, learner_samples_per_s=50_000, link_gbps=8,
                replay_capacity=1_000_000, placement="spread", wire="zstd")  # fmt: skip
    p = predict(COSTS, k)
    insert, sample = 100 * 1_000.0, 50_000.0
    assert p.insert_per_s == insert and p.sample_per_s == sample
    assert p.replay_ratio == pytest.approx(0.5)
    assert p.shard_cores == pytest.approx((insert * 5e-6 + sample * 1.5e-5) / 4)
    assert p.shard_cores == pytest.approx(shard_load(COSTS, k, insert, sample))
    assert p.shards_needed == math.ceil(insert * 5e-6 + sample * 1.5e-5)  # 1.25 cores: 2
    assert p.replay_memory_bytes == 1_000_000 * BYTES_PER_TRANSITION + 4 * (256 << 20)
    assert p.learner_decode_cores == pytest.approx(sample * 5e-6)
    shard, learner = p.network["each shard node"], p.network["learner node"]
    assert shard["in"] == pytest.approx(insert / 4 * 7_200 + sample / 4 * 12)
    assert shard["out"] == pytest.approx(sample / 4 * 500)
    assert learner["in"] == pytest.approx(sample * 500)
    # Weights: 7 nodes of actors, each fetching every version the learner publishes
    # (50k / (512 * 25) = 3.9/s), fewer than an actor checks (1000 / (16 * 100) = 0.6/s).
    fetches = min(50_000 / (512 * 25), 1_000 / (16 * 100))
    assert learner["out"] == pytest.approx(sample * 12 + 7 * 13_000_000 * fetches)
    assert p.utilisation["network: learner node in"] == pytest.approx(sample * 500 / 1e9)


def test_learner_placement_keeps_samples_off_the_network():
    p = predict(COSTS, Cluster(actors=100, placement="learner", wire="raw"))
    assert set(p.network) == {"learner node"}
    assert p.network["learner node"]["in"] == pytest.approx(100 * 1_000.0 * 7_200)


def test_inserts_beyond_the_link_are_not_made():
    # 256k x 7.2 kB = 1.84 GB/s of pushes into one 10 Gbit/s link at the learner's node.
    p = predict(COSTS, Cluster(actors=256, placement="learner"))
    assert p.produced_per_s == 256_000
    assert p.insert_per_s == pytest.approx(1.25e9 / 7_200)
    assert p.insert_limited_by == "network"
    assert p.replay_ratio == pytest.approx(p.sample_per_s / p.insert_per_s)


def test_shards_needed_covers_the_load():
    k = Cluster(actors=256, shards=1, link_gbps=100)
    p = predict(COSTS, k)
    more = predict(COSTS, Cluster(actors=256, shards=p.shards_needed, link_gbps=100))
    assert p.utilisation["shards"] > 1 >= more.utilisation["shards"]
    assert more.limited_by == "learner"


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--actors", "0"], "--actors"),
        (["--shards", "many"], "--shards"),
        (["--link-gbps", "-1"], "--link-gbps"),
        (["--wire", "lz4"], "lz4"),
        (["--replay-placement", "anywhere"], "anywhere"),
        (["--cores", "-1"], "--cores"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(argv, names, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0] and "error" in err[0]


def test_costs_from_a_previous_run(tmp_path, capsys):
    saved = tmp_path / "run.txt"
    saved.write_text("a table line\n" + json.dumps({"costs": asdict(COSTS)}) + "\n")
    out = main(["--costs", str(saved), "--actors", "8", "--wire", "raw"])
    assert out["costs"] == asdict(COSTS)
    assert out["prediction"] == asdict(predict(COSTS, Cluster(actors=8, wire="raw")))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cluster"]["actors"] == 8


@pytest.mark.parametrize(
    "text, argv_extra, names",
    [
        (None, [], "cannot read"),
        ("not json\n", [], "not this tool's JSON line"),
        ('{"costs": {"actor_steps_per_core": 1}}\n', [], "not this tool's JSON line"),
        ("{}\n", ["--compare"], "--compare"),
    ],
)
def test_bad_costs_file_gives_one_line_and_status_2(tmp_path, capsys, text, argv_extra, names):
    path = tmp_path / "costs.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["--costs", str(path), *argv_extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0]


@pytest.mark.ray
@pytest.mark.rom
@pytest.mark.slow
def test_quick_run_prints_the_documented_json():
    proc = subprocess.run(
        [sys.executable, "-m", "apex_dqn.benchmarks.capacity", "--quick", "--actors", "64",
         "--replay-placement", "spread", "--wire", "zstd"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) >= {"costs", "measured", "cluster", "prediction", "cpus", "quick"}
    costs = out["costs"]
    assert costs["actor_steps_per_core"] > 0 and costs["learner_samples_per_core"] > 0
    assert 7_056 < costs["push_bytes"] < 7_056 + 400  # one new frame and its fields
    assert set(costs["wire_bytes"]) == {"raw", "frames", "zstd"}
    assert costs["wire_bytes"]["zstd"] < costs["wire_bytes"]["frames"] < costs["wire_bytes"]["raw"]
    pred = out["prediction"]
    for key in ("insert_per_s", "sample_per_s", "replay_ratio", "saturates_first",
                "shards_needed", "replay_memory_bytes", "network", "utilisation"):  # fmt: skip
        assert key in pred
    assert pred["saturates_first"] in pred["utilisation"]
    assert pred["replay_ratio"] == pytest.approx(pred["sample_per_s"] / pred["insert_per_s"], 1e-3)
    assert set(pred["network"]) == {"learner node", "each shard node"}
    assert out["cluster"]["actors"] == 64 and out["quick"] is True
    assert "saturates first" in proc.stdout


def test_cores_shared_on_one_machine_scale_actors_and_learner_alike():
    k = Cluster(actors=2, shards=1, learner_samples_per_s=500.0, wire="raw")
    alone, shared = predict(COSTS, k), predict(COSTS, Cluster(**{**asdict(k), "cores": 2.0}))
    # The shard needs (2,000 x 5e-6 + 500 x 1e-5) = 0.015 cores; the rest goes to 3 processes.
    share = (2.0 - 0.015) / 3
    assert alone.core_share == 1.0 and shared.core_share == pytest.approx(share)
    assert shared.insert_per_s == pytest.approx(alone.insert_per_s * share)
    assert shared.sample_per_s == pytest.approx(alone.sample_per_s * share)
    assert predict(COSTS, Cluster(**{**asdict(k), "cores": 64.0})).core_share == 1.0


def _series(points: list[tuple[float, float]], frames_per_s: float) -> list:
    """(wall_time, step, value) with step = env frames at ``frames_per_s`` from t=0."""
    return [(t, int(t * frames_per_s), v) for t, v in points]


def test_steady_rates_are_taken_after_the_learner_starts():
    fps = 4_000.0  # 1,000 transitions/s
    updates = _series([(0, 0), (5, 0), (10, 20), (15, 120), (20, 220), (25, 320)], fps)
    added = _series([(t, 100 * t) for t in (0, 5, 10, 15, 20, 25)], fps)
    rates = steady_rates({"charts/learner_updates": updates, "replay/added": added}, batch=32)
    # The window runs from the log after the first update (t=15) to the last (t=25).
    assert rates["window_s"] == 10
    assert rates["updates_per_s"] == pytest.approx(20.0)
    assert rates["samples_per_s"] == pytest.approx(640.0)
    assert rates["transitions_per_s"] == pytest.approx(1_000.0)
    assert rates["inserts_per_s"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="run longer"):
        steady_rates({"charts/learner_updates": updates[:4]}, batch=32)


def test_measured_and_predicted_are_set_side_by_side():
    k = Cluster(actors=2, shards=2, learner_samples_per_s=500.0, placement="spread", wire="zstd",
                actors_per_node=1, batch_size=32, envs_per_actor=8, cores=2.0)  # fmt: skip
    p = predict(COSTS, k)
    measured = {"transitions_per_s": 800.0, "samples_per_s": 320.0, "updates_per_s": 10.0,
                "inserts_per_s": 790.0, "cores": {"actor": [0.7, 0.5], "learner": [0.9]},
                "loopback_bytes_per_s": 5e6,
                "nodes": {"learner": "h", "actor 0": "a", "actor 1": "h", "shard 0": "h",
                          "shard 1": "b"}}  # fmt: skip
    rows = compare(measured, {"shared": p}, batch=32)["shared"]
    assert set(rows) == {"transitions_per_s", "samples_per_s", "updates_per_s",
                         "inserts_per_s", "actor_cores_each", "learner_cores_each"}  # fmt: skip
    assert rows["transitions_per_s"]["ratio"] == pytest.approx(800.0 / p.insert_per_s)
    assert rows["updates_per_s"]["predicted"] == pytest.approx(p.sample_per_s / 32)
    assert rows["actor_cores_each"]["measured"] == pytest.approx(0.6)
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rows.values())
    # Across nodes: actor 0 (node a) pushes to shard 0 (node h); actor 1 (h) to shard 1 (b);
    # shard 1 is off the learner's node; actor node a fetches weights.
    bytes_ = cross_node_bytes(COSTS, k, measured)
    assert bytes_["pushes"] == pytest.approx(2 * 400.0 * 7_200)
    assert bytes_["samples"] == pytest.approx(160.0 * (500 + 12))
    fetches = min(10.0 / 25, 1_000 / (8 * 100))
    assert bytes_["weights"] == pytest.approx(13_000_000 * fetches)
    assert bytes_["ratio"] == pytest.approx(5e6 / bytes_["predicted"])
    assert placement(["learner: pid 3 on 1.2.3.4 node abc (cpu)",
                      "actor 0: pid 4 node def ip 1.2.3.4 epsilon 0.4"]) == {
        "learner": "abc", "actor 0": "def"}  # fmt: skip


def test_given_cores_check_the_per_core_costs_alone():
    measured = {"transitions_per_s": 900.0, "samples_per_s": 400.0,
                "cores": {"actor": [0.5, 0.4], "learner": [0.5]}}  # fmt: skip
    rows = given(COSTS, measured, batch=32)
    assert rows["transitions_per_s"]["predicted"] == pytest.approx(0.9 * 1_000.0)
    assert rows["transitions_per_s"]["ratio"] == pytest.approx(1.0)
    assert rows["samples_per_s"]["predicted"] == pytest.approx(0.5 * 500.0)
    assert rows["samples_per_s"]["ratio"] == pytest.approx(400.0 / 250.0)


@pytest.mark.parametrize("argv", [["--runs", "foo"], ["--seconds", "0"], ["--actors", "0"]])
def test_bad_check_arguments_give_one_line_and_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        check_main(argv)  # refused before anything is measured or started
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and argv[0] in err[0]
