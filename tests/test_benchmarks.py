"""Each benchmark runs end to end at a tiny size and prints one JSON line last.

The figures themselves are for quiet machines (see README "Performance"); these runs
only check that the benchmarks work and report what they name.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from apex_dqn.benchmarks.train_run import ROOT


def _run(module: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.ray
@pytest.mark.rom
@pytest.mark.slow
def test_actor_benchmark():
    out = _run("apex_dqn.benchmarks.actor", "--envs", "4", "--seconds", "2", "--rounds", "2",
               "--network", "dqn2013")  # fmt: skip
    assert out["raw_steps_per_s"] > 0 and out["actor_steps_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["actor_steps_per_s"] / out["raw_steps_per_s"], 1e-2)
    assert out["envs"] == 4 and out["threads"] == 1
    assert out["transitions_stored"] > 0
    for part in ("env", "inference", "nstep", "push", "weights"):
        assert out[f"ms_per_step_{part}"] >= 0
    assert out["ms_per_step_env"] > 0 and out["ms_per_step_inference"] > 0


@pytest.mark.rom  # the wire figures are measured on Space Invaders' frames
@pytest.mark.slow
def test_replay_benchmark():
    out = _run("apex_dqn.benchmarks.replay", "--quick", "--no-ray")
    assert out["bytes_per_transition"] < out["naive_bytes_per_transition"]
    assert out["insert_per_s"] > 0 and out["sample512_ms"] > 0
    # Bytes on the wire per sampled transition: the stacked batch's 8 frames (56,448 B)
    # and a little metadata; fewer distinct frames; those compressed, on real screens.
    wire = out["wire_bytes_per_sampled_transition"]
    assert set(wire) == {"raw", "frames", "zstd"}
    assert 8 * 84 * 84 < wire["raw"] < 8 * 84 * 84 + 200
    distinct = out["wire_distinct_frames_per_transition"]
    assert 1 <= distinct <= 7 + 1e-9  # n = 3: a stack and its bootstrap share a frame
    assert wire["frames"] == pytest.approx(distinct * 84 * 84, abs=200)
    assert out["wire_frames"] == "space_invaders random play"
    assert wire["zstd"] < wire["frames"] / 10
    assert out["meets_targets"]["wire_zstd_bytes_per_transition"] is True
    for name in ("wire_encode512_ms", "wire_decode512_ms"):
        assert set(out[name]) == set(wire) and all(v > 0 for v in out[name].values())


@pytest.mark.slow
def test_learner_benchmark_without_ray():
    out = _run(
        "apex_dqn.benchmarks.learner",
        "--local",
        "--network",
        "dqn2013",
        "--batch-size",
        "8",
        "--capacity",
        "2000",
        "--seconds",
        "2",
        "--rounds",
        "2",
    )
    assert out["synthetic_updates_per_s"] > 0 and out["pipeline_updates_per_s"] > 0
    assert out["ratio"] == pytest.approx(
        out["pipeline_updates_per_s"] / out["synthetic_updates_per_s"], 1e-2
    )
    # float32 and the bf16 torso side by side; the synthetic run is the one --amp picked.
    assert out["bf16_vs_fp32_updates_ratio"] == pytest.approx(
        out["bf16_updates_per_s"] / out["fp32_updates_per_s"], 1e-2
    )
    picked = "bf16_updates_per_s" if out["amp_on"] else "fp32_updates_per_s"
    assert out["synthetic_updates_per_s"] == out[picked]
    assert out["amp_on"] == out["bf16_native"]  # --amp auto: on where bf16 is native
    if out["device"] == "cpu":
        assert out["bf16_native"] == bool(out["cpu_bf16_flags"])
