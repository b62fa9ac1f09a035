"""The deployment files, checked offline: Ray's own validator for the cluster launcher
configs, the required fields of the KubeRay manifest, and the settings this project
relies on (token authentication, a GPU head, spot CPU workers, the project installed on
every node, one Ray and torch version everywhere)."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from apex_dqn.common.config import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CLUSTER_CONFIGS = sorted(DEPLOY.glob("cluster*.yaml"))
KUBERAY = DEPLOY / "kuberay-rayjob.yaml"


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
        config = _prepared(path)
        remote = [r for r, local in config["file_mounts"].items() if local == "."]
        assert len(remote) == 1, "the repository must be mounted on every node"
        install = re.compile(rf"pip install .*-e {re.escape(remote[0])}\s*$")
        for role in ("head_setup_commands", "worker_setup_commands"):
            commands = config[role]
            torch = [i for i, c in enumerate(commands) if re.search(r"torch==\d", c)]
            project = [i for i, c in enumerate(commands) if install.search(c)]
            assert torch and project, role
            assert torch[0] < project[0], f"{role}: torch must be pinned before the project"
        worker_torch = next(c for c in config["worker_setup_commands"] if "torch==" in c)
        assert "whl/cpu" in worker_torch, "CPU workers should get the CPU build of torch"

    def test_images_run_the_same_ray_everywhere(self, path):
        docker = _load(path)["docker"]
        head, worker = docker["head_image"], docker["worker_image"]
        assert head.endswith("-gpu") and worker.endswith("-cpu")
        assert head.rsplit("-", 1)[0] == worker.rsplit("-", 1)[0]


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


# ------------------------------------------------------------------------------ KubeRay
def _rayjob() -> dict:
    with open(KUBERAY) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(group: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in _containers(group)
    )


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
    return problems


def test_rayjob_has_required_fields():
    assert rayjob_problems(_rayjob()) == []


def test_rayjob_entrypoint_uses_known_flags():
    args = _train_args(_rayjob()["spec"]["entrypoint"])
    assert args, "the entrypoint passes no settings"
    parsed = build_parser().parse_args(args)
    assert parsed.num_actors >= 1


def test_rayjob_gpu_limits_match_requests_and_auth_is_on():
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
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
    ],
    ids=["old-api-version", "no-entrypoint", "no-head-group", "no-gpu-limits"],
)
def test_broken_rayjob_is_caught(mutate, problem):
    job = copy.deepcopy(_rayjob())
    mutate(job)
    problems = rayjob_problems(job)
    assert any(problem in p for p in problems), problems


# ------------------------------------------------------------------ one version of each
def _deploy_texts() -> dict[str, str]:
    files = [*CLUSTER_CONFIGS, KUBERAY, DEPLOY / "Dockerfile"]
    return {p.name: p.read_text() for p in files}


def test_one_ray_version_in_every_deploy_file():
    versions = {}
    for name, text in _deploy_texts().items():
        found = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
        found |= set(re.findall(r"rayVersion:\s*\"?(\d+\.\d+\.\d+)", text))
        if found:
            versions[name] = found
    assert set(versions) >= {p.name for p in CLUSTER_CONFIGS} | {"kuberay-rayjob.yaml"}
    assert len(set().union(*versions.values())) == 1, versions


def test_one_torch_version_in_every_deploy_file_and_ci():
    texts = _deploy_texts()
    texts[".ci/run"] = (ROOT / ".ci" / "run").read_text()
    pins = {name: set(re.findall(r"torch==([\w.+]+)", t)) for name, t in texts.items()}
    assert all(pins[p.name] for p in CLUSTER_CONFIGS), pins
    assert pins[".ci/run"] and pins["Dockerfile"], pins
    assert len(set().union(*pins.values())) == 1, pins


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
