"""The collectives of a tensor-parallel group: torch.distributed, or, between the CPU ranks of
one node, a shared-memory segment (common/ops/shm_collectives.cpp).

A CPU decode step all-reduces a few KB twice per layer. gloo moves each message over TCP and
wakes a sleeping thread to receive it; on a virtual machine a wake-up can take hundreds of
microseconds, which then costs more than the layer's math. Ranks that each own their cores
can instead copy to shared memory and spin until every rank's part is there (vLLM's and
DeepSpeed's CPU backends do the same). Messages larger than a slot (`parallel.shm_mb`), other
dtypes, devices, and groups that span nodes or share cores keep torch.distributed.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import uuid

import torch
import torch.distributed as dist
from torch import Tensor

from common.ops.build import builds, load_cpp

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = load_cpp("shm_collectives")
    lib.shm_segment_bytes.restype = ctypes.c_int64
    lib.shm_segment_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.shm_all_reduce.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]  # fmt: skip
    lib.shm_all_gather.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]  # fmt: skip
    return lib


def shm_eligible(group, device_type: str) -> bool:
    """CPU ranks, all on this node, each with a core of its own (no two spin on one core)."""
    if device_type != "cpu" or not builds("shm_collectives"):
        return False
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    ranks = dist.get_process_group_ranks(group)
    return len({r // local for r in ranks}) == 1 and local <= (os.cpu_count() or 1)


class Collectives:
    """all_reduce / all_gather over `group` (None: the world)."""

    def __init__(self, group=None, device_type: str = "cpu", shm_bytes: int = 0) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.slot = shm_bytes if shm_bytes and shm_eligible(self.group, device_type) else 0
        self.seq = 0
        if self.slot:
            self._map = self._segment()  # kept: the mapping lives as long as this object
            self.base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def _segment(self) -> mmap.mmap:
        """Rank 0 creates the file, every rank maps it, rank 0 unlinks it: nothing is left
        in /dev/shm however the run ends."""
        size = _lib().shm_segment_bytes(self.world, self.slot)
        box = [f"/dev/shm/llm-recipes-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        path = box[0]
        if self.rank == 0:
            with open(path, "wb") as f:
                f.truncate(size)  # zeros: every rank's sequence number starts at 0
        dist.barrier(group=self.group)
        fd = os.open(path, os.O_RDWR)
        try:
            segment = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        dist.barrier(group=self.group)
        if self.rank == 0:
            os.unlink(path)
        return segment

    def _shm(self, t: Tensor) -> bool:
        return (
            bool(self.slot) and t.dtype in _DTYPES and t.nbytes <= self.slot and t.is_contiguous()
        )

    def all_reduce(self, t: Tensor) -> None:
        """Sum over the ranks, in place."""
        if not self._shm(t):
            dist.all_reduce(t, group=self.group)
            return
        self.seq += 1
        _lib().shm_all_reduce(self.base, self.rank, self.world, self.slot, self.seq,
                              t.data_ptr(), t.numel(), _DTYPES[t.dtype])  # fmt: skip

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's `t`, in rank order."""
        t = t.contiguous()
        if not self._shm(t):
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t, group=self.group)
            return parts
        self.seq += 1
        out = t.new_empty(self.world, *t.shape)
        _lib().shm_all_gather(self.base, self.rank, self.world, self.slot, self.seq,
                              t.data_ptr(), out.data_ptr(), t.nbytes)  # fmt: skip
        return list(out.unbind(0))
