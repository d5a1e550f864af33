"""Smoke tests: the ChatGLM recipe runs end to end at tiny scale, with every opt."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
OPTS = sorted(p.stem for p in (ROOT / "configs" / "opt").glob("*.yaml"))
# A run is mostly process start-up (one process per variant), so the two go in parallel.
RUNS = {
    "flash_attn_int8": ["+opt=flash_attn,int8"],
    "each_opt": [f"+opt={','.join(OPTS)}", "bench.each=true"],
}
TIMEOUT_S = 300  # for all runs together, on a machine others share
Runs = dict[str, tuple[int | None, str, Path]]  # name -> (exit code or None, log, results dir)
# The wiring is under test, not speed: a short workload, no bandwidth probe, one thread per
# process so the runs can share the machine.
LEAN = [
    "workload.num_prompts=1",
    "workload.prompt_len=16",
    "workload.max_new_tokens=4",
    "hardware.mem_bw_gbs=10",
    "bench.threads=1",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """All runs start at once; a run that outlives the deadline gets exit code None."""
    procs = {}
    for name, overrides in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        cmd = [
            sys.executable,
            str(ROOT / "recipes" / "chatglm" / "run.py"),
            *overrides,
            "model.scale=tiny",
            "bench.repeats=1",
            "bench.rounds=1",
            "bench.warmup=1",  # compile rows compile in the warm-up pass (never inside TPOT)
            "compile.backend=aot_eager",  # traced like inductor, without generating code
            f"bench.results_dir={out}",
            *LEAN,
        ]
        with open(out / "log.txt", "w") as log:  # a file, not a pipe: no run can block
            # Own session: a stuck run is ended with its worker subprocesses.
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs[name] = (proc, out)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        return {
            name: (finish(proc, deadline), (out / "log.txt").read_text(), out)
            for name, (proc, out) in procs.items()
        }
    finally:
        for proc, _ in procs.values():
            with contextlib.suppress(ProcessLookupError):  # the run and its workers ended
                os.killpg(proc.pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, deadline: float) -> int | None:
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def result(runs: Runs, name: str) -> dict:
    code, log, out = runs[name]
    status = f"timed out after {TIMEOUT_S} s" if code is None else f"exited {code}"
    assert code == 0, f"{RUNS[name]} {status}: {log[-2000:]}"
    (path,) = (out / "chatglm").glob("*/*.json")
    return json.loads(path.read_text())


def outputs_are_token_lists(variant: dict) -> bool:
    outs = variant["outputs"]
    return bool(outs) and all(o and all(isinstance(t, int) for t in o) for o in outs)


def test_flash_attn_int8(runs: Runs) -> None:
    r = result(runs, "flash_attn_int8")
    assert [v["name"] for v in r["variants"]] == ["baseline", "flash_attn+int8"]
    assert all(outputs_are_token_lists(v) for v in r["variants"])
    assert "glm-4-9b" in r["model"] and "scale tiny" in r["model"]


def alone(opt: str) -> str:
    """bench.each's row for an opt: the opt with the opts it requires."""
    spec = OmegaConf.load(ROOT / "configs" / "opt" / f"{opt}.yaml").opts[opt]
    return "+".join([*spec.get("requires", []), opt])


def test_every_opt_runs_on_glm(runs: Runs) -> None:
    variants = result(runs, "each_opt")["variants"]
    assert [v["name"] for v in variants] == ["baseline", *map(alone, OPTS)]
    assert all(outputs_are_token_lists(v) for v in variants)
