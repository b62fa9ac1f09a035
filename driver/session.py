"""The driver's Ray session: join a cluster or start a local Ray, and stop only on request.

Which Ray a run uses: ``--address``, else ``RAY_ADDRESS``, else the cluster that
``ray start`` last started on this machine if it still runs (as on a cluster's head
node under ``ray submit``), else a new local Ray that ends with the run. The driver says
which, in one line: ``joined the Ray cluster at ...`` or ``started a local Ray at ...``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator

from apex_dqn.common.config import Config, ConfigError


def cluster_address(cfg: Config) -> str | None:
    """The Ray cluster to join, or None to start a local Ray.

    An address given (``--address``, else ``RAY_ADDRESS``) is joined as it is, except
    ``auto``: that is ``RAY_ADDRESS`` if set, else the cluster ``ray start`` last started on
    this machine, and only that one. Where none is recorded, or it has stopped, the run ends
    here in one line, before any Ray process starts. Ray's own ``auto`` would then join
    whichever Ray it finds running on the machine, whoever started it: on a shared head
    node (a lab's workstation) somebody else's. ``ray start`` records its cluster in Ray's
    temp directory (``$RAY_TMPDIR/ray``, else ``/tmp/ray``); ``deploy/cluster-onprem.yaml``
    gives the cluster's user one of its own, so under ``ray submit`` the run joins the
    launched cluster even where other Rays run on the same machine.
    """
    from_env = os.environ.get("RAY_ADDRESS", "")
    given = cfg.address or from_env
    if given == "auto" and from_env not in ("", "auto"):
        given = from_env  # Ray's order for auto: RAY_ADDRESS first
    if given and given != "auto":
        return given
    try:
        started, record = started_cluster()
    except Exception:  # Ray's lookup changed: let Ray resolve auto, or start a local Ray
        return given or None
    if given == "auto" and started is None:
        raise ConfigError(
            f"--address auto: no Ray cluster started by `ray start` runs on this machine "
            f"(none recorded in {record}, or it has stopped); give the cluster's address, "
            "or leave --address out to start a local Ray"
        )
    return started


def started_cluster() -> tuple[str | None, str]:
    """The address of the cluster ``ray start`` last started on this machine if its GCS
    still runs (else None), and the file Ray records it in."""
    from ray._common.utils import get_ray_address_file
    from ray._private.services import find_gcs_addresses
    from ray._private.utils import read_ray_address

    started = read_ray_address()
    return (started if started and started in find_gcs_addresses() else None), (
        get_ray_address_file(None)
    )


def start_ray(cfg: Config, address: str | None) -> None:
    """Join ``address``, or start a local Ray sized for the topology.

    Each run gets a namespace of its own, so two runs on one cluster never share actor
    names. A local Ray is asked for the CPUs the topology reserves (learner and actors)
    even on a smaller machine: there they share cores, where Ray would otherwise leave
    actors pending forever.
    """
    import ray

    namespace = f"apex-dqn-{uuid.uuid4().hex[:8]}"
    if address:
        context = ray.init(address=address, log_to_driver=True, namespace=namespace)
        info = getattr(context, "address_info", None) or {}  # none through Ray Client
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
        session = os.path.basename(info.get("session_dir", "")) or "session unknown"
        print(
            f"joined the Ray cluster at {info.get('gcs_address', address)} "
            f"({nodes} node(s), {session})",
            flush=True,
        )
        return
    cpus, needed = os.cpu_count() or 1, 1 + cfg.num_actors * cfg.actor_threads
    if needed > cpus:
        print(
            f"note: the learner and {cfg.num_actors} actors reserve {needed} CPUs; "
            f"this machine has {cpus}, so they will share cores",
            flush=True,
        )
    # "local": a new Ray even where /tmp/ray/ray_current_cluster names another cluster
    # (`ray start`, ray.cluster_utils.Cluster), live or stale, which ray.init() would join.
    with own_process_group():
        info = ray.init(
            address="local",
            include_dashboard=False,
            num_cpus=max(cpus, needed),
            namespace=namespace,
        ).address_info
    print(
        f"started a local Ray at {info['gcs_address']} "
        f"({os.path.basename(info['session_dir'])}); it stops when this run ends",
        flush=True,
    )


@contextlib.contextmanager
def own_process_group() -> Iterator[None]:
    """Start the processes made inside in a process group of their own.

    A signal sent to this run's whole process group (Ctrl-C; SIGTERM from `timeout`,
    a batch scheduler or a container stop) must reach only this driver, which then
    saves a checkpoint through the local Ray; Ray's processes must still be running
    for that. Ray blocks SIGINT in them, not SIGTERM. So the driver leads a new group
    while Ray starts its processes (they inherit it), then rejoins its own group.
    They still end with the driver: ``ray.shutdown()``, or Ray's own fate sharing if
    the driver is killed. A driver that already leads its group (a shell's job) cannot
    hand its children another one this way; there nothing changes.
    """
    original = os.getpgrp()
    try:
        os.setpgid(0, 0)
    except OSError:  # a session leader cannot change its group: nothing to isolate from
        yield
        return
    try:
        yield
    finally:
        os.setpgid(0, original)


def stop_on_first_signal() -> None:
    """Turn the first SIGINT or SIGTERM into KeyboardInterrupt, and ignore later ones."""
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)


def ignore_signals() -> None:
    """From here on neither Ctrl-C nor SIGTERM interrupts (the final checkpoint)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _interrupt_once(signum, frame) -> None:
    """The same signal often arrives twice (``timeout`` sends it to its child and to the
    group), and a second KeyboardInterrupt must not cut into the final checkpoint."""
    ignore_signals()
    raise KeyboardInterrupt
