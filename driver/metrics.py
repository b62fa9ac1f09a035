"""Run metrics: what the workers report, counted, written to TensorBoard and the console.

Every log interval the driver asks each running actor for its report (``drain()``) and
each shard for its stats, keeping at most one question per worker in flight until it is
answered: one that is slow, restarting or unplaced delays nobody and loses nothing. It
then asks the learner for its stats and writes one console line and the scalars below.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from apex_dqn.common.config import Config
from apex_dqn.common.inflight import InFlight
from apex_dqn.common.messages import ActorReport, LearnerStats, ShardStats
from apex_dqn.driver.supervisor import Supervisor

SHARD_TAGS = ("size", "added", "dropped", "samples", "total_priority")


@dataclass
class Counters:
    """What the driver counts; saved in every checkpoint and restored on resume."""

    env_frames: int = 0
    episodes: int = 0
    best_score: float = float("-inf")
    wall_time_s: float = 0.0
    recent_scores: list[float] = field(default_factory=list)


class RunMetrics:
    def __init__(self, cfg: Config, writer: Any, counters: Counters):
        self.cfg, self.writer, self.counters = cfg, writer, counters
        self.versions: dict[int, int] = {}  # actor index -> weights version it acts with
        self.lost_transitions = self.shard_restarts = self.failed_pushes = 0
        self._asked: InFlight[tuple[str, int]] = InFlight()  # at most one per worker
        self._incarnations: dict[int, tuple[int, int]] = {}  # shard -> (incarnation, size)

    # ---------------------------------------------------------------------- collecting
    def collect(self, sup: Supervisor) -> LearnerStats | None:
        """Take the reports of actors and shards (waiting at most one log interval) and
        the learner's stats; None if the learner did not answer."""
        self.versions = {i: v for i, v in self.versions.items() if i in sup.actors}
        for actor in sup.running_actors():
            if ("actor", actor.index) not in self._asked:
                self._asked.add(actor.handle.drain.remote(), ("actor", actor.index))
        for shard in sup.shards:
            if ("shard", shard.index) not in self._asked:
                self._asked.add(shard.handle.stats.remote(), ("shard", shard.index))
        for (kind, i), ref in self._asked.take(timeout=self.cfg.log_interval_s):
            with contextlib.suppress(ray.exceptions.RayError):
                if kind == "actor":
                    self._actor_report(ray.get(ref), known=i in sup.actors)
                else:
                    self._shard_stats(i, ray.get(ref), sup)
        try:
            return ray.get(sup.learner.handle.stats.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            return None  # a dead learner is restarted by the supervisor

    def _actor_report(self, report: ActorReport, known: bool) -> None:
        c, w, i = self.counters, self.writer, report.index
        c.env_frames += report.env_steps * self.cfg.frame_skip
        self.failed_pushes += report.pushes_failed
        if known:
            self.versions[i] = report.weights_version
        scores = [ep.score for ep in report.episodes]
        for ep in report.episodes:
            w.add_scalar("charts/episodic_return", ep.score, c.env_frames)
            w.add_scalar("charts/episodic_length", ep.length, c.env_frames)
            w.add_scalar("charts/episodic_return_vs_epsilon", ep.score, int(ep.epsilon * 1e6))
        if scores:
            c.episodes += len(scores)
            c.best_score = max(c.best_score, *scores)
            c.recent_scores = (c.recent_scores + scores)[-100:]
            w.add_scalar(f"actors/{i}/episodic_return", float(np.mean(scores)), c.env_frames)
        w.add_scalar(f"actors/{i}/pushes_in_flight", report.pushes_in_flight, c.env_frames)

    def _shard_stats(self, s: int, stats: ShardStats, sup: Supervisor) -> None:
        """Log a shard's counters; a new incarnation means it restarted, empty."""
        last = self._incarnations.get(s)
        if last is not None and stats.incarnation != last[0]:
            lost = last[1]  # at least: what it held when last seen
            self.lost_transitions += lost
            self.shard_restarts += 1
            print(f"replay shard {s} restarted empty: {lost:,} transitions lost "
                  f"({self.lost_transitions:,} in all)", flush=True)  # fmt: skip
            sup.shard_restarted(s)
        self._incarnations[s] = (stats.incarnation, stats.size)
        step = self.counters.env_frames
        for key in SHARD_TAGS:  # actor i pushes to shard i % S
            self.writer.add_scalar(f"replay/{s}/{key}", getattr(stats, key), step)
        if stats.size:  # mean p^alpha of the items held
            self.writer.add_scalar(f"replay/{s}/mean_priority", stats.total_priority / stats.size,
                                   step)  # fmt: skip

    # ------------------------------------------------------------------------- logging
    def log(self, fps: float, ups: float | None, learner: LearnerStats | None,
            sup: Supervisor) -> None:  # fmt: skip
        """Write the interval's scalars and print the console line."""
        c, w, cfg = self.counters, self.writer, self.cfg
        step = c.env_frames
        version = learner.weights_version if learner else -1
        replay_size = learner.replay_size if learner else 0
        for tag, value in (learner.metrics if learner else {}).items():
            w.add_scalar(tag, value, step)
        known = np.array([v for v in self.versions.values() if v >= 0])
        lag = float(version - known.mean()) if len(known) else float("nan")
        for i, v in self.versions.items():
            if v >= 0:
                w.add_scalar(f"actors/{i}/weights_version", v, step)
                w.add_scalar(f"actors/{i}/weight_version_lag", version - v, step)
        scalars = {
            "charts/weight_version_lag": lag,
            "charts/env_frames_per_s": fps,
            "charts/SPS": fps / cfg.frame_skip,
            "replay/size": replay_size,
            "charts/learner_updates": learner.updates if learner else 0,
            "charts/episodes": c.episodes,
            "charts/learner_restarts": sup.learner_restarts,
            "charts/actors": len(sup.actors),
            "charts/actors_running": len(sup.running_actors()),
            "cluster/cpus": sup.cpus,
            "replay/lost_transitions": self.lost_transitions,
            "replay/shard_restarts": self.shard_restarts,
            "replay/failed_pushes": self.failed_pushes,
        }
        if ups is not None:
            scalars["charts/updates_per_s"] = ups
            scalars["charts/samples_per_s"] = ups * cfg.batch_size
        for tag, value in scalars.items():
            w.add_scalar(tag, value, step)
        w.flush()
        recent = f"{np.mean(c.recent_scores):.1f}" if c.recent_scores else "-"
        best = f"{c.best_score:.0f}" if c.episodes else "-"
        loss = learner.metrics.get("losses/td_loss", float("nan")) if learner else float("nan")
        eta = max(0, cfg.total_frames - step) / fps if fps > 0 else float("inf")
        print(
            f"[{hms(c.wall_time_s)}] frames {si(step)}/{si(cfg.total_frames)}"
            f"  fps {fps:,.0f}  upd/s {ups if ups is not None else 0:.1f}"
            f"  actors {len(sup.running_actors())}"
            f"  score {recent} (best {best}, {c.episodes} eps)"
            f"  replay {replay_size:,}  loss {loss:.4f}  lag {lag:.0f}  ETA {hms(eta)}",
            flush=True,
        )


def config_table(cfg: Config) -> str:
    """The run's settings as a Markdown table, for TensorBoard's TEXT tab."""
    rows = "\n".join(f"|{k}|{v}|" for k, v in cfg.to_dict().items())
    return "|setting|value|\n|-|-|\n" + rows


def si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def hms(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"
