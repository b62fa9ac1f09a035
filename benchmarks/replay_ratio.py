"""Which replay ratio keeps both sides of the program busy on this machine.

    python -m apex_dqn.benchmarks.replay_ratio [--ratios 0.6,0.7,0] [--seconds 150]
        [--rounds 1] [-- TRAIN_FLAGS ...]

``train.py`` runs on the real ROM with the settings this machine gets (``--preset auto``
and any ``TRAIN_FLAGS``), once per ``--samples-per-insert`` value of ``--ratios`` (``0``:
free-running), for ``--seconds`` of steady training each, with no evaluation and no
checkpoint. A second round runs the ratios in the reverse order, a third in the first
order again, so that a drift of the machine's speed falls on every ratio alike.

Each run reports, over its steady window (:func:`~apex_dqn.benchmarks.capacity_check.
steady_rates`): env frames/s, learner updates/s, the ratio achieved (samples per
insert), the share of the window the learner's sampling was held by the limiter
(``learner/ratio_wait_fraction``, the median of the window's log points), the pushes the
shards refused per second (the actors held), and the CPU cores of each role. Against the
first ratio of ``--ratios``, the baseline: frames/s and updates/s as ratios.

How to read it. The actors and the learner each run on one thread, so neither can take
the core the other leaves when it waits. Held below the free-running ratio, the
limiter keeps the actors at full speed and holds the learner back (its wait share says
by how much); held above, the learner gains little and the actors wait (refused
pushes). The best held ratio is the highest that leaves the frames/s of the
free-running run; ``--preset laptop``'s was chosen so. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from apex_dqn.benchmarks.capacity import OneLineParser, rounded
from apex_dqn.benchmarks.capacity_check import FRAME_SKIP, measure_run, read_scalars
from apex_dqn.benchmarks.learner import cpu_model
from apex_dqn.common.config import ConfigError, build_parser, from_args, validate_flags

QUIET = [
    "--eval-interval-s", "0", "--final-eval-episodes", "0", "--checkpoint-interval-s",
    "100000", "--total-frames", "1000000000", "--log-interval-s", "5", "--seed", "0",
]  # fmt: skip
RATES = ("frames_per_s", "updates_per_s", "achieved_ratio", "learner_ratio_wait",
         "refused_pushes_per_s")  # fmt: skip


def held_shares(scalars: dict[str, list[tuple[float, int, float]]], window_s: float) -> dict:
    """Over the last ``window_s`` seconds of a run's scalars: the median share of time the
    learner waited on the limiter (0 where no limiter ran) and refused pushes per second."""
    end = max(t for t, _, _ in scalars["charts/learner_updates"])
    start = end - window_s

    def within(tag: str) -> list[tuple[float, float]]:
        return [(t, v) for t, _, v in scalars.get(tag, []) if t >= start]

    waits = [v for _, v in within("learner/ratio_wait_fraction")]
    refused = within("replay/refused_pushes")  # cumulative count
    per_s = (refused[-1][1] - refused[0][1]) / window_s if len(refused) > 1 else 0.0
    return {"learner_ratio_wait": statistics.median(waits) if waits else 0.0,
            "refused_pushes_per_s": per_s}  # fmt: skip


def run_args(ratio: float, train_args: list[str]) -> list[str]:
    """``train.py``'s flags for the run at ``ratio``."""
    return [*QUIET, *train_args, "--samples-per-insert", f"{ratio:g}"]


def check_train_args(ratio: float, train_args: list[str]) -> str | None:
    """Why ``train.py`` would refuse the flags of the run at ``ratio``, in one line; None
    if it would not. These are its checks before it looks at the machine; a setting
    wrong only under the preset the machine picks is refused by the run itself."""
    argv = run_args(ratio, train_args)
    parser = build_parser()
    parser.exit_on_error = False  # a bad value raises instead of printing usage
    try:
        _, unknown = parser.parse_known_args(argv)
        if unknown:
            return f"{' '.join(unknown)}: not a flag of train.py"
        validate_flags(from_args(argv), argv)
    except (argparse.ArgumentError, ConfigError) as exc:
        return str(exc)
    return None


def measure(ratio: float, train_args: list[str], seconds: float, tmp: Path) -> dict:
    """One run at ``--samples-per-insert ratio``: the rates of :data:`RATES`, and cores."""
    logdir = tmp / f"ratio-{ratio:g}-{len(list(tmp.iterdir()))}"
    got = measure_run(run_args(ratio, train_args), logdir, seconds)
    samples, inserts = got["samples_per_s"], got.get("inserts_per_s", 0.0)
    return {
        "frames_per_s": got["transitions_per_s"] * FRAME_SKIP,
        "updates_per_s": got["updates_per_s"],
        "achieved_ratio": samples / inserts if inserts else float("nan"),
        **held_shares(read_scalars(logdir), got["window_s"]),
        "cores": {role: sum(v) for role, v in got["cores"].items()},
    }


def summarize(runs: dict[float, list[dict]]) -> dict:
    """Per ratio the median of its rounds for each of :data:`RATES` and the cores; and
    frames/s and updates/s of each ratio over those of the first (the baseline)."""
    out: dict[str, Any] = {}
    for ratio, rounds in runs.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in RATES}
        roles = {role for r in rounds for role in r["cores"]}
        med["cores"] = {x: statistics.median(r["cores"].get(x, 0.0) for r in rounds) for x in roles}
        out[f"{ratio:g}"] = med
    first = out[f"{next(iter(runs)):g}"]

    def versus(key: str) -> dict[str, float]:
        return {ratio: v[key] / first[key] for ratio, v in out.items()}

    return {"by_ratio": out, "frames_vs_first": versus("frames_per_s"),
            "updates_vs_first": versus("updates_per_s")}  # fmt: skip


def _ratios(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not v >= 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give distinct samples-per-insert values >= 0, comma-separated"
        )
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineParser(prog="python -m apex_dqn.benchmarks.replay_ratio",
                           description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--ratios", type=_ratios, default=[0.6, 0.7, 0.0],
                        help="--samples-per-insert values; the first is the baseline")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=150.0, help="measured, per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each ratio")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after --: flags for every train.py run")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.seconds > 0 or args.rounds < 1:
        parser.error(f"--seconds {args.seconds:g} / --rounds {args.rounds}: the seconds "
                     "must be positive and the rounds at least 1")  # fmt: skip
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    for ratio in args.ratios:  # before the first run: a bad flag is one line, not a run
        if (why := check_train_args(ratio, train_args)) is not None:
            parser.error(why)
    runs: dict[float, list[dict]] = {r: [] for r in args.ratios}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="replay-ratio-") as tmp:
        for i in range(args.rounds):
            for ratio in args.ratios if i % 2 == 0 else args.ratios[::-1]:
                runs[ratio].append(measure(ratio, train_args, args.seconds, Path(tmp)))
                print(f"samples-per-insert {ratio:g}: {json.dumps(rounded(runs[ratio][-1]))}",
                      flush=True)  # fmt: skip
                load.append(os.getloadavg()[0])
    result = {**summarize(runs), "cpu": cpu_model(), "cpus": os.cpu_count(),
              "seconds": args.seconds, "rounds": args.rounds, "train_args": train_args,
              "load_avg_1m": load}  # fmt: skip
    print(json.dumps(rounded(result)), flush=True)
    return result


if __name__ == "__main__":
    main()
