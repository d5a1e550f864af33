"""The recipe entry point: `python recipes/<name>/run.py +opt=flash_attn,int8 key=value ...`.

Plain Hydra rejects `+opt=a,b` outside --multirun, so the comma form is rewritten to the list
form `+opt=[a,b]` first (not under -m, where commas are sweeps). The command line is composed
once up front so that an unknown opt, group option or key is one clear line, exit code 2,
before any model is built.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path
from typing import Any

from common.core.errors import RecipeError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
_OPT_COMMA = re.compile(r"^(\+{0,2}opt)=([^\[\]'\"]+,[^\[\]'\"]+)$")
_MULTIRUN = {"-m", "--multirun"}


def rewrite_opt_args(argv: list[str]) -> list[str]:
    if _MULTIRUN & set(argv):
        return argv
    return [_OPT_COMMA.sub(r"\1=[\2]", a) for a in argv]


def _choices(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))


def _explain(e: Exception, config_name: str) -> str:
    msg = str(e)
    # Hydra says "Could not find 'opt/x'" for a single choice, "Could not load" inside a list.
    if m := re.search(r"Could not (?:load|find) '(\w+)/([^']+)'", msg):
        group, name = m.groups()
        return f"unknown {group} {name!r}; available: {_choices(group)}"
    if m := re.search(r"Could not override '([^']+)'", msg):
        return f"unknown config key {m.group(1)!r} (to add a new key use +{m.group(1)}=...)"
    if m := re.search(r"Could not append to config. An item is already at '([^']+)'", msg):
        return f"config key {m.group(1)!r} already exists; override it without '+'"
    return msg.strip().splitlines()[0]


def _user_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-") and "=" in a]


def validate(config_name: str, argv: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [a for a in _user_overrides(argv) if not a.startswith("hydra")]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name, overrides=overrides)
    except Exception as e:
        raise RecipeError(_explain(e, config_name)) from e
    if missing := sorted(OmegaConf.missing_keys(cfg)):
        raise RecipeError(
            f"{', '.join(missing)} must be set, e.g. {missing[0]}=... on the command line"
        )
    return cfg


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_recipe(config_name: str, model_cls: type) -> None:
    """Parse the command line with Hydra and run the benchmark (or one worker)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from common.bench.orchestrate import run_main
    from common.bench.report import set_command_line
    from common.bench.worker import run_worker

    set_command_line(sys.argv)  # results record the command as typed, not as rewritten
    argv = rewrite_opt_args(sys.argv[1:])
    try:
        if not _MULTIRUN & set(argv):
            validate(config_name, argv)
    except RecipeError as e:
        fail(str(e))
    sys.argv = [sys.argv[0], *argv]

    def main(cfg: Any) -> None:
        overrides = [
            o for o in HydraConfig.get().overrides.task if not re.match(r"^\+{0,2}opt=", o)
        ]
        try:
            if cfg.bench.role == "worker":
                run_worker(cfg, model_cls)
            else:
                run_main(cfg, model_cls, overrides)
        except RecipeError as e:
            fail(str(e))
        except Exception as e:
            if cfg.bench.role != "worker":
                raise
            # The orchestrator reports a worker's last stderr line: make it name the error.
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            fail(f"internal error in the worker: {type(e).__name__}: {first}")

    hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)(main)()
