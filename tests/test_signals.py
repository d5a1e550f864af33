"""Interrupts leave nothing behind: a real recipe run at tiny scale, signalled mid-benchmark.

SIGINT and SIGTERM to the orchestrator print one line and exit 130 / 143; the worker it was
waiting for dies with it, and its temporary files (the worker's output json, the reference
dir with logits.safetensors) and the results lock are gone. SIGKILL cannot be caught: there
the kernel still kills the worker (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "model.scale=tiny",
    "hardware=cpu",
    "bench.threads=1",
    "bench.warmup=0",
    "bench.rounds=2",
    "workload.num_prompts=2",
    "workload.prompt_len=8",
    "workload.max_new_tokens=200",
]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _state(pid: int) -> str | None:
    """The process's state letter (Z = exited, not yet reaped), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _temp_files(tmp: Path) -> list[Path]:
    """Files and dirs Python's tempfile made there (torch's own caches are not ours)."""
    return sorted(tmp.glob("tmp*"))


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _start(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """The recipe with its own temp dir, once its first worker runs: (process, worker, tmp)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "recipes/llama65b/run.py"), *ARGS],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # our signals reach the orchestrator only, not the worker
    )
    _wait(lambda: _children(proc.pid) or proc.poll() is not None, 120, "a worker")
    assert proc.poll() is None, proc.communicate()[1]
    (worker,) = _children(proc.pid)
    return proc, worker, tmp


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_prints_one_line_and_leaves_nothing(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    proc, worker, tmp = _start(tmp_path)
    assert len(_temp_files(tmp)) == 2  # the worker's output file and the reference dir
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [
        f"interrupted ({sig.name}): the current run wrote no results"
    ]
    assert not _alive(worker)
    assert _temp_files(tmp) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no results, no lock


def test_worker_dies_with_a_killed_orchestrator(tmp_path: Path) -> None:
    proc, worker, _ = _start(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    _wait(lambda: not _alive(worker), 30, "the worker to die with its parent")
