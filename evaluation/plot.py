"""Learning curves from a run's TensorBoard event files.

    python -m apex_dqn.evaluation.plot RUN_DIR [--out curve.png]
    apex-dqn-plot RUN_DIR [--out curve.png]

Draws the episodic return against environment frames and against wall-clock training
time, side by side: every training episode as a faint dot with its moving average, and,
when the run has them, the evaluation means with a band of one standard deviation, and
the final evaluation of each session's last weights as a star.
A resumed run has one event file per session; the time axis adds up the sessions'
durations and leaves out the time between them. Needs matplotlib
(``pip install 'apex-dqn[plot]'``); draws off-screen (Agg), so it works headless. A run
that cannot be plotted is one line, ``apex-dqn-plot: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apex_dqn.common.cli import CommandError, run_command
from apex_dqn.evaluation.protocol import reference_scores

PROG = "apex-dqn-plot"

TRAIN_TAG = "charts/episodic_return"
EVAL_TAG = "eval/episodic_return_mean"
EVAL_STD_TAG = "eval/episodic_return_std"
FINAL_TAG = "eval/final_return_mean"


class PlotError(CommandError):
    """The run cannot be plotted; the message is one line (a user error of the command)."""


@dataclass
class Series:
    """One scalar tag over a whole run, sessions in order."""

    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    elapsed_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # training time

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Run:
    """Every scalar of a run by tag, and its game when the run logged its config."""

    directory: Path
    scalars: dict[str, Series]
    game: str | None


def event_files(run_dir: str | Path) -> list[Path]:
    """The run's event files (one per session); :class:`PlotError` when there are none."""
    d = Path(run_dir)
    if not d.is_dir():
        raise PlotError(f"{d} is not a directory")
    files = [p for p in d.iterdir() if p.is_file() and "tfevents" in p.name]
    if not files:
        raise PlotError(f"no TensorBoard event files (events.out.tfevents.*) in {d}")
    return files


def load_run(run_dir: str | Path) -> Run:
    """Every scalar of every session in ``run_dir``, with training time since the start."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    sessions = []
    for path in event_files(run_dir):
        acc = EventAccumulator(str(path), size_guidance={SCALARS: 0, TENSORS: 0})
        acc.Reload()
        try:
            start = acc.FirstEventTimestamp()
        except ValueError:
            continue  # an empty file
        # The session began at its first event (events may carry earlier wall times).
        tags = acc.Tags()
        for tag in tags["scalars"]:
            start = min([start, *(e.wall_time for e in acc.Scalars(tag)[:1])])
        for tag in tags.get("tensors", []):
            start = min([start, *(e.wall_time for e in acc.Tensors(tag)[:1])])
        sessions.append((start, acc))
    sessions.sort(key=lambda s: s[0])
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    game = None
    offset = 0.0
    for start, acc in sessions:
        end = start
        for tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            wall = np.array([e.wall_time for e in events])
            steps = np.array([e.step for e in events], dtype=np.int64)
            values = np.array([e.value for e in events], dtype=np.float64)
            parts.setdefault(tag, []).append((steps, values, offset + wall - start))
            end = max(end, float(wall.max(initial=start)))
        game = game or _game_of(acc)
        offset += end - start
    scalars = {
        tag: Series(*(np.concatenate([p[i] for p in chunks]) for i in range(3)))
        for tag, chunks in parts.items()
    }
    return Run(Path(run_dir), scalars, game)


def _game_of(acc: Any) -> str | None:
    """The game from the ``config`` text the driver logs (a ``|game|value|`` row)."""
    if "config/text_summary" not in acc.Tags().get("tensors", []):
        return None
    for event in acc.Tensors("config/text_summary"):
        for raw in event.tensor_proto.string_val:
            m = re.search(r"\|\s*game\s*\|\s*([A-Za-z0-9_]+)\s*\|", raw.decode("utf-8", "replace"))
            if m:
                return m.group(1)
    return None


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (shorter at the start)."""
    if len(values) == 0:
        return values
    window = max(1, min(window, len(values)))
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (sums[idx] - sums[lo]) / (idx - lo)


def _time_axis(seconds: np.ndarray, longest: float) -> tuple[np.ndarray, str]:
    if longest >= 2 * 3600:
        return seconds / 3600.0, "wall-clock training time (hours)"
    return seconds / 60.0, "wall-clock training time (minutes)"


def plot_run(
    run: Run,
    out: str | Path,
    *,
    train_tag: str = TRAIN_TAG,
    eval_tag: str = EVAL_TAG,
    eval_std_tag: str = EVAL_STD_TAG,
    smooth: int = 100,
    game: str | None = None,
    title: str | None = None,
) -> Path:
    """Draw ``run``'s curves to a PNG; raises :class:`PlotError` when it has none."""
    from matplotlib.figure import Figure

    train = run.scalars.get(train_tag)
    evals = run.scalars.get(eval_tag)
    if not train and not evals:
        known = ", ".join(sorted(run.scalars)) or "none"
        raise PlotError(
            f"no {train_tag!r} or {eval_tag!r} scalars in {run.directory} (scalars: {known})"
        )
    game = game or run.game
    longest = max(float(s.elapsed_s.max()) for s in (train, evals) if s)
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, by_time in zip(axes, (False, True), strict=True):

        def x_of(series: Series, by_time: bool = by_time) -> np.ndarray:
            if by_time:
                return _time_axis(series.elapsed_s, longest)[0]
            return series.steps / 1e6

        if train:
            order = np.argsort(train.steps if not by_time else train.elapsed_s, kind="stable")
            x, y = x_of(train)[order], train.values[order]
            ax.scatter(x, y, s=4, alpha=0.3, color="tab:blue", linewidths=0)
            ax.plot(x, moving_average(y, smooth), color="tab:blue",
                    label=f"training episodes ({smooth}-episode mean)")  # fmt: skip
        if evals:
            x, y = x_of(evals), evals.values
            ax.plot(x, y, "o-", color="tab:red", markersize=3, label="evaluation mean")
            std = run.scalars.get(eval_std_tag)
            if std and len(std) == len(evals):
                ax.fill_between(x, y - std.values, y + std.values, color="tab:red", alpha=0.15)
        final = run.scalars.get(FINAL_TAG)  # the final evaluation of each run segment
        if final:
            ax.plot(x_of(final), final.values, "*", color="tab:red", markersize=11,
                    linestyle="none", label="final evaluation")  # fmt: skip
        for name, style in (("random", ":"), ("human", "--")):
            score = reference_scores(game or "").get(name)
            if score is not None:
                ax.axhline(score, color="gray", linestyle=style, linewidth=1,
                           label=f"{name} ({score:,.0f})")  # fmt: skip
        ax.set_xlabel(
            _time_axis(np.zeros(0), longest)[1] if by_time else "environment frames (millions)"
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("episodic return (game score)")
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(title or f"{run.directory.name}" + (f" — {game}" if game else ""))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line: a run directory, and what to draw from it."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Draw a run's learning curve (episodic return vs frames and vs time).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", help="the run's log directory (where its event files are)")
    p.add_argument("--out", default="", help="PNG to write (default RUN_DIR/curve.png)")
    p.add_argument("--tag", default=TRAIN_TAG, help="training episode return scalar")
    p.add_argument("--eval-tag", default=EVAL_TAG, help="evaluation mean return scalar")
    p.add_argument("--smooth", type=int, default=100, help="episodes in the moving average")
    p.add_argument("--game", default=None, help="game for reference lines (default: the run's)")
    return p


def run(args: argparse.Namespace) -> None:
    """Load the run, draw its curves, and say what was drawn."""
    if args.smooth < 1:
        raise PlotError(f"--smooth={args.smooth} is invalid: must be positive")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotError("matplotlib is not installed: pip install 'apex-dqn[plot]'") from exc
    loaded = load_run(args.run_dir)
    out = args.out or Path(args.run_dir) / "curve.png"
    path = plot_run(loaded, out, train_tag=args.tag, eval_tag=args.eval_tag,
                    smooth=args.smooth, game=args.game)  # fmt: skip
    train, evals = loaded.scalars.get(args.tag), loaded.scalars.get(args.eval_tag)
    print(
        f"wrote {path}: {len(train) if train else 0} training episodes, "
        f"{len(evals) if evals else 0} evaluations"
    )


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status (2 for a user error)."""
    return run_command(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
