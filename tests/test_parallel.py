"""Tensor and pipeline parallel on CPU: two ranks (gloo, started by torchrun) give the greedy
tokens of one device and its logits within 1e-4 (fp32), for LLaMA and GLM-4."""

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from parallel_cases import CASES, MODELS, generate, load, save_checkpoint

from common.bench.cli import compose_config
from common.bench.preflight import preflight
from common.bench.spawn import _last_error
from common.core.errors import RecipeError
from common.device.select import Device
from common.parallel.launch import free_port, torchrun_prefix
from common.parallel.measured import weight_bytes
from common.parallel.placement import Part
from common.parallel.support import check_parallel
from models.llama import LlamaForCausalLM

HERE = Path(__file__).resolve().parent


# Kernels the ranks run without measuring first (each implementation is tested against the
# others elsewhere); keeps the launch short.
PINS = "rms_norm=torch,int8_linear=dequant_mm,decode_attention=sdpa,paged_attention=gather_sdpa"


def _torchrun(
    script: Path, *args: str, timeout: float = 240, ranks: int = 2
) -> subprocess.CompletedProcess:
    cmd = [*torchrun_prefix(ranks, 1, 0, "127.0.0.1", free_port()), str(script), *args]
    env = {**os.environ, "LLM_RECIPES_KERNELS": PINS, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    """(two ranks' results, one device's, the checkpoints), from one torchrun launch."""
    tmp = tmp_path_factory.mktemp("parallel")
    ckpts = [save_checkpoint(name, tmp) for name in MODELS]
    proc = _torchrun(HERE / "parallel_ranks.py", str(tmp), *map(str, ckpts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = {}
    for ckpt in ckpts:
        for case, opts in CASES.items():
            one[f"{ckpt.name}/{case}"] = generate(load(ckpt, opts), Device("cpu"), opts)
    return torch.load(tmp / "got.pt"), one, {c.name: c for c in ckpts}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", ["rows", "paged"])
def test_tensor_parallel_matches_one_device(runs, model: str, case: str) -> None:
    got, one = runs[0][f"{model}/tp/{case}"], runs[1][f"{model}/{case}"]
    assert got["tokens"] == one["tokens"]
    torch.testing.assert_close(got["logits"], one["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("model", MODELS)
def test_tensor_parallel_over_shared_memory_matches_one_device(runs, model: str) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("shared-memory collectives need a core per rank")
    assert runs[0]["shm/slot"] > 0, "two CPU ranks of one node use shared memory"
    got, one = runs[0][f"{model}/tp/shm"], runs[1][f"{model}/rows"]
    assert got["tokens"] == one["tokens"]
    torch.testing.assert_close(got["logits"], one["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [7, 768, 2048])
def test_shared_memory_collectives_equal_gloo(runs, dtype, n: int) -> None:
    """Two ranks' sums round once either way, so they equal gloo's bit for bit; a message
    larger than a slot goes through gloo."""
    mine, theirs, gathered, parts = runs[0][f"shm/{dtype}/{n}"]
    assert torch.equal(mine, theirs)
    assert all(torch.equal(a, b) for a, b in zip(gathered, parts, strict=True))


@pytest.mark.parametrize("model", MODELS)
def test_a_rank_holds_its_share_of_the_weights(runs, model: str) -> None:
    """Each rank loads only its slices (TP) or its layers (PP): rank 0 holds about half."""
    full = weight_bytes(load(runs[2][model], {}))
    assert runs[0][f"{model}/tp/rows"]["weight_bytes"] < 0.6 * full
    assert runs[0][f"{model}/pp/weight_bytes"] < 0.6 * full


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", ["int8", "int8_g32"])
def test_tensor_parallel_int8_stays_close(runs, model: str, case: str) -> None:
    """int8 quantizes each rank's shard as it would any matrix: per output channel, the
    row-parallel o_proj and down_proj get scales of their half of the input channels, so
    logits move a little; group-wise, a group that a shard boundary cuts does too."""
    got, one = runs[0][f"{model}/tp/{case}"], runs[1][f"{model}/{case}"]
    assert got["tokens"][0][:2] == one["tokens"][0][:2]
    err = (got["logits"] - one["logits"]).abs().max()
    assert err < 0.05 * one["logits"].abs().max()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("micro", [1, 2])
def test_pipeline_parallel_matches_one_device(runs, model: str, micro: int) -> None:
    got, one = runs[0][f"{model}/pp/{micro}"], runs[1][f"{model}/rows"]
    assert got["tokens"] == one["tokens"]
    torch.testing.assert_close(got["logits"], one["logits"], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def grid_runs(runs, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four ranks, tensor and pipeline parallel at once: 2 stages of 2 tensor-parallel ranks."""
    tmp = tmp_path_factory.mktemp("grid")
    proc = _torchrun(HERE / "parallel_ranks.py", str(tmp), *map(str, runs[2].values()), ranks=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "got.pt")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("micro", [1, 2])
def test_tensor_and_pipeline_parallel_together_match_one_device(
    runs, grid_runs, model: str, micro: int
) -> None:
    got, one = grid_runs[f"{model}/tp_pp/{micro}"], runs[1][f"{model}/rows"]
    assert got["tokens"] == one["tokens"]
    torch.testing.assert_close(got["logits"], one["logits"], atol=1e-4, rtol=0)
    full = weight_bytes(load(runs[2][model], {}))  # a stage's half, sliced in two
    assert grid_runs[f"{model}/tp_pp/weight_bytes"] < 0.4 * full


def test_a_failing_rank_ends_the_run(tmp_path: Path) -> None:
    """Rank 1 fails while rank 0 waits in a collective: torchrun ends rank 0 too, and the
    failing rank's error line is what the orchestrator reports."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "if dist.get_rank() == 1:\n"
        "    print('error: rank 1 cannot go on', file=sys.stderr); sys.exit(2)\n"
        "dist.barrier()\n"
    )
    proc = _torchrun(script, timeout=120)
    assert proc.returncode != 0
    assert _last_error(proc.stderr + proc.stdout, proc.returncode) == "rank 1 cannot go on"


def test_a_rank_killed_by_a_signal_is_reported_by_its_cause() -> None:
    """torchrun's summary, not its closing rule of '=', names what ended the run."""
    summary = "\n".join([
        "=" * 40, "run.py FAILED", "-" * 40, "Root Cause (first observed failure):", "[0]:",
        "  rank      : 1 (local_rank: 1)", "  exitcode  : -11 (pid: 42)",
        "  traceback : Signal 11 (SIGSEGV) received by PID 42", "=" * 40,
    ])  # fmt: skip
    assert _last_error(summary, 1) == "traceback : Signal 11 (SIGSEGV) received by PID 42"
    assert _last_error("=" * 40, 1) == "exit code 1"


def test_cpu_ranks_get_disjoint_cores_and_as_many_threads(tmp_path: Path) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores")
    script = tmp_path / "bind.py"
    script.write_text(
        "import os, torch\n"
        "from common.parallel.launch import init_distributed\n"
        "init_distributed('cpu', 2, 60)\n"
        "pinned = ','.join(map(str, sorted(os.sched_getaffinity(0))))\n"
        # one write per rank: two ranks' print() calls can interleave on the shared pipe
        "os.write(1, f\"rank {os.environ['RANK']} {pinned} {torch.get_num_threads()}\\n\".encode())\n"
    )
    proc = _torchrun(script, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = {}
    for line in proc.stdout.splitlines():
        if line.startswith("rank "):
            _, rank, pinned, threads = line.split()
            seen[int(rank)] = ({int(c) for c in pinned.split(",")}, int(threads))
    half = len(cores) // 2
    assert seen[0][0] == set(cores[:half]) and seen[1][0] == set(cores[half : 2 * half])
    assert seen[0][1] == seen[1][1] == half


def test_part_slices_pads_and_zeros() -> None:
    full = torch.arange(12.0).view(6, 2)
    two_blocks = Part(0, ((0, 2), (4, 5)), 3)  # a fused gate_up shard: a block of each half
    assert torch.equal(two_blocks.take(full.__getitem__, (6, 2)), full[[0, 1, 4]])
    padded = Part(0, ((4, 6),), 3)  # the last vocabulary shard, zero-padded
    assert torch.equal(padded.take(full.__getitem__, (6, 2))[2], torch.zeros(2))
    zeros = Part(0, (), 6)  # a row-parallel bias on ranks other than 0
    assert torch.equal(zeros.take(full.__getitem__, (6, 2)), torch.zeros(6, 2))
    cols = Part(1, ((1, 2),), 1)
    assert cols.shape((6, 2)) == (6, 1)


@pytest.mark.parametrize(
    "par,kv,peer,workload,match",
    [
        (dict(tp=3), "dynamic", None, "latency", "must divide"),
        (dict(tp=2), "dynamic", "hf", "latency", "bench.peers"),
        (dict(tp=2), "paged", None, "online", "workload=online"),
        (dict(pp=2), "paged", None, "latency", "kv_cache.kind=paged"),
        (dict(pp=2, micro_batches=4), "dynamic", None, "latency", "micro_batches=4"),
    ],
)
def test_what_does_not_compose_is_refused(par, kv, peer, workload, match) -> None:
    layout = SimpleNamespace(**{"tp": 1, "pp": 1, "micro_batches": 1, **par})
    with pytest.raises(RecipeError, match=match):
        check_parallel(layout, MODELS["llama"][1], kv, "none", peer, workload, batch=2)


def test_a_row_that_does_not_compose_is_refused_up_front() -> None:
    """Each row's opts are merged onto the config, as its worker will compose them."""
    cfg = compose_config(
        "llama65b", ["model.scale=tiny", "parallel.pp=2", "bench.variants=[[static_kv],[paged_kv]]"]
    )
    with pytest.raises(RecipeError, match="kv_cache.kind=paged"):
        preflight(cfg, LlamaForCausalLM)
