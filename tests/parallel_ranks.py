"""One rank of tests/test_parallel.py's distributed runs (started by torchrun, gloo).

argv: OUT_DIR CHECKPOINT... ; for each checkpoint, with 2 ranks: tensor parallel (several KV
layouts and opts) and pipeline parallel (several micro-batch counts); with 4 ranks: both at
once, 2 stages of 2 tensor-parallel ranks. Rank 0 saves what it got.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel_cases import CASES, generate, load  # noqa: E402

from common import ops  # noqa: E402
from common.attention.backends import get_backend  # noqa: E402
from common.device.select import select_device  # noqa: E402
from common.engine.pipeline import Pipeline  # noqa: E402
from common.parallel.collectives import Collectives  # noqa: E402
from common.parallel.launch import init_distributed  # noqa: E402
from common.parallel.layout import Layout  # noqa: E402
from common.parallel.measured import weight_bytes  # noqa: E402
from common.parallel.mesh import rank_role  # noqa: E402
from common.parallel.placement import combined  # noqa: E402
from common.parallel.stages import stage_placement  # noqa: E402
from common.parallel.tensor import TensorParallel  # noqa: E402

world = int(os.environ["WORLD_SIZE"])
init_distributed("cpu", world, 60)
device = select_device("cpu")
out_dir = Path(sys.argv[1])
ops.reset(out_dir / f"kernel_choices_{device.rank}.json")  # not the user's rankings
got = {}
for ckpt in sys.argv[2:] if world == 4 else ():
    name = Path(ckpt).name
    role = rank_role("cpu", Layout(tp=2, pp=2))
    tp = TensorParallel(role.tp_rank, 2, role.tp_group)
    for micro in (1, 2):
        model = tp.parallelize(load(ckpt, {}, combined(stage_placement(role.stage, 2), tp.shard)))
        got[f"{name}/tp_pp/weight_bytes"] = weight_bytes(model)
        backend = get_backend("eager", device)
        kv = CASES["rows"]["kv"]
        pipe = Pipeline(model, role.stage, 2, device.torch, kv, backend, micro, role.pp_group)
        got[f"{name}/tp_pp/{micro}"] = generate(pipe, device, {})
if world == 2:  # shared-memory collectives (4 KB slots) against gloo's
    comm = Collectives(None, "cpu", 4096)
    got["shm/slot"] = comm.slot
    for dtype in (torch.float32, torch.bfloat16):
        for n in (7, 768, 2048):  # 2048 fp32 values exceed a slot: gloo
            torch.manual_seed(device.rank)
            x = torch.randn(n).to(dtype)
            mine, theirs = x.clone(), x.clone()
            comm.all_reduce(mine)
            dist.all_reduce(theirs)
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            got[f"shm/{dtype}/{n}"] = (mine, theirs, comm.all_gather(x), parts)
for ckpt in sys.argv[2:] if world == 2 else ():
    name = Path(ckpt).name
    for case, opts in CASES.items():
        tp = TensorParallel(device.rank, device.world_size)
        model = tp.parallelize(load(ckpt, opts, tp.shard))
        got[f"{name}/tp/{case}"] = generate(model, device, opts)
        got[f"{name}/tp/{case}"]["weight_bytes"] = weight_bytes(model)
    tp = TensorParallel(device.rank, device.world_size, shm_bytes=1 << 20)
    model = tp.parallelize(load(ckpt, {}, tp.shard))
    got[f"{name}/tp/shm"] = generate(model, device, CASES["rows"])
    for micro in (1, 2):
        model = load(ckpt, {}, stage_placement(device.rank, 2))
        got[f"{name}/pp/weight_bytes"] = weight_bytes(model)
        backend = get_backend("eager", device)
        pipe = Pipeline(model, device.rank, 2, device.torch, CASES["rows"]["kv"], backend, micro)
        got[f"{name}/pp/{micro}"] = generate(pipe, device, {})
if device.rank == 0:
    torch.save(got, out_dir / "got.pt")
