"""``benchmarks.replay_ratio``: what it reads from a run's scalars, how it sums up the
runs, and its command line. (A whole run of it takes minutes per ratio: not in the suite.)"""

from __future__ import annotations

import pytest

from apex_dqn.benchmarks.replay_ratio import held_shares, main, summarize


def _series(values, start=100.0, every=5.0):
    return [(start + i * every, 1_000 * i, float(v)) for i, v in enumerate(values)]


def test_held_shares_are_taken_over_the_window_alone():
    scalars = {
        "charts/learner_updates": _series(range(0, 1_100, 100)),  # t = 100 .. 150
        # before the window (t < 130) the learner waited all the time
        "learner/ratio_wait_fraction": _series([1, 1, 1, 1, 1, 1, 0.3, 0.2, 0.4, 0.3, 0.1]),
        "replay/refused_pushes": _series([0, 0, 0, 0, 0, 0, 10, 20, 30, 40, 70]),
    }
    got = held_shares(scalars, window_s=20.0)
    assert got["learner_ratio_wait"] == pytest.approx(0.3)  # median of 0.3 0.2 0.4 0.3 0.1
    assert got["refused_pushes_per_s"] == pytest.approx((70 - 10) / 20.0)


def test_free_running_has_no_limiter_tags():
    scalars = {"charts/learner_updates": _series(range(5))}
    assert held_shares(scalars, 10.0) == {"learner_ratio_wait": 0.0, "refused_pushes_per_s": 0.0}


def _run(frames, updates, cores=None):
    return {"frames_per_s": frames, "updates_per_s": updates, "achieved_ratio": 0.6,
            "learner_ratio_wait": 0.1, "refused_pushes_per_s": 0.0,
            "cores": cores or {"actor": 0.9, "learner": 0.7}}  # fmt: skip


def test_summary_takes_medians_of_rounds_against_the_first_ratio():
    runs = {
        0.6: [_run(4_000, 20.0), _run(4_400, 21.0), _run(4_200, 25.0)],
        0.0: [_run(4_200, 26.0, {"actor": 1.0, "learner": 0.8, "shard": 0.1})],
    }
    got = summarize(runs)
    assert got["by_ratio"]["0.6"]["frames_per_s"] == 4_200
    assert got["by_ratio"]["0.6"]["updates_per_s"] == 21.0
    assert got["by_ratio"]["0"]["cores"] == {"actor": 1.0, "learner": 0.8, "shard": 0.1}
    assert got["frames_vs_first"] == {"0.6": 1.0, "0": 1.0}
    assert got["updates_vs_first"] == pytest.approx({"0.6": 1.0, "0": 26.0 / 21.0})


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--ratios", "0.6,abc"], "0.6,abc"),
        (["--ratios", "0.6,-1"], "0.6,-1"),
        (["--ratios", "0.6,0.6"], "0.6,0.6"),
        (["--ratios", ""], "--ratios"),
        (["--seconds", "0"], "--seconds 0"),
        (["--rounds", "0"], "--rounds 0"),
        (["--", "--lr", "abc"], "'abc'"),
        (["--", "--no-such-flag", "1"], "--no-such-flag"),
        (["--", "--batch-size", "-1"], "-1"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(argv, names, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err
