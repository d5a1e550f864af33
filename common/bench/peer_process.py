"""A peer engine in its own process, driven over a line protocol (peer_servers/_protocol.py).

llama.cpp and vLLM run outside this process: each may need another interpreter (vLLM lives in
its own virtualenv), and each is measured alone (its memory, its threads), as users run it.
The server times every token itself; this side turns its replies into Completions through
the engine's stop rule, so peer rows are measured and cut exactly like ours.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.bench.runners import Runner
from common.bench.spawn import _die_with_parent
from common.bench.workload import batches
from common.core.errors import RecipeError
from common.core.request import Completion, Request
from common.engine.stop import StopRule

ROOT = Path(__file__).resolve().parents[2]


class PeerProcess:
    """One server process; call() sends a request line and returns its reply."""

    def __init__(self, name: str, python: str, setup: dict, env: dict[str, str]) -> None:
        self.name = name
        # The engine's own output; kept (and named in the error) only if the peer fails.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115  (lives as long as the process)
            "w+", prefix=f"llm-recipes-{name}-", suffix=".log", delete=False
        )
        # Only this checkout on the path: the server imports the standard library, its engine
        # and peer_servers/ (whose package __init__ files are empty), nothing else of ours.
        path = {"PYTHONPATH": str(ROOT)}
        self._proc = subprocess.Popen(
            [python, "-m", f"common.bench.peer_servers.{name}_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **env, **path},
            preexec_fn=_die_with_parent(),
        )
        self.peak_rss = 0
        self.failed = False
        atexit.register(self.close)
        self.call(setup)

    def call(self, msg: dict) -> dict:
        try:
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        self.failed = not line or '"error"' in line
        if not line:
            raise RecipeError(
                f"{self.name} peer exited: {self._last_log_line()} (log: {self._log.name})"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise RecipeError(f"{self.name} peer failed: {reply['error']} (log: {self._log.name})")
        self.peak_rss = max(self.peak_rss, reply.pop("peak_rss", 0))
        return reply

    def _last_log_line(self) -> str:
        self._proc.wait(timeout=30)
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit code {self._proc.returncode}"

    def close(self) -> None:
        """Close stdin (the server exits), then drop the log unless the peer failed."""
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._log.close()
        if not self.failed:
            Path(self._log.name).unlink(missing_ok=True)


def server_runner(
    proc: PeerProcess,
    stop: StopRule,
    max_batch: int,
    one_call: bool,
    arrivals: list[float] | None,
    peak_kv: int,
    weights: tuple[int, int],
    teacher: Callable[[PeerProcess, list[int], list[int]], torch.Tensor],
) -> Runner:
    """A Runner over a peer server. one_call: every request goes in one call (the server
    schedules them, as under our continuous batching); otherwise static batches of up to
    max_batch, each timed from its own start. weights: (bytes held, bytes read per decode)."""
    stats: dict[str, int] = {}

    def generate(requests: list[Request]) -> list[Completion]:
        s = requests[0].sampling
        if s.no_repeat_ngram_size:
            raise RecipeError(f"the {proc.name} peer has no no_repeat_ngram_size; leave it at 0")
        reply = proc.call(
            {
                "cmd": "generate",
                "requests": [
                    {
                        "prompt": r.prompt,
                        "max_new_tokens": r.max_new_tokens,
                        "ignore_eos": r.ignore_eos,
                    }  # fmt: skip
                    for r in requests
                ],
                "arrivals": arrivals if one_call else None,
            }
        )
        for k, v in reply["stats"].items():
            stats[k] = stats.get(k, 0) + v
        comps = []
        for r, out in zip(requests, reply["outputs"]):
            tokens, reason = stop.cut(r, out["tokens"], r.max_new_tokens)
            comps.append(Completion(tokens, reason, out["times"][: len(tokens)]))
        return comps

    def reset() -> None:
        stats.clear()
        proc.call({"cmd": "reset"})

    return Runner(
        generate,
        lambda prompt, cont, stepwise=False: teacher(proc, prompt, cont),  # one forward
        lambda: peak_kv,
        (lambda reqs: [reqs]) if one_call else (lambda reqs: batches(reqs, max_batch)),
        lambda: dict(stats),
        reset,
        weight_bytes=weights[0],
        decode_weight_bytes=weights[1],
        peak_memory=lambda: proc.peak_rss,
    )


def teacher_logits(proc: PeerProcess, prompt: list[int], cont: list[int]) -> torch.Tensor:
    """Full logits [len(cont), vocab], passed through a .npy file (too large for a line)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "logits.npy")
        proc.call({"cmd": "logits", "prompt": prompt, "continuation": cont, "out": out})
        return torch.from_numpy(np.load(out))


def teacher_argmax(proc: PeerProcess, prompt: list[int], cont: list[int]) -> torch.Tensor:
    """Only each position's greedy choice [len(cont)] (a peer that gives no logits)."""
    reply = proc.call({"cmd": "argmax", "prompt": prompt, "continuation": cont})
    return torch.tensor(reply["argmax"], dtype=torch.long)


def sampling_message(s: Any) -> dict:
    return {
        "do_sample": s.do_sample,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "repetition_penalty": s.repetition_penalty,
    }
