"""Export a checkpoint's policy: its config and online network alone, small enough to share.

    python -m apex_dqn.evaluation.export --checkpoint RUN_DIR_OR_FILE --out policy.pt
    apex-dqn-export --checkpoint RUN_DIR_OR_FILE --out policy.pt [--dtype float32]

A checkpoint holds what a run needs to go on: the online and target networks, the
optimizer's moments, the counters. Scoring or watching a policy needs only the config and
the online network, which in float16 is an eighth of that (two bytes a weight against
sixteen). The exported file is a checkpoint of this program's format whose learner
state holds ``online`` and ``updates`` alone, so
``apex-dqn-evaluate --checkpoint`` and ``apex-dqn-play watch --checkpoint`` take it as they
take any checkpoint (the weights are cast back to float32 as they load). ``--resume``
refuses it in one line: it has no target network or optimizer to go on with.

Float16 keeps 11 significant bits: each weight moves by at most 2^-11 of itself, and
a Q-value, a sum of many such products, by about as much of its own size
(``tests/evaluation/test_export.py`` bounds it); the greedy action changes only where two
actions' values lie that close.

The output is written atomically, and never over an existing file: an export cannot
replace a run's checkpoint or another export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from apex_dqn.common import checkpoint
from apex_dqn.common.cli import CommandError, run_command
from apex_dqn.common.files import write_atomically
from apex_dqn.evaluation.policy import load_policy

PROG = "apex-dqn-export"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a checkpoint's config and online network, to score and watch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory")
    p.add_argument("--out", required=True, help="the file to write (it must not exist)")
    p.add_argument("--dtype", default="float16", help=f"weights' dtype: {', '.join(DTYPES)}")
    return p


def policy_payload(source: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The exported payload of a loaded checkpoint ``source`` (:func:`checkpoint.load`)."""
    online = source["learner"]["online"]
    return {
        "format": checkpoint.FORMAT,
        "config": source["config"],
        "learner": {
            "online": {k: v.to(dtype) if v.is_floating_point() else v for k, v in online.items()},
            "updates": int(source["learner"].get("updates", 0)),
        },
        "counters": dict(source.get("counters", {})),
        "run_id": source.get("run_id"),
        "exported_from": Path(source["path"]).name,
    }


def run(args: argparse.Namespace) -> None:
    if args.dtype not in DTYPES:
        raise CommandError(f"--dtype={args.dtype!r} is invalid: must be one of {', '.join(DTYPES)}")
    out = Path(args.out)
    if out.exists():
        raise CommandError(f"--out {out} exists: an export never replaces a file")
    if not out.parent.is_dir():
        raise CommandError(f"--out {out}: its directory {out.parent} does not exist")
    cfg, _, source = load_policy(args.checkpoint)  # refuses what holds no playable network
    payload = policy_payload(source, DTYPES[args.dtype])
    write_atomically(out, lambda f: torch.save(payload, f))
    cfg_line = f"{cfg.game}, {cfg.network}{' dueling' if cfg.dueling else ''} network"
    print(
        f"exported {source['path']} -> {out} ({cfg_line}, {args.dtype}, "
        f"{payload['learner']['updates']:,} updates, {out.stat().st_size / 2**20:.1f} MiB)"
    )


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status (2 for a user error)."""
    return run_command(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
