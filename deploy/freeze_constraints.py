"""Writes deploy/constraints.txt: the exact version, as installed in the running Python, of
every package apex-dqn installs and of everything those packages depend on.

    python deploy/freeze_constraints.py            # rewrites deploy/constraints.txt
    python deploy/freeze_constraints.py --stdout   # prints it instead

The roots are setup.cfg's install_requires, every extra in setup.cfg (the test extra holds
all but gcs, the Google Cloud Storage filesystem) and EXTRA_ROOTS; their dependencies are
followed through the installed packages' own metadata, with environment markers evaluated
for this Python and platform, so the result is what `pip freeze` lists for this closure,
without the project, pip's own tools or whatever else the environment holds. Every
package must be installed: the script reads versions, it installs nothing.
"""

from __future__ import annotations

import argparse
import configparser
import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"

# Installed with the project, outside setup.cfg: the AWS SDK the cluster launcher needs on
# the machine that runs `ray up` and the autoscaler needs on the head node.
EXTRA_ROOTS = ("boto3",)

HEADER = """\
# Exact versions of every package apex-dqn installs and of everything those depend on:
# setup.cfg's install_requires and extras (the test extra holds all but gcs), boto3 for
# the cluster launcher on AWS, and their dependencies, as installed on CPython {python}
# ({system}, {machine}), the Python of the rayproject/ray:*-py{py_tag} images that
# deploy/Dockerfile builds on. torch is pinned without its local build label, so that the
# one pin admits the CUDA build (PyPI) and the CPU build (download.pytorch.org/whl/cpu).
#
# Install with it everywhere, torch first:
#   pip install -c deploy/constraints.txt torch=={torch}
#   pip install -c deploy/constraints.txt -e '.[test]'
# A constraints file asks for nothing itself: pip installs what the command names and the
# dependencies of those, each at the version below.
#
# Made by `python deploy/freeze_constraints.py` from the packages installed in the Python
# that ran it. To refresh: in a fresh CPython {python} environment on Linux, install the
# project with the versions wanted (torch first, then `pip install -e '.[test,gcs]'
# boto3`, without -c), run `python deploy/freeze_constraints.py`, then bring the Ray and
# torch versions in deploy/ and .ci/run to the new pins (tests/test_deploy.py lists any
# that differ) and rebuild and push the images (deploy/README.md).
"""


def setup_cfg_requirements(path: Path = ROOT / "setup.cfg") -> dict[str, list[Requirement]]:
    """install_requires and each extra of setup.cfg, as requirements, keyed by extra name
    ("" for install_requires)."""
    config = configparser.ConfigParser()
    config.read(path)

    def parse(text: str) -> list[Requirement]:
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        return [Requirement(line) for line in lines if line]

    groups = {"": parse(config.get("options", "install_requires", fallback=""))}
    if config.has_section("options.extras_require"):
        for extra, text in config.items("options.extras_require"):
            groups[extra] = parse(text)
    return groups


def _applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": e}) for e in extras | {""})


def closure(roots: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions the roots need, directly or not, keyed by canonical
    name. Raises LookupError naming a needed package that is not installed."""
    found: dict[str, metadata.Distribution] = {}
    seen_extras: dict[str, frozenset[str]] = {}
    todo = [(r, "the project") for r in roots if _applies(r, frozenset())]
    while todo:
        requirement, needed_by = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = frozenset(canonicalize_name(e) for e in requirement.extras)
        if name in seen_extras and extras <= seen_extras[name]:
            continue
        extras = extras | seen_extras.get(name, frozenset())
        seen_extras[name] = extras
        try:
            dist = found.get(name) or metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError as error:
            message = f"{requirement.name} (needed by {needed_by}) is not installed"
            raise LookupError(message) from error
        found[name] = dist
        for text in dist.requires or []:
            child = Requirement(text)
            if _applies(child, extras):
                todo.append((child, dist.metadata["Name"]))
    return found


def project_roots() -> list[Requirement]:
    groups = setup_cfg_requirements()
    roots = [r for group in groups.values() for r in group]
    return roots + [Requirement(name) for name in EXTRA_ROOTS]


def pins(dists: dict[str, metadata.Distribution]) -> list[str]:
    """name==version lines, sorted by name, local version labels (+cpu) left off."""
    lines = []
    for key in sorted(dists):
        dist = dists[key]
        lines.append(f"{dist.metadata['Name']}=={Version(dist.version).public}")
    return lines


def render() -> str:
    dists = closure(project_roots())
    project = canonicalize_name("apex-dqn")
    dists.pop(project, None)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    header = HEADER.format(
        python=python,
        py_tag=python.replace(".", ""),
        system=platform.system().lower(),
        machine=platform.machine(),
        torch=Version(dists["torch"].version).public,
    )
    return header + "\n".join(pins(dists)) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
    else:
        CONSTRAINTS.write_text(text)
        print(f"wrote {CONSTRAINTS.relative_to(ROOT)}: {text.count('==')} pins")


if __name__ == "__main__":
    main()
