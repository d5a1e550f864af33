"""Where a rank sits in a tensor x pipeline layout, and its process groups.

The ranks form a (pp, tp) device mesh in Megatron-LM's order: the tensor-parallel ranks of
one stage are consecutive, so a stage's all-reduces stay on one node before its point-to-point
sends cross nodes. `torch.distributed.device_mesh` creates the groups (every rank creates
every group, as torch.distributed requires).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.distributed.device_mesh import init_device_mesh

from common.parallel.layout import Layout


@dataclass(frozen=True)
class RankRole:
    stage: int = 0  # pipeline stage
    tp_rank: int = 0  # rank within the stage's tensor-parallel group
    tp_group: Any = None  # torch.distributed groups; None on one device
    pp_group: Any = None  # this tp_rank's ranks across the stages, in stage order


def rank_role(device_type: str, layout: Layout) -> RankRole:
    """This rank's stage, tensor-parallel rank and groups (after init_distributed)."""
    if layout.tp * layout.pp == 1:
        return RankRole()
    mesh = init_device_mesh(device_type, (layout.pp, layout.tp), mesh_dim_names=("pp", "tp"))
    return RankRole(
        mesh.get_local_rank("pp"), mesh.get_local_rank("tp"), mesh.get_group("tp"),
        mesh.get_group("pp"),
    )  # fmt: skip
