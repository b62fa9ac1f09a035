"""One typed, frozen, validated configuration for the whole system.

Every field has a type, a default and a one-line help text; the command line of
``train.py`` is generated from these fields, so ``python train.py --help`` always
documents every setting. ``0`` on the fields marked *auto* means "size it for the
machine" (or, for ``lr`` and ``optimizer_eps``, "the chosen optimizer's default") and is
resolved once, by :func:`resolve_auto`, before validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

NETWORKS = ("nature", "dqn2013")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class OptimizerDefaults:
    """What ``--lr 0`` and ``--optimizer-eps 0`` (auto) become for one optimizer."""

    lr: float
    eps: float


# The settings each optimizer gets unless --lr or --optimizer-eps is given. RMSProp's are
# those of Ape-X (Horgan et al. 2018, centred RMSProp: learning rate 0.00025/4, decay 0.95,
# epsilon 1.5e-7, no momentum). torch adds eps outside the square root and DeepMind's
# implementations add it inside: see learner.learning.build_optimizer for the relation.
# Adam's epsilon 1.5e-4 is Rainbow's (Hessel et al. 2018).
OPTIMIZER_DEFAULTS: dict[str, OptimizerDefaults] = {
    "adam": OptimizerDefaults(lr=1e-4, eps=1.5e-4),
    "rmsprop": OptimizerDefaults(lr=0.00025 / 4, eps=1.5e-7),
}
OPTIMIZERS = tuple(OPTIMIZER_DEFAULTS)
# Centred RMSProp's decay of both running averages, E[g] and E[g^2]: 0.95 in Mnih et al.
# 2015 (their "gradient momentum" and "squared gradient momentum") and in Ape-X.
RMSPROP_ALPHA = 0.95
# Settings that earlier versions saved under another name, as read back by Config.from_dict.
RENAMED = {"adam_eps": "optimizer_eps"}
AMP_MODES = ("auto", "on", "off")
# Settings that earlier versions saved with another type: how Config.from_dict reads them.
RETYPED: dict[str, Any] = {
    "amp": lambda v: ("on" if v else "off") if isinstance(v, bool) else v,  # was a bool
}
EPSILON_SPREADS = ("env", "actor")
PRECISIONS = ("auto", "float32", "bfloat16")
WORKER_CHARTS = ("auto", "on", "off")
WORKER_CHARTS_AUTO_MAX = 8  # "auto": per-worker charts for populations up to this many
REPLAY_PLACEMENTS = ("auto", "learner", "spread")
REPLAY_WIRES = ("auto", "raw", "frames", "zstd")

# Bytes one stored transition costs in a full replay shard (one 84x84 frame plus
# keys, indices and the sum tree); used only to size the default replay capacity.
BYTES_PER_TRANSITION = 7_300


# Named settings for a kind of machine; flags given on the command line still win.
PRESETS: dict[str, dict[str, Any]] = {
    # 2-4 CPU cores, no GPU: the best score per wall-clock minute there. One actor with
    # 16 envs keeps one core busy; the small 2013 network (with a dueling head) lets the
    # learner on the other core train ~1 sample per transition collected at batch 32; a
    # higher learning rate and a shorter target period suit runs of an hour or less. The
    # replay ratio is held at what that run gives free-running on a 2-core machine, where
    # it learned ~520 in 30 minutes (0.59: 51,702 batches of 32 for 2.8M transitions), so a
    # machine with a faster or slower emulator or learner learns per frame as that one did.
    # Free-running, 2-core runs without evaluations give 0.64-0.72 (benchmarks/replay_ratio
    # .py): held at 0.7 the learner makes 1.23x the updates for the same frames, but a
    # 30-minute run at 0.7 scored no better than at 0.6 (README, Results), so 0.6 stays.
    "laptop": {
        "num_actors": 1, "envs_per_actor": 16, "replay_shards": 1,
        "network": "dqn2013", "dueling": True, "batch_size": 32, "lr": 2.5e-4,
        "replay_capacity": 200_000, "replay_min_size": 10_000,
        "target_update_period": 1_000, "eval_interval_s": 300.0, "samples_per_insert": 0.6,
    },
}  # fmt: skip
# What --preset auto (the default) stands for: "laptop" where a CPU learner limits learning
# and the machine is small, "none" (no preset: the defaults, sized for the machine by
# resolve_auto) elsewhere; see choose_preset. Without a GPU the learner trains on one
# core (Ray gives it one CPU, so torch runs one thread) whatever the machine. In a run on
# 2 cores the Nature network trains there 5-6 batches of 64 a second (~350 samples/s)
# and the laptop's 2013 network ~30 of 32 (~1,000/s), while one actor with 16 envs
# collects ~1,600 transitions a second, more than either consumes: more actors cannot
# make up for the slower learner. Up to 8 CPUs, the laptop preset's one actor leaves the
# rest to the learner, the evaluator and the shards; on larger machines, not measured,
# the defaults keep one actor per core.
AUTO_LAPTOP_MAX_CPUS = 8
# --preset values: auto, none (no preset; "" in configs saved by earlier versions), a name.
PRESET_CHOICES = ("auto", "none", *PRESETS)


class ConfigError(ValueError):
    """A setting is invalid; the message is one line naming the value and what is allowed."""


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


def _by_optimizer(setting: str) -> str:
    """``adam 0.0001, rmsprop 6.25e-05`` for ``setting="lr"``: the auto values, for --help."""
    return ", ".join(f"{k} {getattr(v, setting):g}" for k, v in OPTIMIZER_DEFAULTS.items())


@dataclass(frozen=True)
class Config:
    # --- environment -------------------------------------------------------------------
    game: str = _f("space_invaders", "ALE game id, snake_case or CamelCase (any ALE ROM)")
    noop_max: int = _f(30, "up to this many random no-op actions at the start of an episode")
    frame_skip: int = _f(4, "emulator frames per agent step (max-pooled over the last two)")
    max_episode_frames: int = _f(108_000, "truncate an episode after this many frames")
    sticky_action_prob: float = _f(0.0, "repeat-action probability (Machado et al. 2018: 0.25)")
    terminal_on_life_loss: bool = _f(False, "treat a lost life as terminal for learning")
    # --- actors ------------------------------------------------------------------------
    num_actors: int = _f(0, "Ray actor processes stepping environments (0 = auto)")
    max_actors: int = _f(
        0, "start more actors, up to this many, as CPUs become free (0 = --num-actors: fixed)"
    )
    envs_per_actor: int = _f(16, "environments each actor steps")
    actor_lanes: int = _f(
        1,
        "groups of an actor's envs stepped in turn: 2 overlaps inference with emulation "
        "(worth it with --actor-threads 2)",
    )
    epsilon_spread: str = _f(
        "env",
        "Ape-X epsilons 0.4**(1+7i/(N-1)) over every env of every actor, or one per actor",
        choices=EPSILON_SPREADS,
    )
    push_period: int = _f(50, "actor steps between pushes of transitions to replay")
    max_pushes_in_flight: int = _f(4, "unacknowledged pushes per actor before it waits")
    weight_sync_period: int = _f(100, "actor steps between checks for newer weights")
    actor_threads: int = _f(1, "torch and emulator threads per actor")
    actor_precision: str = _f(
        "auto",
        "actor inference dtype (auto: bfloat16 where the CPU has bf16 kernels)",
        choices=PRECISIONS,
    )
    # --- replay ------------------------------------------------------------------------
    replay_shards: int = _f(0, "replay shard processes (0 = auto)")
    replay_capacity: int = _f(0, "transitions held over all shards (0 = auto, from memory)")
    replay_min_size: int = _f(20_000, "transitions in replay before learning starts")
    samples_per_insert: float = _f(
        0.0,
        "replay ratio: transitions sampled per transition inserted, held by making actors' "
        "pushes or the learner's samples wait (0: free-running, whatever the speeds give)",
    )
    samples_per_insert_tolerance: float = _f(
        0.0,
        "how many sampled transitions the learner may run ahead of or behind that ratio "
        "(0 = auto: every push and sample request in flight fits)",
    )
    priority_alpha: float = _f(0.6, "prioritization exponent alpha")
    priority_beta: float = _f(0.4, "initial importance-sampling exponent beta")
    beta_anneal_updates: int = _f(500_000, "learner updates over which beta rises to 1")
    replay_placement: str = _f(
        "auto",
        "where shards run: on the learner's node, spread over nodes, or auto (the learner's "
        "node when its memory holds them all)",
        choices=REPLAY_PLACEMENTS,
    )
    replay_wire: str = _f(
        "auto",
        "batches from shards to the learner: stacked (raw), distinct frames once (frames), "
        "those compressed (zstd), or auto (raw on the learner's node, zstd across nodes)",
        choices=REPLAY_WIRES,
    )
    # --- learner -----------------------------------------------------------------------
    network: str = _f("nature", "Q-network torso", choices=NETWORKS)
    dueling: bool = _f(True, "dueling value/advantage head")
    n_step: int = _f(3, "steps in the multi-step return")
    gamma: float = _f(0.99, "discount factor per agent step")
    batch_size: int = _f(0, "learner minibatch (0 = auto: 512 on a GPU, 64 on a CPU)")
    optimizer: str = _f("adam", "optimizer (rmsprop: centred, as in Ape-X)", choices=OPTIMIZERS)
    lr: float = _f(0.0, f"learning rate (0 = auto: {_by_optimizer('lr')})")
    optimizer_eps: float = _f(
        0.0, f"epsilon in the optimizer's denominator (0 = auto: {_by_optimizer('eps')})"
    )
    grad_clip: float = _f(40.0, "clip the gradient norm to this")
    target_update_period: int = _f(2_000, "learner updates between target-network copies")
    publish_period: int = _f(25, "learner updates between weight broadcasts to actors")
    prefetch_batches: int = _f(4, "sample requests the learner keeps in flight")
    device: str = _f("auto", "learner device", choices=DEVICES)
    amp: str = _f(
        "auto",
        "bf16 autocast of the learner's torso (convolutions, hidden layer), its Q head, targets "
        "and loss in float32; auto: on with CUDA or a CPU with native bf16 (avx512_bf16, "
        "amx_bf16), off elsewhere; --amp alone: on",
        choices=AMP_MODES, bare="on",
    )  # fmt: skip
    compile: bool = _f(False, "torch.compile the learner's network")
    # --- evaluation --------------------------------------------------------------------
    eval_interval_s: float = _f(600.0, "seconds between evaluations of the newest weights (0: off)")
    eval_episodes: int = _f(10, "episodes per evaluation (standard protocol, unclipped score)")
    eval_epsilon: float = _f(0.05, "epsilon of the evaluation policy")
    eval_video: bool = _f(True, "record a video every third evaluation (TensorBoard Images tab)")
    final_eval_episodes: int = _f(
        10, "episodes of the final evaluation of the final weights, at every run's end (0: off)"
    )
    final_eval_s: float = _f(
        60.0, "seconds the final evaluation may play at most; a second Ctrl-C skips it"
    )
    # --- run ---------------------------------------------------------------------------
    preset: str = _f(
        "auto",
        f"named settings ({', '.join(PRESETS)}), none, or auto: laptop without a GPU on up to "
        f"{AUTO_LAPTOP_MAX_CPUS} CPUs, none elsewhere; flags given still win",
    )
    total_frames: int = _f(20_000_000, "stop after this many environment frames")
    seed: int = _f(0, "random seed")
    logdir: str = _f(
        "",
        "TensorBoard and checkpoint directory, one run's alone (empty: runs/<game>-<time>; "
        "on --resume: the run's directory)",
    )
    address: str = _f(
        "",
        "Ray cluster to join (empty: RAY_ADDRESS, a running ray start, else local; auto: "
        "RAY_ADDRESS or that ray start's cluster, never a local Ray)",
    )
    resume: str = _f(
        "",
        "continue a run (its directory, one checkpoint file, or its copy in storage: "
        "s3://bucket/prefix/NAME, gs://...) with the settings it saved; flags given change them",
    )
    log_interval_s: float = _f(10.0, "seconds between console lines and TensorBoard points")
    worker_charts: str = _f(
        "auto",
        f"TensorBoard charts per actor and per shard (auto: on up to {WORKER_CHARTS_AUTO_MAX} "
        "actors); aggregates over all of them are always logged",
        choices=WORKER_CHARTS,
    )
    checkpoint_interval_s: float = _f(300.0, "seconds between checkpoints")
    keep_checkpoints: int = _f(3, "checkpoints kept on disk")
    storage: str = _f(
        "",
        "durable copy of the run's checkpoints and TensorBoard files, kept as they are "
        "written: a local path, s3://bucket/prefix or gs://bucket/prefix (<storage>/<run "
        "directory's name>/)",
    )
    save_replay: bool = _f(
        False,
        "each checkpoint also saves every shard's replay (~115 MB per million Space Invaders "
        "transitions), so --resume learns at once instead of refilling --replay-min-size",
    )

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Config:
        """A config saved by :meth:`to_dict`, by this version or an earlier one.

        Settings saved under an earlier name (:data:`RENAMED`, e.g. ``adam_eps``) are read
        under their present one, and those saved with an earlier type (:data:`RETYPED`,
        e.g. ``amp`` as a bool) as their present type; settings this version no longer
        knows are dropped.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {RENAMED[k]: v for k, v in saved.items() if k in RENAMED}
        values.update(saved)  # a setting saved under its present name wins
        values.update({k: RETYPED[k](v) for k, v in values.items() if k in RETYPED})
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def frames_per_step(self) -> int:
        return self.frame_skip


def normalize_game(game: str) -> str:
    """``SpaceInvaders``, ``ALE/SpaceInvaders-v5`` and ``space_invaders`` all name one ROM."""
    name = game.strip()
    name = re.sub(r"^ALE/", "", name)
    name = re.sub(r"(NoFrameskip)?-v\d+$", "", name)
    if "_" not in name and name != name.lower():
        # A capital after a digit stays with it: TicTacToe3D is tic_tac_toe_3d.
        name = re.sub(r"(?<!^)(?<!\d)(?=[A-Z])|(?<=[a-z])(?=\d[A-Z])", "_", name)
    return name.lower()


def resolve_auto(cfg: Config, *, cpus: int, gpus: int, memory_bytes: int) -> Config:
    """Fill the fields left at 0 (auto): sizes from the resources Ray reports, and the
    optimizer's settings by :func:`resolve_optimizer`."""
    changes: dict[str, Any] = {"game": normalize_game(cfg.game)}
    if cfg.num_actors == 0:
        changes["num_actors"] = max(1, cpus - 1)
    actors = changes.get("num_actors", cfg.num_actors)
    if cfg.replay_shards == 0:
        changes["replay_shards"] = max(1, min(8, actors // 8))
    if cfg.replay_capacity == 0:
        by_memory = int(0.3 * memory_bytes / BYTES_PER_TRANSITION)
        changes["replay_capacity"] = max(50_000, min(1_000_000, by_memory // 10_000 * 10_000))
    if cfg.device == "auto":
        changes["device"] = "cuda" if gpus > 0 else "cpu"
    device = changes.get("device", cfg.device)
    if cfg.batch_size == 0:
        changes["batch_size"] = 512 if device == "cuda" else 64
    if not cfg.logdir:
        changes["logdir"] = default_logdir(changes["game"])
    return resolve_optimizer(cfg.replace(**changes))


def default_logdir(game: str) -> str:
    """``runs/<game>-<date>-<time>``: where a run writes unless ``--logdir`` is given
    (``train.py`` adds ``-2``, ``-3``, ... when another run took the name that second)."""
    import time

    return os.path.join("runs", f"{normalize_game(game)}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_optimizer(cfg: Config) -> Config:
    """``cfg`` with ``lr`` and ``optimizer_eps`` left at 0 (auto) set to the defaults of
    ``cfg.optimizer`` (:data:`OPTIMIZER_DEFAULTS`); values given explicitly are kept.

    The one place those defaults are applied: :func:`resolve_auto` calls it, so the run's
    config table and checkpoints show the values in effect, and the learner calls it, so
    a config built in code without :func:`resolve_auto` gets the same optimizer.
    """
    defaults = OPTIMIZER_DEFAULTS.get(cfg.optimizer)
    if defaults is None:  # an unknown optimizer is reported by validate()
        return cfg
    return cfg.replace(lr=cfg.lr or defaults.lr, optimizer_eps=cfg.optimizer_eps or defaults.eps)


def _positive(cfg: Config, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not allow_zero):
            allowed = "an integer >= 0" if allow_zero else "a positive number"
            raise ConfigError(f"--{_flag(name)}={value} is invalid: must be {allowed}")


def validate(cfg: Config, *, gpus: int | None = None) -> None:
    """Raise :class:`ConfigError` with one line for the first invalid setting.

    ``gpus`` is the number of GPUs visible to the cluster, when known; with it,
    ``--device cuda`` on a machine without one is refused here rather than later.
    """
    _positive(
        cfg, "num_actors", "max_actors", "replay_shards", "replay_capacity", "batch_size",
        allow_zero=True,
    )  # fmt: skip
    if cfg.max_actors and cfg.num_actors and cfg.max_actors < cfg.num_actors:
        raise ConfigError(
            f"--max-actors={cfg.max_actors} is invalid: must be 0 (a fixed population) or "
            f">= --num-actors={cfg.num_actors}"
        )
    _positive(
        cfg,
        "frame_skip", "max_episode_frames", "envs_per_actor", "push_period",
        "max_pushes_in_flight", "weight_sync_period", "actor_threads", "actor_lanes", "n_step",
        "target_update_period", "publish_period", "prefetch_batches", "total_frames",
        "log_interval_s", "checkpoint_interval_s", "keep_checkpoints", "grad_clip",
        "beta_anneal_updates",
    )  # fmt: skip
    for name in ("lr", "optimizer_eps"):
        if getattr(cfg, name) < 0:
            raise ConfigError(
                f"--{_flag(name)}={getattr(cfg, name)} is invalid: must be a positive number, "
                "or 0 for the optimizer's default"
            )
    _positive(
        cfg, "noop_max", "replay_min_size", "priority_alpha", "seed", "eval_interval_s",
        "final_eval_episodes", allow_zero=True,
    )  # fmt: skip
    _positive(cfg, "eval_episodes", "final_eval_s")
    for name, allowed in (
        ("network", NETWORKS),
        ("device", DEVICES),
        ("optimizer", OPTIMIZERS),
        ("epsilon_spread", EPSILON_SPREADS),
        ("actor_precision", PRECISIONS),
        ("amp", AMP_MODES),
        ("worker_charts", WORKER_CHARTS),
        ("replay_placement", REPLAY_PLACEMENTS),
        ("replay_wire", REPLAY_WIRES),
    ):
        if getattr(cfg, name) not in allowed:
            value = getattr(cfg, name)
            raise ConfigError(
                f"--{_flag(name)}={value!r} is unknown: choose one of {', '.join(allowed)}"
            )
    for name in ("gamma", "sticky_action_prob", "eval_epsilon"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"--{_flag(name)}={value} is invalid: must be in [0, 1]")
    if cfg.envs_per_actor % cfg.actor_lanes:
        raise ConfigError(
            f"--actor-lanes={cfg.actor_lanes} is invalid: must divide "
            f"--envs-per-actor={cfg.envs_per_actor}"
        )
    if cfg.push_period < cfg.n_step + 4:
        raise ConfigError(
            f"--push-period={cfg.push_period} is invalid: must be >= --n-step + 4 = "
            f"{cfg.n_step + 4} (a chunk may refer back that far into the previous one)"
        )
    if not 0.0 <= cfg.priority_beta <= 1.0:
        raise ConfigError(f"--priority-beta={cfg.priority_beta} is invalid: must be in [0, 1]")
    if (
        cfg.replay_shards
        and cfg.replay_capacity
        and cfg.replay_capacity // cfg.replay_shards
        < max(cfg.batch_size, cfg.push_period * cfg.envs_per_actor)
    ):
        need = max(cfg.batch_size, cfg.push_period * cfg.envs_per_actor) * cfg.replay_shards
        raise ConfigError(
            f"--replay-capacity={cfg.replay_capacity} is too small: each of the "
            f"{cfg.replay_shards} shards must hold a batch and a push, so at least {need}"
        )
    if cfg.replay_capacity and cfg.replay_min_size > cfg.replay_capacity:
        raise ConfigError(
            f"--replay-min-size={cfg.replay_min_size} is invalid: must be <= "
            f"--replay-capacity={cfg.replay_capacity}"
        )
    if cfg.replay_capacity and cfg.batch_size > cfg.replay_capacity:
        raise ConfigError(f"--batch-size={cfg.batch_size} is invalid: must be <= --replay-capacity")
    _validate_ratio(cfg)
    _validate_storage(cfg)
    _validate_game(cfg.game)
    if cfg.device == "cuda" and gpus is not None and gpus == 0:
        raise ConfigError("--device=cuda is invalid: no GPU is visible; use --device auto or cpu")


def _validate_storage(cfg: Config) -> None:
    """The storage URIs' form (a known scheme, a bucket name); reaching them is checked
    before the run starts (``apex_dqn.common.storage.open_storage``)."""
    from apex_dqn.common.storage import check_uri, is_uri

    if cfg.storage:
        check_uri(cfg.storage, "--storage")
    if cfg.resume and is_uri(cfg.resume):
        check_uri(cfg.resume, "--resume")


def _validate_ratio(cfg: Config) -> None:
    """The replay ratio and its band: finite, >= 0, and a band wide enough that actors and
    learner can never both wait (``replay/rate_limiter.py``)."""
    import math

    from apex_dqn.replay.rate_limiter import config_push, least_error_buffer

    for name in ("samples_per_insert", "samples_per_insert_tolerance"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(
                f"--{_flag(name)}={value} is invalid: must be a number >= 0 (0: "
                + ("free-running)" if name == "samples_per_insert" else "auto)")
            )
    tolerance, spi = cfg.samples_per_insert_tolerance, cfg.samples_per_insert
    if spi and tolerance and cfg.batch_size:
        least = least_error_buffer(spi, config_push(cfg), cfg.batch_size)
        if tolerance < least:
            raise ConfigError(
                f"--samples-per-insert-tolerance={tolerance:g} is too small: with "
                f"--samples-per-insert={spi:g}, pushes of up to {config_push(cfg)} "
                f"transitions and batches of {cfg.batch_size} it must be >= {least:g} "
                "(0: auto), or actors and learner could both wait for ever"
            )


def _validate_game(game: str) -> None:
    from apex_dqn.common.envs import available_games

    name = normalize_game(game)
    games = available_games()
    if name not in games:
        close = [g for g in games if name[:4] in g][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"--game={game!r} is not an ALE game: use a ROM id such as space_invaders or "
            f"breakout{hint}"
        )


def _flag(name: str) -> str:
    return name.replace("_", "-")


def build_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """The command line of ``train.py``; ``only_given`` leaves out flags not given."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Ape-X distributed prioritized DQN for Atari on Ray.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(Config):
        flag = "--" + _flag(f.name)
        default = argparse.SUPPRESS if only_given else f.default
        kwargs: dict[str, Any] = {"default": default, "help": f.metadata["help"], "dest": f.name}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[str(f.type)]
            kwargs["metavar"] = f.name.upper()
        if "bare" in f.metadata:  # the flag given without a value means this one
            kwargs.update(nargs="?", const=f.metadata["bare"])
        parser.add_argument(flag, **kwargs)
    return parser


def from_args(argv: list[str] | None = None) -> Config:
    """Parse the command line into a :class:`Config` (autos not yet resolved).

    With ``--preset NAME`` the preset's settings replace the defaults of the flags not
    given on the command line; ``--preset auto`` is left for :func:`resolve_preset`,
    once the machine is known.
    """
    args = vars(build_parser().parse_args(argv))
    _check_preset(args["preset"])
    cfg = Config(**args)
    return apply_preset(cfg, cfg.preset, argv) if cfg.preset in PRESETS else cfg


def _check_preset(name: str) -> None:
    if name and name not in PRESET_CHOICES:
        choices = ", ".join(PRESET_CHOICES)
        raise ConfigError(f"--preset={name!r} is unknown: choose one of {choices}")


def apply_preset(cfg: Config, name: str, argv: list[str] | None) -> Config:
    """``cfg`` with preset ``name``'s settings (none for ``none``) in place of those of the
    flags not given in ``argv``, and ``preset=name``: the run records what it used."""
    given = vars(build_parser(only_given=True).parse_args(argv))
    chosen = {k: v for k, v in PRESETS.get(name, {}).items() if k not in given}
    return cfg.replace(**chosen, preset=name)


def choose_preset(cfg: Config, *, cpus: int, gpus: int, joined: bool) -> tuple[str, str]:
    """(preset, why) that ``--preset auto`` stands for: ``laptop`` when the learner will
    train on the CPU (no GPU, or ``--device cpu``) of a machine of at most
    :data:`AUTO_LAPTOP_MAX_CPUS` CPUs, where that preset learns fastest per minute;
    ``none`` on a GPU machine, a larger one, or a cluster joined (``joined``)."""
    if joined:
        return "none", "a Ray cluster joined, settings sized from its resources"
    on_cpu = gpus == 0 or cfg.device == "cpu"
    where = f"{gpus} GPU{'s' if gpus > 1 else ''}" if gpus else "no GPU"
    if gpus and cfg.device == "cpu":
        where += " but --device cpu"
    machine = f"{where}, {cpus} CPU{'s' if cpus > 1 else ''}"
    if not on_cpu:
        return "none", f"{machine}: the defaults, learner on the GPU"
    if cpus > AUTO_LAPTOP_MAX_CPUS:
        return "none", f"{machine} (more than {AUTO_LAPTOP_MAX_CPUS}): the defaults"
    return "laptop", machine


def validate_flags(cfg: Config, argv: list[str] | None) -> None:
    """:func:`validate` a new run's command line before the machine is looked at (torch
    and Ray take seconds to import). Under ``--preset auto`` the preset is not chosen yet:
    a setting is refused here when it is invalid under each preset auto may pick, else
    only once the preset is chosen (:func:`resolve_preset`, then :func:`validate`)."""
    if cfg.preset != "auto":
        validate(cfg)
        return
    errors = []
    for name in ("none", "laptop"):  # what choose_preset may pick
        try:
            validate(apply_preset(cfg, name, argv))
            return
        except ConfigError as exc:
            errors.append(exc)
    raise errors[0]


def resolve_preset(
    cfg: Config, argv: list[str] | None, *, cpus: int, gpus: int, joined: bool
) -> tuple[Config, str]:
    """``cfg`` with ``--preset auto`` replaced by the preset :func:`choose_preset` picks
    (applied as :func:`apply_preset`), and the line saying so, ``preset auto -> laptop:
    no GPU, 2 CPUs``; ``cfg`` unchanged and ``""`` for any other preset."""
    if cfg.preset != "auto":
        return cfg, ""
    name, why = choose_preset(cfg, cpus=cpus, gpus=gpus, joined=joined)
    return apply_preset(cfg, name, argv), f"preset auto -> {name}: {why}"


# Settings that say where and how this process runs rather than what the run is: a
# resumed run takes them from its own command line (or their defaults), never from the
# checkpoint, and giving them is no change of the run. The device is one: the learner's
# state moves to any device, and a run saved on a GPU machine resumes on a CPU one; so
# are where the shards go and how their batches travel, which depend on the cluster.
PROCESS_SETTINGS = (
    "address", "resume", "logdir", "device", "replay_placement", "replay_wire",
)  # fmt: skip


def _show(value: Any) -> str:
    """A setting's value as written on a command line; the empty string as ``''``."""
    return "''" if value == "" else str(value)


def _check_saved_types(saved: Config, source: str) -> None:
    """A saved config read back must hold values of the fields' types (an int for a float
    is fine); anything else is a file that is not ours, reported in one line."""
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    for f in dataclasses.fields(Config):
        value, allowed = getattr(saved, f.name), kinds[str(f.type)]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ConfigError(
                f"{source} is malformed: its setting {f.name}={value!r} is not a {f.type}"
            )


def resume_config(
    saved: dict[str, Any],
    argv: list[str] | None,
    *,
    fixed: tuple[str, ...] = (),
    source: str = "the checkpoint",
) -> tuple[Config, list[str]]:
    """The config of a resumed run: the checkpoint's, changed by the flags given.

    Every setting comes from ``saved`` (read by :meth:`Config.from_dict`), except

    * :data:`PROCESS_SETTINGS`: from the command line, or their defaults;
    * settings given on the command line, and, with ``--preset NAME``, that preset's
      settings not given: they replace the saved ones (``--preset auto`` changes nothing:
      a run keeps the preset it was resolved to when it started);
    * ``fixed`` settings (the checkpoint's structural ones): giving one a value other
      than the saved one raises :class:`ConfigError` naming both; the game is compared
      by ROM (:func:`normalize_game`).

    ``lr`` and ``optimizer_eps`` given as 0 become the optimizer's defaults
    (:func:`resolve_optimizer`), as in a new run; other autos given as 0 are resolved
    later by :func:`resolve_auto`. Returns the config and one line per changed setting,
    ``--lr 0.0001 -> 5e-05`` (old value from the checkpoint, new value in effect).
    ``source`` names the checkpoint in messages.
    """
    given = vars(build_parser(only_given=True).parse_args(argv))
    if given.get("preset") == "auto":  # the run keeps the preset it was resolved to
        del given["preset"]
    preset = given.get("preset", "")
    _check_preset(preset)
    base = Config.from_dict(saved)
    _check_saved_types(base, source)
    base = resolve_optimizer(base)
    wanted: dict[str, tuple[Any, str]] = {  # setting -> (value, where it came from)
        k: (v, f" (from --preset {preset})") for k, v in PRESETS.get(preset, {}).items()
    }
    wanted.update({k: (v, "") for k, v in given.items()})
    for name in fixed:
        if name not in wanted:
            continue
        value, origin = wanted[name]
        old = getattr(base, name)
        same = normalize_game(value) == normalize_game(old) if name == "game" else value == old
        if not same:
            raise ConfigError(
                f"--{_flag(name)} {_show(value)}{origin} cannot change on resume: {source} "
                f"was trained with {name}={old!r}, and a run keeps its {', '.join(fixed)}"
            )
        wanted[name] = (old, origin)
    process = {
        f.name: given.get(f.name, f.default)
        for f in dataclasses.fields(Config)
        if f.name in PROCESS_SETTINGS
    }
    run = {k: v for k, (v, _) in wanted.items() if k not in PROCESS_SETTINGS}
    cfg = resolve_optimizer(base.replace(**run, **process))
    changes = [
        f"--{_flag(name)} {_show(getattr(base, name))} -> {_show(getattr(cfg, name))}"
        for name in (f.name for f in dataclasses.fields(Config))
        if name in run and getattr(base, name) != getattr(cfg, name)
    ]
    return cfg, changes
