"""Config validation, game names, auto sizing, and the command line built from the fields."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apex_dqn.common.checkpoint import STRUCTURAL
from apex_dqn.common.config import (
    AUTO_LAPTOP_MAX_CPUS,
    OPTIMIZER_DEFAULTS,
    PRESETS,
    RMSPROP_ALPHA,
    Config,
    ConfigError,
    build_parser,
    choose_preset,
    from_args,
    normalize_game,
    resolve_auto,
    resolve_optimizer,
    resolve_preset,
    resume_config,
    validate,
    validate_flags,
)

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30

SMALL_PUSH = {"push_period": 50, "envs_per_actor": 8}

# (changes, flag named in the message, bad value as it appears in the message)
INVALID = [
    ({"num_actors": -1}, "--num-actors", "-1"),
    ({"replay_shards": -2}, "--replay-shards", "-2"),
    ({"replay_capacity": -5}, "--replay-capacity", "-5"),
    ({"batch_size": -1}, "--batch-size", "-1"),
    ({"envs_per_actor": 0}, "--envs-per-actor", "0"),
    ({"envs_per_actor": -3}, "--envs-per-actor", "-3"),
    ({"push_period": 0}, "--push-period", "0"),
    ({"max_pushes_in_flight": 0}, "--max-pushes-in-flight", "0"),
    ({"weight_sync_period": 0}, "--weight-sync-period", "0"),
    ({"actor_threads": 0}, "--actor-threads", "0"),
    ({"frame_skip": 0}, "--frame-skip", "0"),
    ({"max_episode_frames": -1}, "--max-episode-frames", "-1"),
    ({"n_step": 0}, "--n-step", "0"),
    ({"target_update_period": 0}, "--target-update-period", "0"),
    ({"publish_period": -1}, "--publish-period", "-1"),
    ({"prefetch_batches": 0}, "--prefetch-batches", "0"),
    ({"total_frames": 0}, "--total-frames", "0"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints", "0"),
    ({"beta_anneal_updates": 0}, "--beta-anneal-updates", "0"),
    ({"lr": -1e-4}, "--lr", "-0.0001"),
    ({"optimizer_eps": -1e-3}, "--optimizer-eps", "-0.001"),
    ({"grad_clip": -1.0}, "--grad-clip", "-1.0"),
    ({"log_interval_s": 0.0}, "--log-interval-s", "0.0"),
    ({"checkpoint_interval_s": -5.0}, "--checkpoint-interval-s", "-5.0"),
    ({"noop_max": -1}, "--noop-max", "-1"),
    ({"replay_min_size": -1}, "--replay-min-size", "-1"),
    ({"priority_alpha": -0.5}, "--priority-alpha", "-0.5"),
    ({"seed": -7}, "--seed", "-7"),
    ({"network": "foo"}, "--network", "'foo'"),
    ({"device": "tpu"}, "--device", "'tpu'"),
    ({"optimizer": "sgd"}, "--optimizer", "'sgd'"),
    ({"epsilon_spread": "game"}, "--epsilon-spread", "'game'"),
    ({"gamma": 1.5}, "--gamma", "1.5"),
    ({"gamma": -0.1}, "--gamma", "-0.1"),
    ({"sticky_action_prob": 1.25}, "--sticky-action-prob", "1.25"),
    ({"priority_beta": 1.5}, "--priority-beta", "1.5"),
    # Each shard must hold a batch...
    (
        {"replay_shards": 1, "replay_capacity": 100, "batch_size": 512, **SMALL_PUSH},
        "--replay-capacity",
        "100",
    ),
    # ...and one push (push_period * envs_per_actor = 400 transitions)...
    (
        {"replay_shards": 1, "replay_capacity": 300, "batch_size": 64, **SMALL_PUSH},
        "--replay-capacity",
        "300",
    ),
    # ...per shard, not in total.
    (
        {"replay_shards": 4, "replay_capacity": 1000, "batch_size": 64, **SMALL_PUSH},
        "--replay-capacity",
        "1000",
    ),
    (
        {"replay_shards": 1, "replay_capacity": 100_000, "replay_min_size": 200_000},
        "--replay-min-size",
        "200000",
    ),
    ({"actor_lanes": 0}, "--actor-lanes", "0"),
    ({"actor_lanes": 3, "envs_per_actor": 16}, "--actor-lanes", "3"),
    ({"actor_precision": "fp8"}, "--actor-precision", "'fp8'"),
    ({"amp": "yes"}, "--amp", "'yes'"),
    # A chunk may refer n + 4 steps back into the previous one.
    ({"push_period": 6, "n_step": 3}, "--push-period", "6"),
    ({"game": "nosuchgame"}, "--game", "'nosuchgame'"),
    ({"max_actors": -1}, "--max-actors", "-1"),
    ({"num_actors": 4, "max_actors": 2}, "--max-actors", "2"),
    ({"game": "SpaceInvadrs"}, "--game", "'SpaceInvadrs'"),
]


@pytest.mark.parametrize(("changes", "flag", "value"), INVALID, ids=lambda x: str(x))
def test_invalid_setting_raises_one_line_naming_flag_and_value(changes, flag, value):
    cfg = Config().replace(**changes)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{flag}={value} "), message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_cuda_refused_when_no_gpu_is_visible():
    cfg = Config(device="cuda")
    with pytest.raises(ConfigError) as info:
        validate(cfg, gpus=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("--device=cuda ")
    assert "GPU" in message


@pytest.mark.parametrize("gpus", [None, 1, 8])
def test_cuda_accepted_when_gpus_unknown_or_present(gpus):
    validate(Config(device="cuda"), gpus=gpus)


def test_defaults_are_valid():
    validate(Config())
    validate(Config(), gpus=0)


@pytest.mark.parametrize(
    "changes",
    [
        {"gamma": 0.0},
        {"gamma": 1.0},
        {"sticky_action_prob": 0.25},
        {"priority_beta": 1.0},
        {"noop_max": 0, "seed": 0, "replay_min_size": 0, "priority_alpha": 0.0},
        {"network": "dqn2013", "dueling": False, "optimizer": "rmsprop", "device": "cpu"},
        {"epsilon_spread": "actor"},
        {"game": "Breakout"},
        {"game": "ALE/Pong-v5"},
        # A shard holding exactly a push and a batch is enough.
        {
            "replay_shards": 2,
            "replay_capacity": 800,
            "batch_size": 400,
            "replay_min_size": 800,
            **SMALL_PUSH,
        },
        {"push_period": 7, "n_step": 3},
    ],
    ids=lambda x: str(x),
)
def test_valid_settings_pass(changes):
    validate(Config().replace(**changes))


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gamma = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("space_invaders", "space_invaders"),
        ("SpaceInvaders", "space_invaders"),
        ("ALE/SpaceInvaders-v5", "space_invaders"),
        ("SpaceInvadersNoFrameskip-v4", "space_invaders"),
        ("SpaceInvaders-v0", "space_invaders"),
        ("  Breakout ", "breakout"),
        ("breakout", "breakout"),
        ("Pong", "pong"),
        ("MontezumaRevenge", "montezuma_revenge"),
        ("ALE/MontezumaRevenge-v5", "montezuma_revenge"),
        ("Pitfall2", "pitfall2"),
        ("ALE/TicTacToe3D-v5", "tic_tac_toe_3d"),
        ("tic_tac_toe_3d", "tic_tac_toe_3d"),
        ("SPACE_INVADERS", "space_invaders"),
    ],
)
def test_normalize_game(given, expected):
    assert normalize_game(given) == expected


def test_every_gymnasium_ale_id_normalizes_to_its_rom():
    import ale_py
    import gymnasium as gym

    from apex_dqn.common.envs import available_games

    gym.register_envs(ale_py)
    roms = set(available_games())
    ids = [k for k in gym.registry if k.startswith("ALE/") or "NoFrameskip" in k]
    assert ids
    assert [(k, normalize_game(k)) for k in ids if normalize_game(k) not in roms] == []


@pytest.mark.parametrize(
    ("cpus", "gpus", "memory", "expected"),
    [
        (
            16,
            0,
            64 * GIB,
            {"num_actors": 15, "replay_shards": 1, "replay_capacity": 1_000_000},
        ),
        (1, 0, 4 * GIB, {"num_actors": 1, "replay_shards": 1, "replay_capacity": 170_000}),
        (2, 0, 1 * GIB, {"num_actors": 1, "replay_shards": 1, "replay_capacity": 50_000}),
        (
            128,
            1,
            512 * GIB,
            {"num_actors": 127, "replay_shards": 8, "replay_capacity": 1_000_000},
        ),
        (33, 1, 16 * GIB, {"num_actors": 32, "replay_shards": 4, "replay_capacity": 700_000}),
    ],
)
def test_resolve_auto_fills_zero_fields(cpus, gpus, memory, expected):
    cfg = resolve_auto(Config(game="SpaceInvaders"), cpus=cpus, gpus=gpus, memory_bytes=memory)
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name
    assert cfg.game == "space_invaders"
    assert cfg.device == ("cuda" if gpus else "cpu")
    assert cfg.batch_size == (512 if gpus else 64)
    assert (cfg.lr, cfg.optimizer_eps) == (1e-4, 1.5e-4)
    assert cfg.replay_capacity % 10_000 == 0
    assert Path(cfg.logdir).parent == Path("runs")
    assert Path(cfg.logdir).name.startswith("space_invaders-")
    validate(cfg, gpus=gpus)


def test_resolve_auto_keeps_explicit_values():
    cfg = Config(
        num_actors=3,
        replay_shards=2,
        replay_capacity=123_000,
        device="cpu",
        batch_size=32,
        lr=3e-4,
        optimizer_eps=1e-6,
        logdir="somewhere",
    )
    resolved = resolve_auto(cfg, cpus=64, gpus=1, memory_bytes=256 * GIB)
    assert resolved == cfg


def test_resolve_auto_batch_follows_explicit_device():
    resolved = resolve_auto(Config(device="cuda"), cpus=4, gpus=0, memory_bytes=8 * GIB)
    assert resolved.device == "cuda"
    assert resolved.batch_size == 512


# (command line, optimizer, learning rate and epsilon once resolved). Only --optimizer
# rmsprop gives Ape-X's centred RMSProp settings; flags given win; Adam's stay as they were.
OPTIMIZER_SETTINGS = [
    ([], "adam", 1e-4, 1.5e-4),
    (["--optimizer", "adam"], "adam", 1e-4, 1.5e-4),
    (["--optimizer", "rmsprop"], "rmsprop", 6.25e-5, 1.5e-7),
    (["--optimizer", "rmsprop", "--lr", "2.5e-4"], "rmsprop", 2.5e-4, 1.5e-7),
    (["--optimizer", "rmsprop", "--optimizer-eps", "0.1"], "rmsprop", 6.25e-5, 0.1),
    (["--optimizer", "rmsprop", "--lr", "1e-3", "--optimizer-eps", "0.01"], "rmsprop", 1e-3, 0.01),
    (["--lr", "3e-4"], "adam", 3e-4, 1.5e-4),
    (["--optimizer", "adam", "--optimizer-eps", "1e-8"], "adam", 1e-4, 1e-8),
    # The laptop preset's learning rate is still its own, and Adam's epsilon still applies.
    (["--preset", "laptop"], "adam", 2.5e-4, 1.5e-4),
    (["--preset", "laptop", "--lr", "1e-4"], "adam", 1e-4, 1.5e-4),
]


@pytest.mark.parametrize(("argv", "optimizer", "lr", "eps"), OPTIMIZER_SETTINGS, ids=str)
def test_optimizer_settings_follow_the_optimizer_unless_given(argv, optimizer, lr, eps):
    cfg = from_args(argv)
    validate(cfg)  # auto (0) is valid before it is resolved
    for resolved in (
        resolve_optimizer(cfg),
        resolve_auto(cfg, cpus=4, gpus=0, memory_bytes=8 * GIB),
    ):
        assert resolved.optimizer == optimizer
        assert (resolved.lr, resolved.optimizer_eps) == (lr, eps)
        validate(resolved)
        assert resolve_optimizer(resolved) == resolved  # resolving twice changes nothing


def test_rmsprop_defaults_are_apex_centred_rmsprop():
    assert OPTIMIZER_DEFAULTS["rmsprop"].lr == 0.00025 / 4 == 6.25e-5
    assert OPTIMIZER_DEFAULTS["rmsprop"].eps == 1.5e-7
    assert RMSPROP_ALPHA == 0.95


def test_resolve_optimizer_leaves_an_unknown_optimizer_to_validate():
    cfg = Config(optimizer="sgd")
    assert resolve_optimizer(cfg) == cfg
    with pytest.raises(ConfigError, match=r"^--optimizer='sgd' "):
        validate(resolve_optimizer(cfg))


def test_help_shows_each_optimizers_defaults():
    text = " ".join(build_parser().format_help().split())
    assert "adam 0.0001, rmsprop 6.25e-05" in text
    assert "adam 0.00015, rmsprop 1.5e-07" in text


def test_from_dict_round_trips_and_reads_earlier_names():
    cfg = resolve_optimizer(Config(optimizer="rmsprop", seed=3))
    assert Config.from_dict(cfg.to_dict()) == cfg
    # A config saved before the epsilon was renamed, with a setting since removed.
    saved = {**Config(optimizer="rmsprop", lr=1e-4).to_dict(), "no_such_setting": 1}
    del saved["optimizer_eps"]
    saved["adam_eps"] = 1.5e-4
    old = Config.from_dict(saved)
    assert (old.optimizer, old.lr, old.optimizer_eps) == ("rmsprop", 1e-4, 1.5e-4)
    # Saved under both names, the present one wins.
    assert Config.from_dict({"adam_eps": 1.0, "optimizer_eps": 2.0}).optimizer_eps == 2.0
    # amp was a bool: True and False read as on and off.
    assert Config.from_dict({"amp": True}).amp == "on"
    assert Config.from_dict({"amp": False}).amp == "off"
    assert Config.from_dict({"amp": "auto"}).amp == "auto"


def test_resume_loads_a_checkpoint_whose_amp_was_a_bool():
    for old, now in ((True, "on"), (False, "off")):
        saved = {**Config(preset="").to_dict(), "amp": old}
        cfg, changes = resume_config(saved, ["--resume", "runs/a"], fixed=STRUCTURAL)
        assert (cfg.amp, changes) == (now, [])
        validate(cfg)
    cfg, changes = resume_config(saved, ["--resume", "runs/a", "--amp", "auto"])
    assert changes == ["--amp off -> auto"]


def _to_argv(cfg: Config) -> list[str]:
    argv = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def test_from_args_without_flags_gives_defaults():
    assert from_args([]) == Config()


# -------------------------------------------------------------------- --preset auto
# (CPUs, GPUs, --device, a cluster joined) -> the preset --preset auto stands for
AUTO_PRESETS = [
    (1, 0, "auto", False, "laptop"),
    (2, 0, "auto", False, "laptop"),
    (4, 0, "auto", False, "laptop"),
    (AUTO_LAPTOP_MAX_CPUS, 0, "auto", False, "laptop"),
    (AUTO_LAPTOP_MAX_CPUS + 1, 0, "auto", False, "none"),
    (64, 0, "auto", False, "none"),
    (2, 1, "auto", False, "none"),
    (16, 8, "auto", False, "none"),
    (4, 1, "cpu", False, "laptop"),  # a GPU the learner is told not to use
    (2, 0, "auto", True, "none"),  # a cluster joined: sized from its resources
]


@pytest.mark.parametrize(("cpus", "gpus", "device", "joined", "preset"), AUTO_PRESETS, ids=str)
def test_preset_auto_resolution_table(cpus, gpus, device, joined, preset):
    argv = ["--device", device]
    cfg = from_args(argv)
    assert cfg.preset == "auto" and cfg == Config(device=device)  # nothing applied yet
    name, why = choose_preset(cfg, cpus=cpus, gpus=gpus, joined=joined)
    resolved, line = resolve_preset(cfg, argv, cpus=cpus, gpus=gpus, joined=joined)
    assert name == preset
    assert line == f"preset auto -> {preset}: {why}"
    assert resolved.preset == preset  # recorded in the run's config and checkpoints
    assert resolved == cfg.replace(**PRESETS.get(preset, {}), preset=preset)
    validate(resolved)
    validate(resolve_auto(resolved, cpus=cpus, gpus=gpus, memory_bytes=8 * GIB), gpus=gpus)


def test_preset_auto_line_names_the_machine():
    lines = {
        (2, 0): "preset auto -> laptop: no GPU, 2 CPUs",
        (1, 0): "preset auto -> laptop: no GPU, 1 CPU",
        (16, 1): "preset auto -> none: 1 GPU, 16 CPUs: the defaults, learner on the GPU",
        (32, 0): "preset auto -> none: no GPU, 32 CPUs (more than 8): the defaults",
    }
    for (cpus, gpus), line in lines.items():
        assert resolve_preset(Config(), [], cpus=cpus, gpus=gpus, joined=False)[1] == line


def test_preset_auto_flags_given_win():
    # Given explicitly, even at their defaults' values.
    argv = ["--network", "nature", "--batch-size", "64", "--lr", "0.0001", "--num-actors", "3"]
    cfg, _ = resolve_preset(from_args(argv), argv, cpus=2, gpus=0, joined=False)
    assert (cfg.network, cfg.batch_size, cfg.lr, cfg.num_actors) == ("nature", 64, 1e-4, 3)
    assert (cfg.target_update_period, cfg.replay_capacity, cfg.preset) == (1_000, 200_000, "laptop")


def test_only_preset_auto_is_resolved():
    for argv in (["--preset", "laptop"], ["--preset", "none"], ["--preset", ""]):
        cfg = from_args(argv)
        assert resolve_preset(cfg, argv, cpus=2, gpus=0, joined=False) == (cfg, "")
    assert from_args(["--preset", "none"]) == Config(preset="none")
    assert from_args(["--preset", "laptop"]) == Config(**PRESETS["laptop"], preset="laptop")
    with pytest.raises(ConfigError) as info:
        from_args(["--preset", "desktop"])
    assert str(info.value) == "--preset='desktop' is unknown: choose one of auto, none, laptop"


def test_flags_are_checked_before_the_preset_is_chosen():
    # Invalid whichever preset auto picks: refused before the machine is looked at.
    with pytest.raises(ConfigError, match=r"^--num-actors=-1 "):
        validate_flags(from_args(["--num-actors", "-1"]), ["--num-actors", "-1"])
    # Valid with the laptop preset's --replay-min-size (10,000), not the default 20,000:
    # decided once the preset is chosen.
    argv = ["--replay-capacity", "15000"]
    validate_flags(from_args(argv), argv)
    validate(resolve_preset(from_args(argv), argv, cpus=2, gpus=0, joined=False)[0])
    with pytest.raises(ConfigError, match=r"^--replay-min-size=20000 "):
        validate(resolve_preset(from_args(argv), argv, cpus=2, gpus=1, joined=False)[0])
    with pytest.raises(ConfigError, match=r"^--replay-min-size=20000 "):
        validate_flags(from_args(["--preset", "none", *argv]), ["--preset", "none", *argv])


@pytest.mark.parametrize(("cpus", "gpus"), [(2, 0), (16, 1)])
def test_a_resumed_run_keeps_the_preset_it_was_resolved_to(cpus, gpus):
    saved, _ = resolve_preset(Config(), [], cpus=cpus, gpus=gpus, joined=False)
    for flags in ([], ["--preset", "auto"]):
        cfg, changes = resume_config(saved.to_dict(), ["--resume", "runs/a", *flags])
        assert changes == []
        assert cfg.replace(resume="") == resolve_optimizer(saved)


def test_from_args_round_trips_every_field():
    cfg = Config(
        game="breakout",
        noop_max=7,
        sticky_action_prob=0.25,
        terminal_on_life_loss=True,
        num_actors=5,
        epsilon_spread="actor",
        replay_capacity=200_000,
        priority_alpha=0.5,
        network="dqn2013",
        dueling=False,
        n_step=5,
        gamma=0.97,
        optimizer="rmsprop",
        lr=2.5e-4,
        optimizer_eps=0.01,
        device="cpu",
        amp="on",
        compile=True,
        seed=42,
        logdir="runs/x",
        address="10.0.0.1:6379",
        log_interval_s=2.5,
    )
    assert from_args(_to_argv(cfg)) == cfg
    assert from_args(_to_argv(Config())) == Config()


def test_bool_flags():
    assert from_args(["--no-dueling"]).dueling is False
    assert from_args(["--dueling"]).dueling is True
    assert from_args([]).dueling is True
    assert from_args(["--terminal-on-life-loss"]).terminal_on_life_loss is True
    assert from_args(["--amp", "off", "--compile"]) == Config(amp="off", compile=True)
    assert from_args(["--amp"]).amp == "on"  # alone, as the flag was when it was a bool
    assert from_args(["--amp", "--compile"]) == Config(amp="on", compile=True)
    assert from_args([]).amp == "auto"


def test_from_args_types():
    cfg = from_args(["--num-actors", "-1", "--gamma", "0.5", "--network", "foo"])
    assert cfg.num_actors == -1 and isinstance(cfg.num_actors, int)
    assert cfg.gamma == 0.5 and isinstance(cfg.gamma, float)
    assert cfg.network == "foo"


def test_help_documents_every_field():
    text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"].split()[0] in text


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--num-actors", "-1"], ["--num-actors", "-1"]),
        (["--game", "nosuchgame"], ["--game", "nosuchgame"]),
        (["--network", "foo"], ["--network", "foo"]),
    ],
)
def test_train_py_rejects_bad_flag_before_starting_ray(args, named):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for text in named:
        assert text in lines[0]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_py_rejection_leaves_ray_uninitialized():
    code = (
        "import sys, train\n"
        "try:\n"
        "    train.prepare(['--network', 'foo'])\n"
        "except SystemExit as exc:\n"
        "    ray = sys.modules.get('ray')\n"
        "    print('exit', exc.code, ray is not None and ray.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "exit 2 False", proc.stdout + proc.stderr
