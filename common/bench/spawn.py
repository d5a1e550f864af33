"""Run one variant in a fresh worker process and collect its JSON result.

The worker never outlives the orchestrator: on Linux the kernel kills it when its parent
dies (PR_SET_PDEATHSIG, even on SIGKILL), and on every other exit path subprocess.run kills
it before re-raising. Its output file is the orchestrator's, removed on every exit path.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.bench.plan import Variant
from common.core.errors import RecipeError

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn for Linux; resolved here, in the parent, so the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def spawn(script: str, overrides: list[str], variant: Variant, extra: list[str]) -> dict:
    opt_arg = [f"+opt=[{','.join(variant.opts)}]"] if variant.opts else []
    peer_arg = [f"bench.peer={variant.peer}"] if variant.peer else []
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [
            sys.executable,
            script,
            *overrides,
            *opt_arg,
            *variant.overrides,
            *peer_arg,
            *extra,
            f"bench.worker_out={out.name}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_die_with_parent())
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
            last = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
            raise RecipeError(f"variant {variant.name!r} failed: {last}")
        return json.loads(Path(out.name).read_text())
