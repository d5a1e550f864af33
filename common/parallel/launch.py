"""Distributed runs under torchrun semantics: the launch command, the process group, and
what rank 0 shares with the others.

The recipe's orchestrator starts each variant's ranks through `torch.distributed.run` (the
elastic launcher behind `torchrun`): it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT for every rank, and when one rank exits with an error it terminates the others
and exits non-zero, so a crash never leaves ranks waiting. A collective that never completes
(a peer stuck rather than dead) fails after `parallel.timeout_s` instead of hanging.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from common.core.errors import RecipeError

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_prefix(
    nproc_per_node: int, nnodes: int, node_rank: int, master_addr: str, master_port: int
) -> list[str]:
    """The command that starts this node's ranks (torchrun's static rendezvous: node 0 hosts
    the store at master_addr:master_port, and holds rank 0, which writes the results)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
    ]


def bind_cpu_rank(local_rank: int, local_world: int) -> None:
    """Give this CPU rank its own share of the node's cores, and as many torch threads.
    Left alone, torchrun runs every rank with one thread (OMP_NUM_THREADS=1) free to roam
    every core: on a many-core node most cores idle, and ranks migrate onto each other's.
    Called before any thread starts, so gloo's and OpenMP's threads inherit it."""
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // local_world
    if share == 0:  # more ranks than cores: nothing to split
        return
    mine = cores[local_rank * share : (local_rank + 1) * share]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))


def init_distributed(
    device_type: str, world_size: int, timeout_s: float, cpu_bind: bool = True
) -> None:
    """Join the process group torchrun set up (a no-op for one process)."""
    if world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return
    if not under_torchrun():
        raise RecipeError(
            f"a run over {world_size} ranks needs torchrun's environment; start it with "
            "recipes/<name>/run.py (it launches the ranks) or torchrun"
        )
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise RecipeError(
            f"parallel layout needs {world_size} ranks but torchrun started "
            f"{os.environ['WORLD_SIZE']}"
        )
    local = int(os.environ["LOCAL_RANK"])
    if device_type in ("cuda", "npu"):
        getattr(torch, device_type).set_device(local)  # one device per rank on a node
    elif cpu_bind:
        bind_cpu_rank(local, int(os.environ["LOCAL_WORLD_SIZE"]))
    dist.init_process_group(BACKENDS[device_type], timeout=timedelta(seconds=timeout_s))
    # Left to interpreter teardown, the group's C++ threads can be destroyed while joinable:
    # std::terminate, SIGABRT, a failed run after its results were written.
    atexit.register(_leave)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_writer() -> bool:
    """Rank 0 writes results; every other rank computes the same steps and writes nothing."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def share(obj: Any) -> Any:
    """Rank 0's value on every rank (decisions every rank must take alike)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
