"""The deployment files, checked offline: Ray's own validator for the cluster launcher
configs, the required fields of the KubeRay manifest, and the settings this project
relies on (token authentication, a job server the RayJob's submitter can reach, a run
volume the container's user can write, a GPU head, spot CPU workers, the project installed
on every node, every install pinned by deploy/constraints.txt, one Ray and torch version
everywhere)."""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import re
import shlex
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

from apex_dqn.common.config import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# The launcher config for machines of one's own (Ray's `local` provider), apart from the
# cloud configs: no images, no node types.
ONPREM = DEPLOY / "cluster-onprem.yaml"
CLUSTER_CONFIGS = sorted(p for p in DEPLOY.glob("cluster*.yaml") if p != ONPREM)
KUBERAY = DEPLOY / "kuberay-rayjob.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
CONSTRAINTS = DEPLOY / "constraints.txt"
CI = ROOT / ".ci" / "run"


def _freeze_constraints():
    """deploy/freeze_constraints.py, the script that writes the constraints file."""
    spec = importlib.util.spec_from_file_location(
        "freeze_constraints", DEPLOY / "freeze_constraints.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins() -> dict[str, str]:
    """The constraints file's pins: canonical name -> version."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


# ------------------------------------------------------------------- shell command lines
_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "{", "}", "!", "if", "then", "else", "fi"}
_PROJECT = re.compile(r"^(\.|~/apex-dqn|/home/ray/apex-dqn)/?(\[[\w,-]+\])?$")


def _pip_installs(line: str) -> list[list[str]]:
    """The arguments of each `pip install` in one shell command line."""
    if "pip" not in line:
        return []
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for word in lexer:
        if word in _SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    installs = []
    for words in commands:
        at = next(
            (i for i in range(len(words) - 1) if words[i : i + 2] == ["pip", "install"]), None
        )
        if at is not None:
            installs.append(words[at + 2 :])
    return installs


def _option(args: list[str], *names: str) -> str | None:
    for i, word in enumerate(args):
        if word in names and i + 1 < len(args):
            return args[i + 1]
        for name in names:
            if name.startswith("--") and word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


_TAKES_VALUE = {
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-e",
    "--editable",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--prefix",
}


def _named(args: list[str]) -> list[str]:
    """The requirements a `pip install` names, options and their values left out."""
    named, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in _TAKES_VALUE:
            skip = True
        elif not word.startswith("-"):
            named.append(word)
    return named


def _installs_project(args: list[str]) -> bool:
    return any(_PROJECT.match(word) for word in args)


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, comment lines left out."""
    joined = re.sub(r"\\\n", " ", text)
    return [line for line in joined.splitlines() if not line.lstrip().startswith("#")]


def _markdown_shell_lines(text: str) -> list[str]:
    """The lines of a Markdown file's bash code blocks."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S)
    return [line for block in blocks for line in _logical_lines(block)]


def _dockerfile_runs(text: str) -> list[str]:
    return [line.strip()[4:] for line in _logical_lines(text) if line.strip().startswith("RUN ")]


def _setup_commands(config: dict) -> list[str]:
    """Every command a cluster launcher config runs on its nodes before Ray starts."""
    keys = ("initialization_commands", "setup_commands")
    keys += ("head_setup_commands", "worker_setup_commands")
    commands = [c for k in keys for c in config.get(k, [])]
    for node in config.get("available_node_types", {}).values():
        for k in ("initialization_commands", "worker_setup_commands"):
            commands += node.get(k, [])
    return commands


def _dockerfile_constraints_copy() -> str:
    """Where deploy/Dockerfile copies deploy/constraints.txt in the image."""
    copies = re.findall(
        r"^COPY\s+(?:--\S+\s+)*deploy/constraints\.txt\s+(\S+)\s*$",
        DOCKERFILE.read_text(),
        re.M,
    )
    assert len(copies) == 1, "deploy/Dockerfile must copy deploy/constraints.txt once"
    return copies[0]


def _install_places() -> dict[str, list[str]]:
    """Every place that installs packages, as shell command lines, by file."""
    places = {
        "README.md": _markdown_shell_lines((ROOT / "README.md").read_text()),
        "deploy/README.md": _markdown_shell_lines((DEPLOY / "README.md").read_text()),
        ".ci/run": _logical_lines(CI.read_text()),
        "deploy/Dockerfile": _dockerfile_runs(DOCKERFILE.read_text()),
    }
    for path in [*CLUSTER_CONFIGS, ONPREM]:
        places[f"deploy/{path.name}"] = _setup_commands(_load(path))
    return places


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _prepared(path: Path) -> dict:
    """The config as `ray up` sees it: merged with the provider's defaults, then validated."""
    config = prepare_config(copy.deepcopy(_load(path)))
    validate_config(config)
    return config


def _worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    if provider == "gcp":
        scheduling = node_config.get("scheduling", {})
        return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible")
    raise AssertionError(f"unexpected provider {provider}")


def _train_args(command: str) -> list[str]:
    """The arguments after train.py in a shell command line."""
    words = shlex.split(command)
    at = next(i for i, w in enumerate(words) if w.endswith("train.py"))
    rest = words[at + 1 :]
    return rest[1:] if rest[:1] == ["--"] else rest


def test_there_is_a_config_per_cloud():
    providers = {_load(p)["provider"]["type"] for p in CLUSTER_CONFIGS}
    assert providers == {"aws", "gcp"}


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
class TestClusterConfig:
    def test_passes_rays_validator(self, path):
        config = _prepared(path)
        assert config["head_node_type"] in config["available_node_types"]
        assert config["cluster_name"] == "apex-dqn"

    def test_gpu_head_and_spot_cpu_workers(self, path):
        config = _prepared(path)
        provider = config["provider"]["type"]
        head = config["available_node_types"][config["head_node_type"]]
        assert head["resources"].get("GPU", 0) >= 1
        assert head["resources"].get("CPU", 0) >= 1  # the learner asks for one CPU
        workers = _worker_types(config)
        assert workers, "no worker node types"
        for name, node in workers.items():
            assert node["resources"].get("CPU", 0) >= 1, name
            assert node["resources"].get("GPU", 0) == 0, name
            assert node["max_workers"] >= node["min_workers"], name
        assert any(_is_spot(provider, node["node_config"]) for node in workers.values())
        assert not _is_spot(provider, head["node_config"])
        total = sum(n["max_workers"] * n["resources"]["CPU"] for n in workers.values())
        assert total >= 64, "cannot scale to the 64 actors the README's example asks for"

    def test_token_authentication_shared_by_all_nodes(self, path):
        config = _prepared(path)
        mounts = config["file_mounts"]
        assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
        run_options = " ".join(config["docker"].get("run_options", []))
        commands = " ".join(config["setup_commands"])
        assert "RAY_AUTH_MODE=token" in run_options
        assert "RAY_AUTH_MODE=token" in commands  # login shells of `ray submit`/`attach`

    def test_dashboard_stays_on_localhost(self, path):
        config = _prepared(path)
        start = " ".join(config["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in start
        assert "0.0.0.0" not in start

    def test_project_installed_on_every_node(self, path):
        """Every node has torch and the project: from the project's image, or, on any
        other image (the fallback without a registry), installed at boot, torch first, at
        the checkout's pins."""
        config = _prepared(path)
        remote = [r for r, local in config["file_mounts"].items() if local == "."]
        assert len(remote) == 1, "the repository must be mounted on every node"
        constraints = f"{remote[0]}/deploy/constraints.txt"
        torch_pin = f"torch=={_pins()['torch']}"
        for role in ("head_setup_commands", "worker_setup_commands"):
            installs = [a for c in config[role] for a in _pip_installs(c)]
            torch = [i for i, a in enumerate(installs) if torch_pin in a]
            project = [i for i, a in enumerate(installs) if _installs_project(a)]
            assert torch and project, role
            assert torch[0] < project[0], f"{role}: torch must be pinned before the project"
            assert _option(installs[project[0]], "-e", "--editable") == remote[0], role
            assert _option(installs[project[0]], "-c", "--constraint") == constraints, role
            # The install is skipped only where the image holds the very pins it would
            # install: the copy deploy/Dockerfile puts in the image.
            guarded = next(c for c in config[role] if any(map(_installs_project, _pip_installs(c))))
            guard = re.match(r"cmp -s (\S+) (\S+) \|\|", guarded)
            assert guard, f"{role}: the install must run unless the image has the same pins"
            assert guard.groups() == (constraints, _dockerfile_constraints_copy()), role
        worker_torch = next(
            a for a in _pip_installs(" ".join(config["worker_setup_commands"])) if torch_pin in a
        )
        assert "whl/cpu" in _option(worker_torch, "--index-url"), "CPU workers need CPU torch"

    def test_images_run_the_same_ray_everywhere(self, path):
        docker = _load(path)["docker"]
        head, worker = docker["head_image"], docker["worker_image"]
        assert head.endswith("-gpu") and worker.endswith("-cpu")
        assert head.rsplit("-", 1)[0] == worker.rsplit("-", 1)[0]

    def test_nodes_run_the_projects_images(self, path):
        """The images deploy/Dockerfile builds (as its comment and deploy/README.md build
        them), not a bare Ray image that every new spot worker would install onto."""
        docker = _load(path)["docker"]
        built = _built_image_tags()
        for key in ("head_image", "worker_image"):
            assert docker[key] in built, f"{key} is not built from deploy/Dockerfile: {built}"


def _broken(mutate) -> dict:
    config = _load(CLUSTER_CONFIGS[0])
    mutate(config)
    return config


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(
            lambda c: c["available_node_types"]["cpu_spot"].pop("resources"),
            "'resources' is a required property",
            id="node-type-without-resources",
        ),
        pytest.param(
            lambda c: c.update(max_workers="eight"),
            "'eight' is not of type 'integer'",
            id="max-workers-not-int",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["cpu_spot"].update(cpus=16),
            "'cpus' was unexpected",
            id="unknown-node-type-key",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["head_gpu"]["resources"].update(GPU=0.5),
            "0.5 is not of type 'integer'",
            id="fractional-resource",
        ),
    ],
)
def test_broken_config_fails_schema(mutate, message):
    with pytest.raises(jsonschema.ValidationError) as error:
        validate_config(prepare_config(_broken(mutate)))
    assert message in str(error.value)


def test_unknown_head_type_fails_validation():
    config = _broken(lambda c: c.update(head_node_type="no_such_type"))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(config))


def test_min_workers_above_max_workers_fails_validation():
    config = _broken(lambda c: c["available_node_types"]["cpu_spot"].update(min_workers=99))
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(config))


# ------------------------------------------------------------ machines of one's own (SSH)
VENV_PYTHON = "~/apex-dqn-venv/bin/python"


def test_onprem_is_a_local_cluster_that_passes_rays_validator():
    raw, config = _load(ONPREM), _prepared(ONPREM)
    provider = raw["provider"]
    assert provider["type"] == "local" and "docker" not in raw
    assert raw["cluster_name"] == "apex-dqn"
    assert provider["head_ip"] and provider["worker_ips"]
    assert provider["head_ip"] not in provider["worker_ips"]
    assert config["max_workers"] == len(provider["worker_ips"])  # every machine joins
    assert raw["auth"]["ssh_user"] != "root", "`ray stop` would end every Ray on the machine"


def test_onprem_token_authentication_and_dashboard_on_localhost():
    config = _prepared(ONPREM)
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # For every Ray process and every login shell of `ray submit` and `ray attach`.
    assert "export RAY_AUTH_MODE=token" in " ".join(config["setup_commands"])
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start


def test_onprem_installs_the_project_into_a_venv_on_every_node():
    """A venv of the Python the constraints were made with, first on PATH (`ray`, and the
    `python` that `ray submit` runs); into it torch first, pinned, then the project at the
    constraints' pins; CPU torch on the workers."""
    config = _prepared(ONPREM)
    made = re.search(r"CPython (\d+\.\d+)", CONSTRAINTS.read_text()).group(1)
    setup = config["setup_commands"]
    assert any(re.search(rf"python{re.escape(made)} -m venv ~/apex-dqn-venv$", c) for c in setup)
    assert any('export PATH="$HOME/apex-dqn-venv/bin:$PATH"' in c for c in setup)
    assert [r for r, local in config["file_mounts"].items() if local == "."] == ["~/apex-dqn"]
    torch_pin = f"torch=={_pins()['torch']}"
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = " ".join(config[role])
        assert commands.count("pip install") == commands.count(f"{VENV_PYTHON} -m pip install")
        installs = _pip_installs(commands)
        torch = [i for i, a in enumerate(installs) if torch_pin in a]
        project = [i for i, a in enumerate(installs) if _installs_project(a)]
        assert torch and project and torch[0] < project[0], role
        assert _option(installs[project[0]], "-e", "--editable") == "~/apex-dqn", role
        constraints = _option(installs[project[0]], "-c", "--constraint")
        assert constraints == "~/apex-dqn/deploy/constraints.txt", role
    worker_torch = next(
        a for a in _pip_installs(" ".join(config["worker_setup_commands"])) if torch_pin in a
    )
    assert "whl/cpu" in _option(worker_torch, "--index-url"), "CPU workers need CPU torch"


def test_onprem_ray_has_a_temp_directory_of_the_accounts_own():
    """Where `ray start` records its cluster for `--address auto`: the account's own, not
    /tmp/ray, which records the last `ray start` of anyone on the machine."""
    setup = _prepared(ONPREM)["setup_commands"]
    exported = next(c for c in setup if "RAY_TMPDIR=" in c and ">> ~/.bashrc" in c)
    assert "$(id -u)" in exported or "$(id -un)" in exported, exported
    assert any('mkdir -p -m 700 "$RAY_TMPDIR" && test -O "$RAY_TMPDIR"' in c for c in setup)


def test_onprem_start_commands_fit_any_machine():
    """The open-files limit raised to the hard limit (a fixed `ulimit -n 65536` fails where
    the hard limit is lower), and every port given outside Ray's worker ports."""
    config = _prepared(ONPREM)
    for role in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[role])
        assert 'ulimit -n "$(ulimit -Hn)"' in start, role
        assert not re.search(r"ulimit -n \d", start), role
        for port in map(int, re.findall(r"--[\w-]*port=(\d+)", start)):
            assert not 10002 <= port <= 19999, f"{role}: port {port} is a worker port"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["provider"].pop("head_ip"), "Please supply a `head_ip`"),
        (
            lambda c: c.update(available_node_types={"cpu": {"resources": {}}}),
            "available_node_types is not supported for on-premise clusters",
        ),
    ],
    ids=["no-head-ip", "node-types"],
)
def test_broken_onprem_config_is_refused(mutate, message):
    config = _load(ONPREM)
    mutate(config)
    with pytest.raises(click.ClickException, match=re.escape(message)):
        prepare_config(config)


# ------------------------------------------------------------------------------ KubeRay
def _rayjob() -> dict:
    with open(KUBERAY) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


def _head(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(group: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in _containers(group)
    )


def _image_user() -> tuple[int, int]:
    """The uid and gid deploy/Dockerfile's image runs as (its last USER, numeric)."""
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", DOCKERFILE.read_text(), re.M)
    assert users, "deploy/Dockerfile must end with a numeric USER uid:gid"
    uid, gid = users[-1]
    return int(uid), int(gid)


def _pod_specs(job: dict) -> dict[str, dict]:
    """The pod specs of the RayJob: head, worker groups and, if given, the submitter."""
    spec = job.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or {}
    pods = {"head": (cluster.get("headGroupSpec") or {}).get("template", {}).get("spec", {})}
    for group in cluster.get("workerGroupSpecs") or []:
        pods[f"worker group {group.get('groupName')}"] = group["template"]["spec"]
    submitter = spec.get("submitterPodTemplate")
    if submitter:
        pods["submitter"] = submitter.get("spec", {})
    return pods


def _is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def dashboard_problems(job: dict) -> list[str]:
    """Whether the job server (the dashboard's port) is reachable through the head Service.
    In K8sJobMode, the default, the submitter pod runs `ray job submit` against it; in
    HTTPMode the operator submits to it; in every mode the operator reads the job's status
    from it. A dashboard bound to the head's loopback answers none of them."""
    spec = job.get("spec") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    head = (spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}
    problems = []
    host = str((head.get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0"))
    if _is_loopback(host):
        who = "the submitter pod and the operator" if mode == "K8sJobMode" else "the operator"
        problems.append(
            f"dashboard-host {host} is loopback: in {mode} {who} reach the job server "
            "through the head Service and cannot"
        )
    containers = head.get("template", {}).get("spec", {}).get("containers") or [{}]
    if not any(p.get("name") == "dashboard" for p in containers[0].get("ports") or []):
        problems.append("the head container does not expose the dashboard port")
    return problems


def auth_problems(job: dict) -> list[str]:
    """Token authentication on, with the one token KubeRay makes (authOptions) given to
    the head, the workers, the submitter and the operator's own requests: no container
    may turn it off or bring a token of its own."""
    cluster = (job.get("spec") or {}).get("rayClusterSpec") or {}
    problems = []
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode is not token: token authentication is off")
    for pod, spec in _pod_specs(job).items():
        for container in spec.get("containers") or []:
            env = {e.get("name"): e for e in container.get("env") or []}
            mode = env.get("RAY_AUTH_MODE")
            if mode is not None and mode.get("value") != "token":
                problems.append(f"{pod}: RAY_AUTH_MODE is {mode.get('value')!r}, not token")
            if "RAY_AUTH_TOKEN" in env or "RAY_AUTH_TOKEN_PATH" in env:
                problems.append(
                    f"{pod}: sets its own token, not the one KubeRay gives the submitter "
                    "and the operator"
                )
    return problems


def volume_problems(job: dict) -> list[str]:
    """A pod that mounts a PersistentVolumeClaim must give the image's group (fsGroup) the
    volume, which is owned by root when new, and run as the image's user."""
    uid, gid = _image_user()
    problems = []
    for pod, spec in _pod_specs(job).items():
        claims = {v["name"] for v in spec.get("volumes") or [] if "persistentVolumeClaim" in v}
        if not claims:
            continue
        context = spec.get("securityContext") or {}
        if context.get("fsGroup") != gid:
            problems.append(
                f"{pod}: securityContext.fsGroup is {context.get('fsGroup')}, not the "
                f"image's group {gid}: the volume is not writable by the container's user"
            )
        for container in spec.get("containers") or []:
            if not claims & {m.get("name") for m in container.get("volumeMounts") or []}:
                continue
            own = {**context, **(container.get("securityContext") or {})}
            for key, want in (("runAsUser", uid), ("runAsGroup", gid)):
                if own.get(key, want) != want:
                    problems.append(f"{pod}: {key} is {own[key]}, not the image's {want}")
    return problems


def rayjob_problems(job: dict) -> list[str]:
    """What a RayJob manifest lacks of what this project needs; empty when complete."""
    problems = []
    if job.get("apiVersion") != "ray.io/v1":
        problems.append("apiVersion is not ray.io/v1")
    if job.get("kind") != "RayJob":
        problems.append("kind is not RayJob")
    spec = job.get("spec") or {}
    entrypoint = spec.get("entrypoint") or ""
    if not re.match(r"^python \S*train\.py\b", entrypoint):
        problems.append("entrypoint does not run python train.py")
    cluster = spec.get("rayClusterSpec") or {}
    head = cluster.get("headGroupSpec")
    if not head or not head.get("template", {}).get("spec", {}).get("containers"):
        problems.append("no headGroupSpec with a container")
    groups = cluster.get("workerGroupSpecs") or []
    for g in groups:
        if not g.get("groupName") or not _containers(g):
            problems.append("a worker group has no groupName or no container")
    if not any(_gpus(g) >= 1 for g in groups):
        problems.append("no worker group with nvidia.com/gpu limits")
    if not any(_gpus(g) == 0 for g in groups):
        problems.append("no CPU-only worker group")
    if head:
        problems += dashboard_problems(job) + auth_problems(job) + volume_problems(job)
    return problems


def test_rayjob_has_required_fields():
    assert rayjob_problems(_rayjob()) == []


def test_rayjob_entrypoint_uses_known_flags():
    args = _train_args(_rayjob()["spec"]["entrypoint"])
    assert args, "the entrypoint passes no settings"
    parsed = build_parser().parse_args(args)
    assert parsed.num_actors >= 1


def test_rayjob_job_server_reachable_by_submitter_and_operator():
    job = _rayjob()
    assert job["spec"]["submissionMode"] == "K8sJobMode"
    assert dashboard_problems(job) == []


def test_rayjob_token_authentication_stays_on():
    assert auth_problems(_rayjob()) == []


def test_rayjob_run_volume_writable_by_the_images_user():
    job = _rayjob()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert any("persistentVolumeClaim" in v for v in head["volumes"])
    assert volume_problems(job) == []
    assert head["securityContext"]["fsGroup"] == _image_user()[1]


def test_rayjob_gpu_limits_match_requests_and_auth_is_on():
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in _containers(group):
            resources = c["resources"]
            gpu_limit = resources.get("limits", {}).get("nvidia.com/gpu")
            assert gpu_limit == resources.get("requests", {}).get("nvidia.com/gpu")


def test_rayjob_volumes_refer_to_claims_in_the_manifest():
    with open(KUBERAY) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    head = _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    used = {v["persistentVolumeClaim"]["claimName"] for v in head.get("volumes", [])}
    assert used and used <= claims
    logdir = build_parser().parse_args(_train_args(_rayjob()["spec"]["entrypoint"])).logdir
    mounts = [m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])]
    assert any(logdir.startswith(m.rstrip("/") + "/") for m in mounts), "logdir not on volume"


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda j: j.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
        (lambda j: j["spec"].pop("entrypoint"), "entrypoint"),
        (lambda j: j["spec"]["rayClusterSpec"].pop("headGroupSpec"), "headGroupSpec"),
        (
            lambda j: [
                c["resources"]["limits"].pop("nvidia.com/gpu", None)
                for g in j["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                for c in _containers(g)
            ],
            "nvidia.com/gpu",
        ),
        (
            lambda j: _head(j)["rayStartParams"].update({"dashboard-host": "127.0.0.1"}),
            "dashboard-host 127.0.0.1 is loopback: in K8sJobMode the submitter pod",
        ),
        (lambda j: _head(j)["rayStartParams"].update({"dashboard-host": "localhost"}), "loopback"),
        (lambda j: j["spec"]["rayClusterSpec"].pop("authOptions"), "authentication is off"),
        (
            lambda j: (
                _containers(j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0])[0]
                .setdefault("env", [])
                .append({"name": "RAY_AUTH_MODE", "value": "disabled"})
            ),
            "RAY_AUTH_MODE is 'disabled'",
        ),
        (
            lambda j: (
                _containers(_head(j))[0]
                .setdefault("env", [])
                .append({"name": "RAY_AUTH_TOKEN", "value": "secret"})
            ),
            "sets its own token",
        ),
        (lambda j: _head(j)["template"]["spec"].pop("securityContext"), "fsGroup is None"),
        (
            lambda j: _head(j)["template"]["spec"]["securityContext"].update(fsGroup=1000),
            "fsGroup is 1000, not the image's group 100",
        ),
        (
            lambda j: _head(j)["template"]["spec"]["securityContext"].update(runAsUser=0),
            "runAsUser is 0",
        ),
    ],
    ids=[
        "old-api-version",
        "no-entrypoint",
        "no-head-group",
        "no-gpu-limits",
        "loopback-dashboard",
        "localhost-dashboard",
        "no-auth-options",
        "auth-disabled-in-a-container",
        "own-token-in-a-container",
        "no-fs-group",
        "fs-group-not-the-images-group",
        "runs-as-root",
    ],
)
def test_broken_rayjob_is_caught(mutate, problem):
    job = copy.deepcopy(_rayjob())
    mutate(job)
    problems = rayjob_problems(job)
    assert any(problem in p for p in problems), problems


# ------------------------------------------------------------------ one version of each
def _deploy_texts() -> dict[str, str]:
    files = [*CLUSTER_CONFIGS, ONPREM, KUBERAY, DOCKERFILE, DEPLOY / "README.md"]
    return {p.name: p.read_text() for p in files}


def _ray_versions(text: str) -> set[str]:
    """Ray versions named in a file: Ray image tags, the project's image tags (which carry
    the Ray version they hold) and KubeRay's rayVersion."""
    found = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
    found |= set(re.findall(r"apex-dqn:[\w.]*?-ray(\d+\.\d+\.\d+)-", text))
    found |= set(re.findall(r"rayVersion:\s*\"?(\d+\.\d+\.\d+)", text))
    return found


def test_one_ray_version_in_every_deploy_file():
    """One Ray version: the one deploy/constraints.txt pins, which is also the Ray the
    machine that runs `ray up` or `ray job submit` installs."""
    versions = {name: _ray_versions(text) for name, text in _deploy_texts().items()}
    versions = {name: found for name, found in versions.items() if found}
    assert set(versions) >= {p.name for p in CLUSTER_CONFIGS} | {"kuberay-rayjob.yaml"}
    assert set(versions) >= {"Dockerfile", "README.md"}
    assert set().union(*versions.values()) == {_pins()["ray"]}, versions


def test_ray_version_of_each_image_and_cluster_is_the_pinned_one():
    ray = _pins()["ray"]
    base = re.search(r"^ARG BASE=rayproject/ray:(\S+)$", DOCKERFILE.read_text(), re.M)
    assert base and base.group(1).split("-")[0] == ray, "deploy/Dockerfile's base image"
    for path in CLUSTER_CONFIGS:
        docker = _load(path)["docker"]
        for key in ("head_image", "worker_image"):
            assert _ray_versions(docker[key]) == {ray}, f"{path.name}: {key}"
    job = _rayjob()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray
    for pod, spec in _pod_specs(job).items():
        for container in spec["containers"]:
            assert _ray_versions(container["image"]) == {ray}, pod


def test_one_torch_version_in_every_deploy_file_and_ci():
    texts = _deploy_texts()
    texts[".ci/run"] = CI.read_text()
    texts["README.md (root)"] = (ROOT / "README.md").read_text()
    pins = {name: set(re.findall(r"torch==([\w.+]+)", t)) for name, t in texts.items()}
    assert all(pins[p.name] for p in [*CLUSTER_CONFIGS, ONPREM]), pins
    assert pins[".ci/run"] and pins["Dockerfile"], pins
    assert set().union(*pins.values()) == {_pins()["torch"]}, pins


def test_constraints_python_is_the_images_python():
    made = re.search(r"CPython (\d+)\.(\d+)", CONSTRAINTS.read_text())
    assert made, "deploy/constraints.txt does not say which Python it was made with"
    tag = "py" + "".join(made.groups())
    texts = _deploy_texts()
    bases = {m for t in texts.values() for m in re.findall(r"rayproject/ray:[\d.]+-(py\d+)", t)}
    assert bases == {tag}, f"constraints made on {tag}, images on {bases}"


def _built_image_tags() -> set[str]:
    """The tags deploy/README.md builds from deploy/Dockerfile (the Dockerfile's own
    comment must build the same)."""

    def tags(text: str) -> set[str]:
        return set(re.findall(r"docker build -f deploy/Dockerfile -t (\S+)", text))

    built = tags((DEPLOY / "README.md").read_text())
    assert built and built == tags(DOCKERFILE.read_text())
    return built


def test_kuberay_runs_the_images_the_cluster_configs_run():
    images = {c["image"] for s in _pod_specs(_rayjob()).values() for c in s["containers"]}
    assert images <= _built_image_tags()
    for path in CLUSTER_CONFIGS:
        docker = _load(path)["docker"]
        assert images == {docker["head_image"], docker["worker_image"]}, path.name


# ------------------------------------------------------------------------- constraints
def test_every_project_install_uses_the_constraints():
    """Each place that installs the project (README, deploy/README.md, CI, the image, the
    cluster nodes' fallback) pins it, and all it pulls in, by deploy/constraints.txt."""
    allowed = {
        "deploy/constraints.txt",
        "~/apex-dqn/deploy/constraints.txt",
        _dockerfile_constraints_copy(),
    }
    for place, lines in _install_places().items():
        installs = [a for line in lines for a in _pip_installs(line) if _installs_project(a)]
        assert installs, f"{place} does not install the project"
        for args in installs:
            assert _option(args, "-c", "--constraint") in allowed, f"{place}: {args}"


def test_every_install_in_deploy_and_ci_is_pinned():
    """Not the project only: everything deploy/ and CI install is constrained, or is the
    one pinned torch wheel fetched alone from PyTorch's index (--no-deps), whose
    dependencies then come, constrained, with the project."""
    for place, lines in _install_places().items():
        for args in (a for line in lines for a in _pip_installs(line)):
            if _option(args, "-c", "--constraint"):
                continue
            assert "--no-deps" in args, f"{place}: {args}"
            named = _named(args)
            assert named and all("==" in a for a in named), f"{place}: {args}"


def test_constraints_pin_every_requirement_of_setup_cfg():
    """Every package setup.cfg asks for (install_requires and each extra) is pinned, at a
    version its requirement admits: the constraints and setup.cfg agree."""
    pins = _pins()
    groups = _freeze_constraints().setup_cfg_requirements(ROOT / "setup.cfg")
    assert groups[""], "setup.cfg has no install_requires"
    for extra, requirements in groups.items():
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{requirement} ({extra or 'install_requires'}) not pinned"
            assert Version(pins[name]) in requirement.specifier, f"{requirement}: {pins[name]}"


def test_constraints_pin_the_whole_installed_dependency_closure():
    """Every package the project's requirements pull in, through the installed packages'
    metadata, is pinned: a dependency added to setup.cfg, or one a pinned package gained,
    shows up here until the constraints are made again."""
    freeze = _freeze_constraints()
    roots = [
        r for group in freeze.setup_cfg_requirements(ROOT / "setup.cfg").values() for r in group
    ]
    needed = set(freeze.closure(roots)) - {canonicalize_name("apex-dqn")}
    assert {"ray", "torch", "numpy", "grpcio"} <= needed
    missing = sorted(needed - set(_pins()))
    assert not missing, f"not in deploy/constraints.txt: {missing}"


def test_constraints_are_exact_and_listed_once():
    lines = [
        line.strip()
        for line in CONSTRAINTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    names = [canonicalize_name(Requirement(line).name) for line in lines]
    assert len(names) == len(set(names)), "a package is pinned twice"
    for line in lines:
        specifier = list(Requirement(line).specifier)
        assert len(specifier) == 1 and specifier[0].operator == "==", line
        assert "+" not in specifier[0].version, f"{line}: pin without a local label"
    assert canonicalize_name("apex-dqn") not in names


def test_cluster_readme_commands_use_known_flags():
    readme = (DEPLOY / "README.md").read_text()
    commands = [
        line.strip()
        for line in readme.splitlines()
        if line.strip().startswith("ray submit") and "train.py" in line
    ]
    assert commands, "deploy/README.md shows no `ray submit ... train.py` command"
    parser = build_parser()
    for command in commands:
        parser.parse_args(_train_args(command))
        assert "--address auto" in command or "--address=auto" in command, command
