"""A ``ray.cluster_utils.Cluster`` in a process of its own, driven line by line on stdin.

Multi-node tests on one machine start it, so that the nodes, and the process-wide state
``Cluster`` keeps, stay out of the test process (which may hold a local Ray of its own).
Its first line is ``address GCS_ADDRESS head NODE_ID``; then one command per line, each
answered with one line:

    add CPUS          ->  node NODE_ID       a worker node with CPUS CPUs joins
    remove NODE_ID    ->  removed NODE_ID    that worker node leaves, its processes killed
    kill NS NAME      ->  killed NAME        the named actor is killed, never to restart

At the end of its input it shuts the cluster down: only the processes it started.

    python tests/cluster_control.py HEAD_CPUS
"""

from __future__ import annotations

import sys

import ray
from ray.cluster_utils import Cluster


def main(head_cpus: int) -> None:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False}
    )
    try:
        nodes = {}
        print(f"address {cluster.address} head {cluster.head_node.node_id}", flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            if command == "add":
                node = cluster.add_node(num_cpus=int(args[0]))
                cluster.wait_for_nodes()
                nodes[node.node_id] = node
                print(f"node {node.node_id}", flush=True)
            elif command == "remove":
                cluster.remove_node(nodes.pop(args[0]))
                print(f"removed {args[0]}", flush=True)
            elif command == "kill":
                if not ray.is_initialized():
                    ray.init(address=cluster.address, namespace=args[0], log_to_driver=False)
                ray.kill(ray.get_actor(args[1], namespace=args[0]), no_restart=True)
                print(f"killed {args[1]}", flush=True)
            else:
                print(f"unknown command {command!r}", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
