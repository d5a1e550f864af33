"""Run one variant in a fresh worker process and collect its JSON result."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common.bench.plan import Variant
from common.core.errors import RecipeError


def _spawn(script: str, overrides: list[str], variant: Variant, extra: list[str]) -> dict:
    opt_arg = [f"+opt=[{','.join(variant.opts)}]"] if variant.opts else []
    peer_arg = [f"bench.peer={variant.peer}"] if variant.peer else []
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [
            sys.executable,
            script,
            *overrides,
            *opt_arg,
            *peer_arg,
            *extra,
            f"bench.worker_out={out.name}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
            last = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
            raise RecipeError(f"variant {variant.name!r} failed: {last}")
        return json.loads(Path(out.name).read_text())
