"""``--storage`` and ``--resume URI`` against a real S3 API: moto's server on loopback,
started and stopped here. A run copies itself to S3 as it goes; killed (SIGKILL) and its
local directory deleted, ``--resume s3://...`` alone continues it with the same
settings, counters and replay (a shard whose replay file is gone starts empty, in one
line), and it goes on writing to S3."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from apex_dqn.benchmarks.train_run import TrainRun
from apex_dqn.common import checkpoint, storage
from apex_dqn.driver import session
from apex_dqn.driver.prepare import prepare
from tests.driver.test_rundir import RUN, _refused, _train, make_run

BUCKET = "apex-runs"
TINY = [
    "--num-actors", "1", "--envs-per-actor", "4", "--replay-shards", "2",
    "--replay-capacity", "20000", "--replay-min-size", "400", "--batch-size", "16",
    "--network", "dqn2013", "--push-period", "20", "--publish-period", "5",
    "--weight-sync-period", "10", "--target-update-period", "10", "--preset", "none",
    "--log-interval-s", "2", "--checkpoint-interval-s", "3", "--eval-interval-s", "0",
    "--final-eval-episodes", "0", "--save-replay",
]  # fmt: skip
TOTAL_FRAMES = 16_000


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (a free port), with a bucket; the environment
    variables botocore reads point at it (and stay set for the runs started here)."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        storage.connect(f"s3://{BUCKET}").fs.mkdir(BUCKET)
        yield storage.connect(f"s3://{BUCKET}/prefix")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_storage_that_cannot_be_used_is_one_line_before_ray(s3, tmp_path, monkeypatch, capsys):
    line = _refused(_train("--storage", "s3://no-such-bucket/x", "--logdir", str(tmp_path / "a")))
    assert line == (
        "train.py: error: --storage s3://no-such-bucket/x: bucket no-such-bucket does not exist"
    )
    # A storage folder holding another run is refused, and nothing is written anywhere.
    make_run(tmp_path / "run", RUN, steps=(10,))
    from apex_dqn.driver.mirror import RunMirror

    RunMirror(s3.child("taken"), tmp_path / "run", RUN, keep=3).sync()
    before = s3.child("taken").files()
    monkeypatch.setattr(session, "cluster_address", lambda cfg: None)  # as train.py, no Ray
    with pytest.raises(SystemExit) as exit_status:
        prepare(["--storage", s3.uri(), "--logdir", str(tmp_path / "taken")])
    assert exit_status.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--storage: {s3.uri()}/taken already holds run {RUN}" in line
    assert f"--resume {s3.uri()}/taken" in line and f"--logdir {tmp_path}/taken-2" in line
    assert s3.child("taken").files() == before and not (tmp_path / "taken").exists()


def _stored_checkpoints(store: storage.Storage) -> list[str]:
    return sorted(n for n in store.files() if checkpoint.checkpoint_step(n) is not None)


@pytest.mark.ray
@pytest.mark.rom
@pytest.mark.slow
def test_a_killed_run_resumes_from_s3_on_a_fresh_machine(s3, tmp_path):
    logdir = tmp_path / "run"
    store = s3.child("run")
    run = TrainRun([*TINY, "--total-frames", str(TOTAL_FRAMES), "--logdir", str(logdir),
                    "--storage", s3.uri()])  # fmt: skip
    # A reader that fetches every checkpoint it sees in the bucket while the run writes.
    seen: dict[tuple[str, int], str] = {}
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for name, size in store.files().items():
                if checkpoint.checkpoint_step(name) is None or (name, size) in seen:
                    continue
                local = tmp_path / "reader" / name
                local.parent.mkdir(exist_ok=True)
                try:
                    store.get(name, local)
                    checkpoint.load(local)
                    seen[(name, size)] = "ok"
                except FileNotFoundError:
                    continue  # pruned meanwhile
                except checkpoint.CheckpointError as exc:
                    seen[(name, size)] = str(exc)
            time.sleep(0.3)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # A stored checkpoint with learning in it (its replay beside it), then SIGKILL.
        after = 0
        while True:
            m = run.wait_for(r"^stored .*(checkpoint-(\d+)\.pt)", after=after, timeout=180)
            after = run.lines.index(m.string, after) + 1
            stored = store.files()
            if int(m.group(2)) > 0 and all(f"{m.group(1)}.replay-{s}.npz" in stored
                                           for s in (0, 1)):  # fmt: skip
                break
    finally:
        run.kill()
        run.wait(timeout=60)
        stop.set()
        reader.join(timeout=30)
    assert seen and set(seen.values()) == {"ok"}, seen
    (newest,) = _stored_checkpoints(store)[-1:]
    stored_files = store.files()
    replays = [f"{newest}.replay-{s}.npz" for s in (0, 1)]
    assert {f"{newest}.run", *replays, "run-id"} <= set(stored_files)
    killed = checkpoint.load(logdir / newest)
    assert re.search(rf"^checkpoint .*{newest}\n.*?^replay saved: [\d,]+ transitions of 2/2",
                     run.output, re.M | re.S), run.output[-4000:]  # fmt: skip
    shutil.rmtree(logdir)  # a fresh machine: nothing local
    store.remove(replays[1])  # and one shard's replay lost with the old machine

    resumed = TrainRun(["--resume", store.uri()])
    code = resumed.wait(timeout=300)
    out = resumed.output
    assert code == 0, out[-4000:]
    assert "changed on resume" not in out and "Traceback" not in out
    fetched = rf"^fetched \d+ file\(s\) of {newest} and the run's event files from {store.uri()} "
    assert re.search(fetched + rf"into {logdir} ", out, re.M), out[-4000:]
    assert re.search(r"^replay shard 0 restored [1-9][\d,]* transitions from .*replay-0\.npz$",
                     out, re.M), out[-4000:]  # fmt: skip
    assert f"replay shard 1 starts empty: {logdir / replays[1]} does not exist" in out
    assert "learning starts without waiting for --replay-min-size" in out
    # The same run, its settings and counters continued, written on to S3.
    final_name = _stored_checkpoints(store)[-1]
    store.get(final_name, tmp_path / "final.pt")
    final = checkpoint.load(tmp_path / "final.pt")
    assert final["run_id"] == killed["run_id"] == store.read_text("run-id").strip()
    assert final["config"] == {**killed["config"], "resume": store.uri()}
    assert final["learner"]["updates"] > killed["learner"]["updates"]
    assert final["counters"]["env_frames"] >= TOTAL_FRAMES > killed["counters"]["env_frames"]
    assert final["counters"]["episodes"] >= killed["counters"]["episodes"]
    events = sorted(n for n in store.files() if n.startswith("events.out.tfevents."))
    assert len(events) == 2  # the first run's and the resumed run's: one curve in TensorBoard
    assert len(_stored_checkpoints(store)) <= killed["config"]["keep_checkpoints"]
    assert Path(logdir / final_name).is_file()
