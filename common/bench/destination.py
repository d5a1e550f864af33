"""Where a run's results go, claimed before any worker starts.

A results name (`<workload>-<rows>`) says what was compared, not on what: the model, scale,
checkpoint, workload and settings are the run's identity, hashed into `config_hash` in its
JSON. A run replaces the files under its name only when they hold the same identity (so
`scripts/reproduce.sh` regenerates the committed tables in place); any other run writes
`<name>@<hash>` beside them and says so (`bench.replace=true` replaces them anyway: for a
committed command changed on purpose). A lock file next to the results makes a second run of
the same identity at the same time an error instead of a silent race, and a directory that
cannot be written is found here, before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.core.errors import RecipeError

# Keys the orchestrator sets for its workers, and where results go: not part of what was run.
_NOT_IDENTITY = (
    "role",
    "worker_out",
    "reference",
    "peer",
    "bandwidth",
    "round",
    "results_dir",
    "replace",
)


def run_identity(cfg: Any) -> dict:
    """Everything that decides the numbers: the resolved config minus bookkeeping keys."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["bench"] = {k: v for k, v in plain["bench"].items() if k not in _NOT_IDENTITY}
    return plain


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Destination:
    stem: Path  # write stem.json, stem.md, stem.png
    displaced: Path | None  # the results this run did not replace, if any


def _holds_other_run(stem: Path, key: str, command: str) -> bool:
    """Results already under this name from another run (before config_hash was recorded,
    a run is identified by its command line)."""
    try:
        existing = json.loads(stem.with_name(stem.name + ".json").read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # unreadable: never overwrite what cannot be compared
    if "config_hash" in existing:
        return existing["config_hash"] != key
    return existing.get("command") != command


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(stem: Path, key: str) -> tuple[Path, str | None]:
    """Create stem's lock file; (its path, None), or (path, the live holder's hash)."""
    lock = stem.with_name(f".{stem.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, _, holder = lock.read_text().partition(" ")
            if pid.isdigit() and _pid_alive(int(pid)):
                return lock, holder
            lock.unlink(missing_ok=True)  # left by a run that was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {key}")
        return lock, None
    raise RecipeError(f"cannot lock {lock}: another run keeps creating it")


@contextmanager
def claim(stem: Path, identity: dict, command: str, replace: bool = False) -> Iterator[Destination]:
    """The name this run writes under, locked for the duration of the run."""
    key = identity_hash(identity)
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        own = stem.with_name(f"{stem.name}@{key}")
        chosen = own if not replace and _holds_other_run(stem, key, command) else stem
        lock, holder = _lock(chosen, key)
        if holder is not None and chosen == stem and holder != key:
            chosen = own  # another run with other settings is writing the plain name
            lock, holder = _lock(chosen, key)
    except OSError as e:
        raise RecipeError(
            f"bench.results_dir: cannot write to {stem.parent} ({e.strerror}); "
            "give a writable bench.results_dir=DIR"
        ) from e
    if holder is not None:
        raise RecipeError(
            f"the same run is already writing {chosen}.* ({lock.name}); wait for it to finish "
            "or give another bench.results_dir=DIR"
        )
    try:
        yield Destination(chosen, stem if chosen != stem else None)
    finally:
        lock.unlink(missing_ok=True)
