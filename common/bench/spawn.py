"""Run one variant in a fresh worker process and collect its JSON result.

The worker never outlives the orchestrator: on Linux the kernel kills it when its parent
dies (PR_SET_PDEATHSIG, even on SIGKILL), and on every other exit path subprocess.run kills
it before re-raising. Its output file is the orchestrator's, removed on every exit path.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common.core.errors import RecipeError

if TYPE_CHECKING:  # plan -> peers -> peer_process imports this module
    from common.bench.plan import Variant

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent_now() -> None:
    """In a rank torchrun started: die with the launcher too (Linux), so killing the
    orchestrator ends every rank, not only the launcher."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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


_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s*")


def _last_error(output: str, returncode: int) -> str:
    """The failing rank's own `error: ...` line when there is one (torchrun prints its
    summary after it), else the cause in torchrun's summary (a rank killed by a signal
    prints no error of its own), else the last line that is not a rule of '='."""
    lines = [_RANK_PREFIX.sub("", ln).strip() for ln in output.splitlines() if ln.strip()]
    lines = [ln for ln in lines if ln.strip("=-")]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    causes = [" ".join(ln.split()) for ln in lines if ln.startswith(("traceback", "exitcode"))]
    last = (errors or causes[-1:] or lines or [f"exit code {returncode}"])[-1]
    return last.removeprefix("error: ")


def spawn(
    script: str,
    overrides: list[str],
    variant: Variant,
    extra: list[str],
    launcher: list[str] | None = None,
) -> dict | None:
    """Run the variant's worker (under `launcher`, e.g. torchrun's command, when it has
    several ranks); its result, or None when rank 0 ran on another node."""
    opt_arg = [f"+opt=[{','.join(variant.opts)}]"] if variant.opts else []
    peer_arg = [f"bench.peer={variant.peer}"] if variant.peer else []
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [
            *(launcher or [sys.executable]),
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
            last = _last_error(proc.stderr + proc.stdout, proc.returncode)
            raise RecipeError(f"variant {variant.name!r} failed: {last}")
        text = Path(out.name).read_text()
        return json.loads(text) if text else None
