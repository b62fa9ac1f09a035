"""`ray up`, `ray submit` and `ray down` for real, with deploy/cluster-onprem.yaml (Ray's
`local` node provider): a one-node cluster on this machine, reached over SSH on 127.0.0.1.

The config the test launches is deploy/cluster-onprem.yaml with the machine's address, the
SSH user, key and port, ports of its own for `ray start` (other Rays may run here), and the
venv made from the Python running the test, its packages shared and the project installed
offline from the copied checkout (downloading torch would take minutes); every other setup
and start command is the file's own. The SSH server, the user and the key come from
`.ci/sshd.sh` (CI starts it), through APEX_DQN_SSH_PORT, APEX_DQN_SSH_USER and
APEX_DQN_SSH_KEY; without them the test is skipped. The user must be the one that script
made: `ray down` runs `ray stop` as that user, which ends every Ray process it can signal.

About 1.5 minutes on two cores (`ray up` ~30 s, `ray submit` of an 8,000-frame run ~30 s,
`ray down` and the checks ~15 s); under three where other work keeps the cores busy.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import site
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from apex_dqn.common import checkpoint
from apex_dqn.common.config import build_parser

pytestmark = [pytest.mark.ray, pytest.mark.rom, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ONPREM = ROOT / "deploy" / "cluster-onprem.yaml"
MARKER = ".apex-dqn-launcher-test"  # made by .ci/sshd.sh in the home of its user alone
VENV = "~/apex-dqn-venv"
FRAMES = 8_000
RUN = [
    "--address", "auto", "--num-actors", "1", "--envs-per-actor", "2",
    "--replay-shards", "1", "--replay-capacity", "20000", "--replay-min-size", "500",
    "--batch-size", "16", "--network", "dqn2013", "--publish-period", "5",
    "--weight-sync-period", "20", "--push-period", "20", "--log-interval-s", "3",
    "--eval-interval-s", "0", "--final-eval-episodes", "0", "--seed", "0",
    "--total-frames", str(FRAMES),
]  # fmt: skip
# The ports `ray start --head` listens on, each given (the defaults may be taken by another
# Ray on this machine), all outside Ray's worker port range, 10002-19999.
PORT_FLAGS = (
    "--port", "--object-manager-port", "--node-manager-port", "--dashboard-port",
    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
    "--runtime-env-agent-port", "--ray-client-server-port",
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """The SSH server of .ci/sshd.sh and its user."""

    port: int
    user: str
    key: str

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    @property
    def home(self) -> str:
        return pwd.getpwnam(self.user).pw_dir

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``command`` as the user, in a login shell that reads ~/.bashrc, as Ray runs it."""
        return subprocess.run(
            [
                "ssh", "-i", self.key, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", f"ProxyCommand=nc 127.0.0.1 {self.port}",
                f"{self.user}@127.0.0.1",
                "bash --login -c -i " + shlex.quote(f"source ~/.bashrc; {command}"),
            ],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip


@pytest.fixture(scope="module")
def target() -> Target:
    port, user, key = (os.environ.get(f"APEX_DQN_SSH_{k}") for k in ("PORT", "USER", "KEY"))
    if not (port and user and key):
        pytest.skip(
            "no SSH server for the launcher test: run `sudo bash .ci/sshd.sh start DIR` and "
            "`source DIR/env` first (README, Tests)"
        )
    missing = [tool for tool in ("ssh", "rsync", "nc") if shutil.which(tool) is None]
    assert not missing, f"APEX_DQN_SSH_PORT is set but {missing} are not installed"
    found = Target(int(port), user, key)
    done = found.ssh(f"test -f ~/{MARKER}")
    assert done.returncode != 255, f"cannot log in as {user} on port {port}: {done.stderr}"
    assert done.returncode == 0, (
        f"{user} has no ~/{MARKER}: not the user .ci/sshd.sh made for this test, and "
        "`ray down` would stop every Ray process it runs"
    )
    return found


def _free_ports(count: int) -> list[int]:
    """Ports free on every interface now, distinct, outside Ray's worker ports."""
    with ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket())
            sock.bind(("", 0))
            port = sock.getsockname()[1]
            if not 10000 <= port <= 19999:
                ports.append(port)
        return ports


def _only(commands: list[str], pattern: str) -> int:
    """The index of the one command matching ``pattern``: the file's structure the test
    substitutes into must still be there."""
    found = [i for i, c in enumerate(commands) if re.search(pattern, c)]
    assert len(found) == 1, f"{ONPREM.name}: {len(found)} commands match {pattern!r}"
    return found[0]


def _offline_install(command: str) -> str:
    """The head's install command without the torch download, the project installed from
    the copied checkout with the packages the venv shares (no index, no build isolation)."""
    parts = [p.strip() for p in command.split("&&")]
    torch = [p for p in parts if "torch==" in p]
    project = [p for p in parts if p.endswith("-e ~/apex-dqn")]
    assert torch and len(project) == 1 and len(parts) == len(torch) + 1, command
    flags = "pip install --no-deps --no-index --no-build-isolation"
    return project[0].replace("pip install", flags, 1)


def cluster_config(target: Target, name: str, token: Path, ports: list[int]) -> dict:
    """deploy/cluster-onprem.yaml for this machine, as the module docstring says."""
    config = yaml.safe_load(ONPREM.read_text())
    assert config["provider"]["type"] == "local"
    config["cluster_name"] = name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {
        "ssh_user": target.user,
        "ssh_private_key": target.key,
        "ssh_proxy_command": f"nc 127.0.0.1 {target.port}",
    }
    config["file_mounts"]["~/.ray/auth_token"] = str(token)

    setup = config["setup_commands"]
    at = _only(setup, rf"-m venv {VENV}$")
    python = os.path.realpath(sys._base_executable)
    purelib = f"{VENV}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    shared = " ".join(shlex.quote(p) for p in site.getsitepackages())
    # The shared packages' command-line entry points are not in the venv: `ray` is made.
    ray = r"#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n"
    setup[at] = (
        f"{{ test -x {VENV}/bin/python || {shlex.quote(python)} -m venv --without-pip {VENV}; }}"
        f" && printf '%s\\n' {shared} > {purelib}/apex-dqn-shared.pth"
        f" && printf '{ray}' \"$HOME/{VENV[2:]}/bin/python\" > {VENV}/bin/ray"
        f" && chmod +x {VENV}/bin/ray"
    )
    head_setup = config["head_setup_commands"]
    at = _only(head_setup, r"-e ~/apex-dqn$")
    head_setup[at] = _offline_install(head_setup[at])

    start = config["head_start_ray_commands"]
    at = _only(start, r"ray start --head")
    command = start[at]
    for flag, port in zip(PORT_FLAGS, ports, strict=True):
        given = re.search(rf"(?<!\S){flag}=\d+", command)
        command = (
            command.replace(given.group(0), f"{flag}={port}")
            if given
            else f"{command} {flag}={port}"
        )
    start[at] = command
    return config


class Launcher:
    """The `ray` command line on the launching side, its temporary files (cluster state,
    config cache) in a directory of its own instead of /tmp."""

    def __init__(self, config: Path, client_tmp: Path):
        self.config = config
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(TMPDIR=str(client_tmp), RAY_TMPDIR=str(client_tmp))
        self.env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")

    def __call__(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", *args],
            cwd=ROOT, env=self.env, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _gcs_call(address: str, token: str | None) -> grpc.StatusCode:
    """The status of one GetClusterId call to the GCS at ``address``, with the token in the
    header Ray's clients send it in, or without."""
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def _tail(done: subprocess.CompletedProcess, lines: int = 60) -> str:
    text = (done.stdout or "") + (done.stderr or "")
    kept = [line for line in text.splitlines() if "VVINFO" not in line]  # whole ssh commands
    return f"exit {done.returncode}:\n" + "\n".join(kept[-lines:])


def _processes_of(uid: int, wait: float) -> list[str]:
    """The processes of ``uid`` still running after up to ``wait`` seconds (an SSH session
    just closed takes a moment to end)."""
    deadline = time.monotonic() + wait
    while True:
        found = [
            f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])[:120]}"
            for proc in psutil.process_iter(["uids", "pid", "cmdline"])
            if proc.info["uids"] and proc.info["uids"].real == uid
        ]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _ssh_control_dir(cluster_name: str) -> Path:
    """Where Ray's SSH runner keeps its connection sockets for this cluster
    (ray.autoscaler._private.command_runner.SSHCommandRunner)."""
    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH

    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:HASH_MAX_LENGTH]
    cluster = hashlib.sha256(cluster_name.encode()).hexdigest()[:HASH_MAX_LENGTH]
    return Path(f"/tmp/ray_ssh_{user}") / cluster


def _close_ssh_connections(control: Path) -> None:
    """End the shared connections Ray's SSH runner leaves open (ControlPersist) and remove
    their directory, and its parent if nothing else is in it."""
    for sock in control.glob("*") if control.is_dir() else []:
        subprocess.run(
            ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "127.0.0.1"],
            capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    # `ssh -O exit` returns once the master has the request; the master removes its
    # socket as it exits, a moment later.
    deadline = time.monotonic() + 20
    while control.is_dir() and any(control.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for path in (control, control.parent):
        with contextlib.suppress(OSError):  # not there, or used by another cluster's
            path.rmdir()


def _teardown(launcher: Launcher, target: Target, name: str, logdir: str) -> list[str]:
    """`ray down`, then the cluster's files removed and its connections closed; what is
    still there afterwards, as problems (empty when all is gone)."""
    problems = []
    down = launcher("down", "-y", str(launcher.config), timeout=180)
    if down.returncode != 0:
        problems.append(f"ray down failed: {_tail(down)}")
    removed = target.ssh(
        f'rm -rf -- "$RAY_TMPDIR" {VENV} ~/apex-dqn ~/train.py ~/{logdir} ~/.ray/auth_token '
        "~/ray_bootstrap_config.yaml ~/ray_bootstrap_key.pem && { rmdir ~/runs ~/.ray || true; }"
    )
    if removed.returncode != 0:
        problems.append(f"removing the cluster's files failed: {_tail(removed)}")
    control = _ssh_control_dir(name)
    _close_ssh_connections(control)
    left = _processes_of(target.uid, wait=30)
    if left:
        problems.append(f"processes of {target.user} still running after ray down: {left}")
        target.ssh("ray stop")  # as that user only: never another Ray on this machine
    if control.exists():
        problems.append(f"{control} is left")
    leftovers = [
        *Path("/tmp/ray").glob(f"cluster-{name}.*"),
        *(p for p in Path("/tmp").glob("ray-config-*") if _names(p, name)),
    ]
    if leftovers:
        problems.append(f"launcher files left in /tmp: {leftovers}")
    return problems


def _names(path: Path, name: str) -> bool:
    try:
        return f'"{name}"' in path.read_text(errors="replace")
    except OSError:
        return False


def test_ray_up_submit_down_on_an_onprem_cluster(target, tmp_path):
    name = f"apex-dqn-ci-{os.getpid()}"
    logdir = f"runs/{name}"
    args = [*RUN, "--logdir", logdir]
    build_parser().parse_args(args)  # a bad flag fails here, not after `ray up`
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    ports = _free_ports(len(PORT_FLAGS))
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(cluster_config(target, name, token, ports)))
    client_tmp = tmp_path / "client-tmp"
    client_tmp.mkdir()
    launcher = Launcher(config, client_tmp)
    assert not _processes_of(target.uid, wait=10), f"{target.user} already runs processes"

    try:
        up = launcher("up", "-y", str(config), timeout=300)
        assert up.returncode == 0, f"ray up: {_tail(up)}"

        submit = launcher("submit", str(config), "train.py", "--", *args, timeout=300)
        output = submit.stdout
        assert submit.returncode == 0, f"ray submit: {_tail(submit)}"
        # The driver joined the cluster `ray up` started (its GCS port is ours alone), not
        # a Ray of its own.
        joined = re.search(r"^joined the Ray cluster at (\S+):(\d+) \((\d+) node", output, re.M)
        assert joined, f"the driver did not join a cluster: {_tail(submit)}"
        assert int(joined.group(2)) == ports[0], joined.group(0)
        assert joined.group(3) == "1"
        assert "started a local Ray" not in output
        assert re.search(r"^reached [\d,]+ frames", output, re.M), _tail(submit)

        # Token authentication is on in the launched cluster: its GCS refuses a call without
        # the token and answers one with it.
        gcs = f"{joined.group(1)}:{joined.group(2)}"
        assert _gcs_call(gcs, token=None) == grpc.StatusCode.UNAUTHENTICATED
        assert _gcs_call(gcs, token=token.read_text()) == grpc.StatusCode.OK

        local = tmp_path / "run"
        down = launcher(
            "rsync-down", str(config), f"{target.home}/{logdir}/", f"{local}/", timeout=120
        )
        assert down.returncode == 0, f"ray rsync-down: {_tail(down)}"
        saved = checkpoint.load(local)
        assert saved["counters"]["env_frames"] >= FRAMES
        assert saved["learner"]["updates"] > 0, "the learner never trained"
        assert list(local.glob("events.out.tfevents.*")), sorted(local.iterdir())
    finally:
        problems = _teardown(launcher, target, name, logdir)
    assert not problems, "\n".join(problems)
