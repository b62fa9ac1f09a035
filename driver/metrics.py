"""Run metrics: what the workers report, counted, written to TensorBoard and the console.

Every log interval the driver asks each running actor for its report (``drain()``) and
each shard for its stats, keeping at most one question per worker in flight until it is
answered: one that is slow, restarting or unplaced delays nobody and loses nothing. It
then asks the learner for its stats and writes one console line and the scalars.

Dashboards stay readable at any scale: by default the scalars are aggregates over all
actors and shards (a fixed set of ~70 tags, whatever the population), and the charts per
actor and per shard come only with ``--worker-charts on`` (``auto``: up to
``WORKER_CHARTS_AUTO_MAX`` actors). The aggregates keep what per-actor charts were for:

* ``epsilon/episodic_return_<hi>-<lo>``: the mean score of the episodes played with an
  epsilon in each of ``EPSILON_BUCKETS`` bands of equal width in log epsilon over the
  Ape-X range 0.4 .. 0.4**8: how exploration and score relate, with a time axis;
* ``actors/sps_p10``, ``_p50``, ``_p90``, ``_min`` and ``actors/slowest``: each actor's
  agent steps per second, as percentiles, and the index of the slowest;
* ``actors/weight_version_lag_max``, ``actors/pushes_in_flight_max``.

A custom-scalars layout (TensorBoard's "Custom Scalars" tab) puts score, throughput,
learner and replay on one page, and the run's settings are written as hyperparameters
(the "HParams" tab), so runs of a sweep compare side by side.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from apex_dqn.common.config import WORKER_CHARTS_AUTO_MAX, Config
from apex_dqn.common.inflight import InFlight
from apex_dqn.common.messages import ActorReport, LearnerStats, ShardStats
from apex_dqn.driver.supervisor import Supervisor

SHARD_TAGS = ("size", "added", "dropped", "samples", "total_priority")
EPSILON_BUCKETS = 4  # bands of the Ape-X range 0.4 .. 0.4**8, equal in log epsilon
_BASE, _FIRST, _LAST = 0.4, 1.0, 8.0  # epsilon_i = 0.4 ** (1 + 7 i / (N - 1))


@dataclass
class Counters:
    """What the driver counts; saved in every checkpoint and restored on resume."""

    env_frames: int = 0
    episodes: int = 0
    best_score: float = float("-inf")
    wall_time_s: float = 0.0
    recent_scores: list[float] = field(default_factory=list)


def epsilon_bucket(epsilon: float) -> int:
    """The band of ``epsilon``: 0 for the most exploring (0.4), EPSILON_BUCKETS - 1 for the
    greediest; epsilons outside the Ape-X range go to the nearest end."""
    if epsilon <= 0:
        return EPSILON_BUCKETS - 1
    k = math.log(epsilon) / math.log(_BASE)  # epsilon = 0.4 ** k
    band = int((k - _FIRST) / (_LAST - _FIRST) * EPSILON_BUCKETS)
    return min(max(band, 0), EPSILON_BUCKETS - 1)


def epsilon_bucket_tag(band: int) -> str:
    width = (_LAST - _FIRST) / EPSILON_BUCKETS
    hi, lo = _BASE ** (_FIRST + band * width), _BASE ** (_FIRST + (band + 1) * width)
    return f"epsilon/episodic_return_{hi:.2g}-{lo:.2g}"


def custom_scalars_layout() -> dict[str, dict[str, list]]:
    """One page: score, throughput, learner, replay (regexes over the tags)."""
    return {
        "apex-dqn": {
            "score": ["Multiline", ["charts/episodic_return$", "eval/episodic_return_mean",
                                    "eval/final_return_mean", "epsilon/.*"]],
            "throughput": ["Multiline", ["charts/SPS", "actors/sps_.*", "charts/updates_per_s"]],
            "learner": ["Multiline", ["losses/td_loss", "losses/q_values", "learner/.*"]],
            "replay": ["Multiline", ["replay/size", "replay/mean_priority",
                                     "replay/importance_weight"]],
        }
    }  # fmt: skip


def write_hparams(writer: Any, cfg: Config) -> None:
    """The run's settings as TensorBoard hyperparameters, in the run's own event file
    (``SummaryWriter.add_hparams`` would start a second run directory)."""
    from torch.utils.tensorboard.summary import hparams

    values = {k: v for k, v in cfg.to_dict().items() if isinstance(v, bool | int | float | str)}
    metrics = {"eval/episodic_return_mean": 0.0, "charts/episodic_return": 0.0}
    for summary in hparams(values, metrics):
        writer.file_writer.add_summary(summary)


class RunMetrics:
    def __init__(self, cfg: Config, writer: Any, counters: Counters):
        self.cfg, self.writer, self.counters = cfg, writer, counters
        population = max(cfg.num_actors, cfg.max_actors)
        auto = population <= WORKER_CHARTS_AUTO_MAX
        self.worker_charts = cfg.worker_charts == "on" or (cfg.worker_charts == "auto" and auto)
        self.versions: dict[int, int] = {}  # actor index -> weights version it acts with
        self.lost_transitions = self.shard_restarts = self.failed_pushes = 0
        self._asked: InFlight[tuple[str, int]] = InFlight()  # at most one per worker
        self._incarnations: dict[int, tuple[int, int]] = {}  # shard -> (incarnation, size)
        self._shards: dict[int, ShardStats] = {}  # the last stats of each shard
        self.inserted = 0  # transitions the shards took, over all their incarnations
        self._added: dict[int, tuple[int, int]] = {}  # shard -> (incarnation, added) seen
        self._ratio_from: tuple[int, int] | None = None  # (updates, inserted) at the last log
        self._reported: dict[int, float] = {}  # actor -> when its last report came
        # Gathered over one log interval, written and reset by log():
        self._sps: dict[int, float] = {}  # actor -> agent steps per second
        self._pushes: dict[int, int] = {}  # actor -> pushes in flight
        self._bucket_scores: list[list[float]] = [[] for _ in range(EPSILON_BUCKETS)]
        self._input_wait = (0.0, time.monotonic())  # learner's waiting seconds, when read

    # ---------------------------------------------------------------------- collecting
    def collect(self, sup: Supervisor, frames_only: bool = False) -> LearnerStats | None:
        """Take the reports of actors and shards (waiting at most one log interval) and
        the learner's stats; None if the learner did not answer. ``frames_only``: the
        actors' reports alone (frames and episodes), and None; the learner's means and
        the shards' stats are left for the next full collection."""
        self.versions = {i: v for i, v in self.versions.items() if i in sup.actors}
        for actor in sup.running_actors():
            if ("actor", actor.index) not in self._asked:
                self._asked.add(actor.handle.drain.remote(), ("actor", actor.index))
        for shard in [] if frames_only else sup.shards:
            if ("shard", shard.index) not in self._asked:
                self._asked.add(shard.handle.stats.remote(), ("shard", shard.index))
        for (kind, i), ref in self._asked.take(timeout=self.cfg.log_interval_s):
            with contextlib.suppress(ray.exceptions.RayError):
                if kind == "actor":
                    self._actor_report(ray.get(ref), known=i in sup.actors)
                else:
                    self._shard_stats(i, ray.get(ref), sup)
        if frames_only:
            return None
        try:
            return ray.get(sup.learner.handle.stats.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            return None  # a dead learner is restarted by the supervisor

    def _actor_report(self, report: ActorReport, known: bool) -> None:
        c, w, i = self.counters, self.writer, report.index
        c.env_frames += report.env_steps * self.cfg.frame_skip
        self.failed_pushes += report.pushes_failed
        now = time.monotonic()
        if i in self._reported and now > self._reported[i]:
            self._sps[i] = report.env_steps / (now - self._reported[i])
        self._reported[i] = now
        self._pushes[i] = report.pushes_in_flight
        if known:
            self.versions[i] = report.weights_version
        scores = [ep.score for ep in report.episodes]
        for ep in report.episodes:
            w.add_scalar("charts/episodic_return", ep.score, c.env_frames)
            w.add_scalar("charts/episodic_length", ep.length, c.env_frames)
            self._bucket_scores[epsilon_bucket(ep.epsilon)].append(ep.score)
        if scores:
            c.episodes += len(scores)
            c.best_score = max(c.best_score, *scores)
            c.recent_scores = (c.recent_scores + scores)[-100:]
        if self.worker_charts:
            if scores:
                w.add_scalar(f"actors/{i}/episodic_return", float(np.mean(scores)), c.env_frames)
            w.add_scalar(f"actors/{i}/pushes_in_flight", report.pushes_in_flight, c.env_frames)

    def _shard_stats(self, s: int, stats: ShardStats, sup: Supervisor) -> None:
        """Keep a shard's stats for the aggregates; a new incarnation means it restarted,
        empty."""
        last = self._incarnations.get(s)
        if last is not None and stats.incarnation != last[0]:
            lost = last[1]  # at least: what it held when last seen
            self.lost_transitions += lost
            self.shard_restarts += 1
            print(f"replay shard {s} restarted empty: {lost:,} transitions lost "
                  f"({self.lost_transitions:,} in all)", flush=True)  # fmt: skip
            sup.shard_restarted(s)
        self._incarnations[s] = (stats.incarnation, stats.size)
        self._shards[s] = stats
        incarnation, before = self._added.get(s, (None, 0))  # a restarted shard counts from 0
        self.inserted += stats.added - (before if incarnation == stats.incarnation else 0)
        self._added[s] = (stats.incarnation, stats.added)
        if self.worker_charts:
            step = self.counters.env_frames
            for key in SHARD_TAGS:  # actor i pushes to shard i % S
                self.writer.add_scalar(f"replay/{s}/{key}", getattr(stats, key), step)
            if stats.size:  # mean p^alpha of the items held
                self.writer.add_scalar(f"replay/{s}/mean_priority",
                                       stats.total_priority / stats.size, step)  # fmt: skip

    # ------------------------------------------------------------------------- logging
    def log(self, fps: float, ups: float | None, learner: LearnerStats | None,
            sup: Supervisor) -> None:  # fmt: skip
        """Write the interval's scalars and print the console line."""
        c, w, cfg = self.counters, self.writer, self.cfg
        step = c.env_frames
        version = learner.weights_version if learner else -1
        replay_size = learner.replay_size if learner else 0
        scalars = dict(learner.metrics) if learner else {}
        if learner is not None:
            scalars.update(self._learner_scalars(learner))
        scalars.update(self._actor_scalars(version, step))
        scalars.update(self._replay_scalars())
        running = len(sup.running_actors())
        scalars.update({
            "charts/env_frames_per_s": fps,
            "charts/SPS": fps / cfg.frame_skip,
            "replay/size": replay_size,
            "charts/learner_updates": learner.updates if learner else 0,
            "charts/episodes": c.episodes,
            "charts/learner_restarts": sup.learner_restarts,
            "charts/actors": len(sup.actors),
            "charts/actors_running": running,
            "cluster/cpus": sup.cpus,
            "replay/lost_transitions": self.lost_transitions,
            "replay/shard_restarts": self.shard_restarts,
            "replay/failed_pushes": self.failed_pushes,
        })  # fmt: skip
        if ups is not None:
            scalars["charts/updates_per_s"] = ups
            scalars["charts/samples_per_s"] = ups * cfg.batch_size
        ratio = self._samples_per_insert(learner)
        if ratio is not None:
            scalars["replay/samples_per_insert"] = ratio
        for tag, value in scalars.items():
            w.add_scalar(tag, value, step)
        w.flush()
        recent = f"{np.mean(c.recent_scores):.1f}" if c.recent_scores else "-"
        best = f"{c.best_score:.0f}" if c.episodes else "-"
        loss = scalars.get("losses/td_loss", float("nan"))
        lag = scalars["charts/weight_version_lag"]
        eta = max(0, cfg.total_frames - step) / fps if fps > 0 else float("inf")
        print(
            f"[{hms(c.wall_time_s)}] frames {si(step)}/{si(cfg.total_frames)}"
            f"  fps {fps:,.0f}  upd/s {ups if ups is not None else 0:.1f}"
            f"  actors {running}"
            f"  score {recent} (best {best}, {c.episodes} eps)"
            f"  replay {replay_size:,}  spi {'-' if ratio is None else f'{ratio:.2f}'}"
            f"  loss {loss:.4f}  lag {lag:.0f}  ETA {hms(eta)}",
            flush=True,
        )

    def _samples_per_insert(self, learner: LearnerStats | None) -> float | None:
        """The replay ratio achieved over the last interval: transitions trained on
        (updates times the batch) per transition the shards took; None for the first
        interval, one with no insert, or across a learner restart."""
        if learner is None:
            return None
        last, self._ratio_from = self._ratio_from, (learner.updates, self.inserted)
        if last is None or learner.updates < last[0] or self.inserted <= last[1]:
            return None
        return (learner.updates - last[0]) * self.cfg.batch_size / (self.inserted - last[1])

    def _learner_scalars(self, learner: LearnerStats) -> dict[str, float]:
        """Beta, and the share of the last interval the learner waited for a batch."""
        now, (waited, then) = time.monotonic(), self._input_wait
        # The learner counts since it started: a restarted one counts from 0 again.
        delta = learner.input_wait_s - waited if learner.input_wait_s >= waited else 0.0
        self._input_wait = (learner.input_wait_s, now)
        return {"learner/beta": learner.beta,
                "learner/input_wait_fraction": min(1.0, delta / max(now - then, 1e-9))}  # fmt: skip

    def _actor_scalars(self, version: int, step: int) -> dict[str, float]:
        """Aggregates over the actors (and, with worker charts, each actor's own)."""
        out: dict[str, float] = {}
        known = {i: v for i, v in self.versions.items() if v >= 0}
        lags = np.array([version - v for v in known.values()], dtype=np.float64)
        out["charts/weight_version_lag"] = float(lags.mean()) if len(lags) else float("nan")
        if len(lags):
            out["actors/weight_version_lag_max"] = float(lags.max())
        if self.worker_charts:
            for i, v in known.items():
                self.writer.add_scalar(f"actors/{i}/weights_version", v, step)
                self.writer.add_scalar(f"actors/{i}/weight_version_lag", version - v, step)
        if self._sps:
            sps = np.array(list(self._sps.values()))
            out.update({f"actors/sps_p{q}": float(np.percentile(sps, q)) for q in (10, 50, 90)})
            out["actors/sps_min"] = float(sps.min())
            out["actors/slowest"] = min(self._sps, key=self._sps.__getitem__)
        if self._pushes:
            out["actors/pushes_in_flight_max"] = max(self._pushes.values())
        for band, scores in enumerate(self._bucket_scores):
            if scores:
                out[epsilon_bucket_tag(band)] = float(np.mean(scores))
        self._sps, self._pushes = {}, {}
        self._bucket_scores = [[] for _ in range(EPSILON_BUCKETS)]
        return out

    def _replay_scalars(self) -> dict[str, float]:
        """Sums over the shards' last stats."""
        if not self._shards:
            return {}
        shards = self._shards.values()
        size = sum(s.size for s in shards)
        total = sum(s.total_priority for s in shards)
        out = {"replay/total_priority": total,
               "replay/added": sum(s.added for s in shards),
               "replay/dropped": sum(s.dropped for s in shards)}  # fmt: skip
        if size:
            out["replay/mean_priority"] = total / size  # mean p^alpha of the items held
        return out


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
