"""``python train.py`` end to end: real Ray, the real Space Invaders ROM, a tiny config.

One short run is shared by most tests (learning, weights reaching the actors, target
updates, replay fed by every actor, TensorBoard tags, the checkpoint); then it is
resumed with changed settings and killed, and resumed again with nothing but
``--resume``; and separate runs are stopped with Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from apex_dqn.benchmarks.train_run import TrainRun
from apex_dqn.common import checkpoint
from apex_dqn.common.config import Config
from apex_dqn.common.networks import build_network
from apex_dqn.evaluation.final import read_final_evaluations
from apex_dqn.replay.rate_limiter import SampleToInsertRatio

pytestmark = [pytest.mark.ray, pytest.mark.rom, pytest.mark.slow]

NUM_ACTORS = SHARDS = 2
RATIO = 0.25  # sampled per inserted: below what TINY gives free-running here (~0.3-0.4)
TARGET_PERIOD = 20
TINY = [
    "--num-actors", str(NUM_ACTORS), "--envs-per-actor", "2",
    "--replay-shards", str(SHARDS), "--replay-capacity", "20000", "--replay-min-size", "500",
    "--batch-size", "16", "--network", "dqn2013", "--target-update-period", str(TARGET_PERIOD),
    "--publish-period", "5", "--weight-sync-period", "20", "--push-period", "20",
    "--log-interval-s", "3", "--seed", "0",
    "--eval-interval-s", "5", "--eval-episodes", "1", "--no-eval-video",
    "--final-eval-episodes", "2", "--samples-per-insert", str(RATIO),
]  # fmt: skip
FIRST_FRAMES = 24_000
RESUMED_FRAMES = 64_000  # far past the kill
TAGS = (
    "charts/episodic_return", "charts/episodic_length", "losses/td_loss", "losses/q_values",
    "charts/env_frames_per_s", "charts/updates_per_s", "replay/size",
    "charts/weight_version_lag", "eval/episodic_return_mean", "eval/episodic_return_std",
    "eval/final_return_mean", "eval/final_return_std", "eval/final_episodes",
)  # fmt: skip


def _event_files(logdir: Path) -> list[Path]:
    """TensorBoard event files, oldest run first (the name holds the creation time)."""
    files = list(logdir.glob("events.out.tfevents.*"))
    return sorted(files, key=lambda p: int(p.name.split(".")[3]))


def _scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A run to ``FIRST_FRAMES`` frames: its directory, output, newest checkpoint, scalars."""
    logdir = tmp_path_factory.mktemp("run")
    run = TrainRun([*TINY, "--total-frames", str(FIRST_FRAMES), "--logdir", str(logdir)])
    code = run.wait()
    assert code == 0, run.output[-4000:]
    (events,) = _event_files(logdir)
    return logdir, run.output, checkpoint.load(logdir), _scalars(events)


def test_run_reaches_its_frames_and_checkpoints(first_run):
    logdir, output, saved, _ = first_run
    assert "reached" in output and "Traceback" not in output
    assert len(checkpoint.list_checkpoints(logdir)) == 1
    assert saved["run_id"] == checkpoint.read_run_id(logdir) == checkpoint.owner(saved["path"])
    counters, learner = saved["counters"], saved["learner"]
    assert counters["env_frames"] >= FIRST_FRAMES
    assert counters["episodes"] > 0 and np.isfinite(counters["best_score"])
    assert saved["path"].endswith(f"checkpoint-{learner['updates']:010d}.pt")
    assert saved["config"]["num_actors"] == NUM_ACTORS
    result = _final_evaluation(logdir, output)
    assert result["env_frames"] == counters["env_frames"]


def _final_evaluation(logdir: Path, output: str) -> dict:
    """The run's final evaluation, after its final checkpoint: printed, and saved beside
    it for the weights it holds."""
    saved = checkpoint.load(logdir)
    (result,) = [r for r in read_final_evaluations(logdir)
                 if r["updates"] == saved["learner"]["updates"]]  # fmt: skip
    assert result["checkpoint"] == Path(saved["path"]).name and result["episodes"] == 2
    assert all(s >= 0 and s % 5 == 0 for s in result["scores"])
    line = f"final evaluation (update {result['updates']:,}): {result['mean']:.1f}"
    assert output.index(f"checkpoint {saved['path']}") < output.index(line)
    return result


def test_learner_updated_and_its_target_moved(first_run):
    _, _, saved, _ = first_run
    learner = saved["learner"]
    assert learner["updates"] >= 2 * TARGET_PERIOD
    # Adam's step count equals the learner's: every update went through the optimizer.
    steps = {int(s["step"]) for s in learner["optimizer"]["state"].values()}
    assert steps == {learner["updates"]}
    torch.manual_seed(0)  # the learner builds its initial networks after seeding with --seed
    initial = build_network(6, "dqn2013", dueling=True).state_dict()
    assert _differs(learner["online"], initial)
    assert _differs(learner["target"], initial), "the target network was never updated"
    # A checkpoint is taken between updates; the target is a copy of the online network
    # made every TARGET_PERIOD updates, so the two are equal exactly at those counts.
    synced = learner["updates"] % TARGET_PERIOD == 0
    assert _differs(learner["target"], learner["online"]) != synced


def test_actors_received_newer_weights(first_run):
    _, _, _, scalars = first_run
    for i in range(NUM_ACTORS):
        versions = [v for _, v in scalars[f"actors/{i}/weights_version"]]
        assert max(versions) > 0, f"actor {i} never received new weights"
        assert versions == sorted(versions), f"actor {i}'s weights went back in time"
    lags = [v for _, v in scalars["charts/weight_version_lag"]]
    assert any(np.isfinite(lags)) and min(v for v in lags if np.isfinite(v)) >= 0


def test_replay_holds_data_from_every_actor(first_run):
    _, _, _, scalars = first_run
    # Actor i is the only one pushing to shard i % SHARDS.
    for i in range(NUM_ACTORS):
        s = i % SHARDS
        assert scalars[f"replay/{s}/added"][-1][1] > 0, f"nothing from actor {i} in replay"
        assert scalars[f"replay/{s}/size"][-1][1] > 0
        assert scalars[f"replay/{s}/dropped"][-1][1] == 0


def test_tensorboard_holds_the_documented_tags(first_run):
    _, _, _, scalars = first_run
    missing = [tag for tag in TAGS if tag not in scalars]
    assert not missing, f"missing tags {missing}; have {sorted(scalars)}"
    returns = [v for _, v in scalars["charts/episodic_return"]]
    lengths = [v for _, v in scalars["charts/episodic_length"]]
    assert len(returns) == len(lengths) > 0
    assert all(r >= 0 and r % 5 == 0 for r in returns), "scores are unclipped alien points"
    assert all(n > 0 for n in lengths)
    assert all(np.isfinite(v) for _, v in scalars["losses/td_loss"])
    assert max(v for _, v in scalars["charts/env_frames_per_s"]) > 0
    assert max(v for _, v in scalars["charts/updates_per_s"]) > 0
    assert max(v for _, v in scalars["replay/size"]) >= 500
    # One evaluation episode per run of the standard protocol: a whole game's score.
    evals = [v for _, v in scalars["eval/episodic_return_mean"]]
    assert evals and all(v >= 0 and v % 5 == 0 for v in evals)
    assert all(v == 0 for _, v in scalars["eval/episodic_return_std"])
    # The final evaluation, once, at the run's last frame count.
    ((step, mean),) = scalars["eval/final_return_mean"]
    assert step >= FIRST_FRAMES
    assert scalars["eval/final_episodes"] == [(step, 2.0)] and mean >= 0


def test_the_replay_ratio_stays_within_its_band(first_run):
    """The run holds --samples-per-insert: the learner's debt D = X * inserted - sampled
    stays within the band (at most one push above it with two shards), and the ratio
    achieved between the first and the last log line of learning, updates x batch per
    transition the shards took, is X up to what the band and the batches in flight allow."""
    _, output, saved, scalars = first_run
    cfg = Config.from_dict(saved["config"])
    ratio = SampleToInsertRatio.from_config(cfg)
    assert ratio is not None and ratio.samples_per_insert == RATIO
    assert ratio.describe() in output
    over = (SHARDS - 1) * RATIO * ratio.push
    owed = [v for _, v in scalars["replay/samples_owed"]]
    assert owed and all(-ratio.error_buffer <= v <= ratio.error_buffer + over for v in owed)
    updates, added = dict(scalars["charts/learner_updates"]), dict(scalars["replay/added"])
    steps = [s for s in sorted(updates) if updates[s] > 0 and s in added]
    inserted = added[steps[-1]] - added[steps[0]]
    achieved = (updates[steps[-1]] - updates[steps[0]]) * cfg.batch_size / inserted
    in_flight = (cfg.prefetch_batches + 3) * cfg.batch_size  # requested, not yet trained on
    slack = (2 * ratio.error_buffer + over + in_flight) / inserted
    assert abs(achieved - RATIO) <= slack, (achieved, slack, inserted)
    assert scalars["replay/samples_per_insert"]


def _file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def _settings_line(output: str) -> str:
    (line,) = [x for x in output.splitlines() if x.startswith("apex-dqn: ")]
    return line


def _wait_for_checkpoint_past(run: TrainRun, updates: int) -> int:
    """The update count of the first checkpoint the run writes with more than ``updates``."""
    after = 0
    while True:
        m = run.wait_for(r"^checkpoint .*checkpoint-(\d+)\.pt$", after=after)
        if int(m.group(1)) > updates:
            return int(m.group(1))
        after = run.lines.index(m.string, after) + 1


def test_a_killed_run_resumes_with_only_resume(first_run):
    """The first run, resumed with two changed settings, is killed (SIGKILL: no final
    checkpoint); ``--resume DIR`` alone then continues it with the settings it saved and
    its counters. Other runs' checkpoints in the directory are never touched."""
    logdir, first_output, saved, _ = first_run
    frames, updates, run_id = (
        saved["counters"]["env_frames"],
        saved["learner"]["updates"],
        saved["run_id"],
    )
    # Checkpoints of two other runs (one from before runs had ids) left in the directory.
    foreign = checkpoint.save(
        logdir, {k: saved[k] for k in ("config", "learner", "counters")}, step=1, keep=1,
        run_id="otherrun0001",
    )  # fmt: skip
    legacy = logdir / "checkpoint-0000000002.pt"
    torch.save({k: saved[k] for k in ("format", "config", "learner", "counters")}, legacy)
    others = [foreign, Path(f"{foreign}{checkpoint.OWNER_SUFFIX}"), legacy]
    before = {p: _file_state(p) for p in others}

    run = TrainRun([
        "--resume", str(logdir), "--total-frames", str(RESUMED_FRAMES),
        "--checkpoint-interval-s", "3",
    ])  # fmt: skip
    try:
        _wait_for_checkpoint_past(run, updates)
    finally:
        run.kill()
        run.wait(timeout=60)
    changed = [x for x in run.lines if x.startswith("changed on resume: ")]
    assert changed == [
        f"changed on resume: --total-frames {FIRST_FRAMES} -> {RESUMED_FRAMES}",
        "changed on resume: --checkpoint-interval-s 300.0 -> 3.0",
    ], run.output[-4000:]
    assert "reached" not in run.output
    killed = checkpoint.load(logdir)
    assert killed["run_id"] == run_id
    assert killed["learner"]["updates"] > updates
    assert frames < killed["counters"]["env_frames"] < RESUMED_FRAMES
    assert killed["config"] == {
        **saved["config"], "total_frames": RESUMED_FRAMES, "checkpoint_interval_s": 3.0,
        "resume": str(logdir),
    }  # fmt: skip
    second_line = _settings_line(run.output)

    run = TrainRun(["--resume", str(logdir)])
    code = run.wait()
    assert code == 0, run.output[-4000:]
    assert f"logging to {logdir}" in run.output
    assert "changed on resume" not in run.output
    assert _settings_line(run.output) == second_line == _settings_line(first_output)

    *_, resumed_events = _event_files(logdir)
    scalars = _scalars(resumed_events)
    steps = [s for s, _ in scalars["charts/learner_updates"]]
    assert min(steps) >= killed["counters"]["env_frames"], "env_frames restarted"
    assert scalars["charts/learner_updates"][0][1] >= killed["learner"]["updates"]
    for i in range(NUM_ACTORS):  # weight versions are update counts: they continue too
        versions = [v for _, v in scalars[f"actors/{i}/weights_version"]]
        assert min(versions) >= killed["learner"]["updates"]

    final = checkpoint.load(logdir)
    learner, counters = final["learner"], final["counters"]
    assert final["run_id"] == run_id and final["config"] == killed["config"]
    assert counters["env_frames"] >= RESUMED_FRAMES
    assert counters["episodes"] >= killed["counters"]["episodes"]
    assert counters["wall_time_s"] > killed["counters"]["wall_time_s"]
    assert learner["updates"] > killed["learner"]["updates"]
    steps = {int(s["step"]) for s in learner["optimizer"]["state"].values()}
    assert steps == {learner["updates"]}, "the optimizer state was not restored"
    # Pruning kept the run's last --keep-checkpoints and nothing else changed.
    assert len(checkpoint.list_checkpoints(logdir, run_id)) <= saved["config"]["keep_checkpoints"]
    assert {p: _file_state(p) for p in others} == before


def test_ctrl_c_stops_cleanly_with_a_checkpoint(tmp_path):
    """Ctrl-C: the final checkpoint, then the final evaluation begins; a second Ctrl-C
    skips it (16 whole games: it would still be playing) and the run exits at once."""
    run = TrainRun([*TINY, "--total-frames", "100000000", "--logdir", str(tmp_path),
                    "--final-eval-episodes", "16", "--final-eval-s", "300"])  # fmt: skip
    # Interrupt while the learner trains: a log line with a finite loss.
    run.wait_for(r"loss \d+\.\d+")
    run.interrupt()
    run.wait_for(r"^final evaluation: 16 episodes of the weights in checkpoint-", timeout=120)
    code = run.stop(timeout=60)
    assert code == 0, run.output[-4000:]
    assert "interrupted: saving a checkpoint" in run.output
    assert "final evaluation skipped (SIGINT): exiting" in run.output, run.output[-4000:]
    assert "Traceback" not in run.output
    saved = checkpoint.load(tmp_path)
    assert saved["learner"]["updates"] > 0
    assert 0 < saved["counters"]["env_frames"] < 100_000_000
    assert read_final_evaluations(tmp_path) == []


def test_sigterm_to_the_whole_process_group_still_saves_the_last_state(tmp_path):
    """``timeout`` (and shells running scripts) signal the whole process group: the local
    Ray's processes are in a group of their own, so the driver can still save."""
    args = [*TINY, "--total-frames", "100000000", "--logdir", str(tmp_path)]
    run = TrainRun(args, wrapper=("timeout", "-s", "TERM", "900"))
    try:
        run.wait_for(r"loss \d+\.\d+")
        run.signal_group(signal.SIGTERM)
        run.wait(timeout=120)
    finally:
        run.kill()
    assert "interrupted: saving a checkpoint" in run.output, run.output[-4000:]
    assert "continues from" not in run.output
    assert "Traceback" not in run.output
    saved = checkpoint.load(tmp_path)
    assert saved["learner"]["updates"] > 0
    _final_evaluation(tmp_path, run.output)  # the signal sent twice did not skip it
