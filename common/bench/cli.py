"""The recipe entry point: `python recipes/<name>/run.py +opt=flash_attn,int8 key=value ...`.

Plain Hydra rejects `+opt=a,b` outside --multirun, so the comma form is rewritten to the list
form `+opt=[a,b]` first (not under -m, where commas are sweeps). The command line is composed
once up front so that an unknown opt, group option or key is one clear line, exit code 2,
before any model is built; the composed config's values are checked by the preflight.
"""

from __future__ import annotations

import re
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import takewhile
from pathlib import Path
from typing import Any

from common.core.config import CONFIG_DIR, models_for
from common.core.errors import RecipeError

_OPT_ARG = re.compile(r"^(\+{0,2}opt)=(.*)$")
_MULTIRUN = {"-m", "--multirun"}
_HELP = {"-h", "--help"}
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number


def _opt_names(arg: str) -> tuple[str, list[str]] | None:
    """`+opt=a,b` -> ("+opt", [a, b]); None for other args and for Hydra's own list syntax."""
    m = _OPT_ARG.match(arg)
    if not m or any(c in m.group(2) for c in "[]'\""):
        return None
    prefix, value = m.groups()
    names = value.split(",")
    if not all(n.strip() for n in names):
        valid = f"{prefix}={','.join(n for n in names if n.strip()) or 'flash_attn,int8'}"
        raise RecipeError(
            f"{arg!r} has an empty opt name; give names separated by single commas: {valid}"
        )
    return prefix, names


def rewrite_opt_args(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        parsed = _opt_names(arg)
        if parsed and len(parsed[1]) > 1 and not _MULTIRUN & set(argv):
            arg = f"{parsed[0]}=[{','.join(parsed[1])}]"
        out.append(arg)
    return out


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _check_group_choices(overrides: list[str]) -> None:
    """A config group's option that has no yaml file, named with the group's choices."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            (o,) = parser.parse_overrides([arg])
        except OverrideParseException as e:
            raise RecipeError(f"cannot parse {arg!r}: {e.message.splitlines()[0]}") from e
        group = o.key_or_group
        if o.is_delete() or o.package is not None or not (CONFIG_DIR / group).is_dir():
            continue  # a key, not a group
        value = o.value()
        for name in value if isinstance(value, list) else [value]:
            if name not in _choices(group):
                raise RecipeError(
                    f"unknown {group} {name!r}; available: {', '.join(_choices(group))}"
                )


def _explain(e: Exception) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = e.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        key = cause.full_key
        return f"unknown config key {key!r} (to add a new key use +{key}=...)"
    return str(e).strip().splitlines()[0]


def _user_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-") and "=" in a and not a.startswith("hydra")]


def compose_config(config_name: str, argv: list[str]) -> Any:
    """The config Hydra will build from this command line (no -m), or one clear RecipeError."""
    from hydra import compose, initialize_config_dir

    overrides = _user_overrides(argv)
    _check_group_choices(overrides)
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            return compose(config_name, overrides=overrides)
    except Exception as e:
        raise RecipeError(_explain(e)) from e


def _summary(path: Path) -> str:
    """A config file's leading comment (after Hydra's `# @package`), as one line."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
    comment = [ln.lstrip("# ").strip() for ln in takewhile(lambda ln: ln.startswith("#"), lines)]
    return " ".join(comment)


def usage(config_name: str, *model_classes: type) -> str:
    def entries(group: str) -> list[str]:
        return [f"  {p.stem:<15}{_summary(p)}" for p in sorted((CONFIG_DIR / group).glob("*.yaml"))]

    models = [m for cls in model_classes for m in models_for(cls.hf_class_name)]
    script = f"recipes/{config_name}/run.py"
    return "\n".join(
        [
            f"usage: python {script} [+opt=a,b,...] [key=value ...] [-m key=v1,v2 ...]",
            "",
            "Runs the unoptimized baseline and the opts you name, each variant in a fresh",
            "process, and prints one table (written to bench.results_dir as json, md and png).",
            "",
            "opts (+opt=a,b: all together; bench.ladder=true: cumulatively; bench.each=true: alone):",
            *entries("opt"),
            "",
            "workloads (workload=NAME):",
            *entries("workload"),
            "",
            f"models (model=NAME): {', '.join(models)}",
            f"hardware (hardware=NAME): {', '.join(_choices('hardware'))}",
            "",
            "main keys:",
            "  model.scale=tiny|small|full   model.path=DIR (a Hugging Face checkpoint)",
            "  model.dtype=auto|bfloat16|float16|float32",
            "  workload.batch_size=N   workload.max_new_tokens=N   workload.path=FILE.jsonl",
            "  bench.variants=[[a],[a,b]]   bench.peers=[hf]   bench.results_dir=DIR",
            "  bench.rounds=N   bench.warmup=N   bench.repeats=N   bench.threads=N",
            "  generation.do_sample=true generation.top_p=0.9 ... (transformers' names)",
            "",
            f"Every key with its default: python {script} --cfg job",
            "Hydra's own options: --hydra-help",
        ]
    )


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds the stack so every `finally` (workers, temp files) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGINT/SIGTERM: one line, and the shell's exit code (130/143) once cleanup has run."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in EXIT_SIGNAL}
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(
            f"interrupted ({signal.Signals(signum).name}): the current run wrote no results",
            file=sys.stderr,
        )
        sys.exit(EXIT_SIGNAL[signum])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_recipe(config_name: str, *model_classes: type) -> None:
    """Parse the command line with Hydra and run the benchmark (or one worker). A recipe may
    run several architectures: model.architecture picks the class."""
    import hydra

    from common.bench.auto_parallel import resolve_auto_tp
    from common.bench.orchestrate import run_main
    from common.bench.report import set_command_line
    from common.bench.worker import run_worker

    typed_argv = sys.argv
    if _HELP & set(typed_argv[1:]):
        print(usage(config_name, *model_classes))
        return
    set_command_line(typed_argv)  # results record the command as typed, not as rewritten
    try:
        argv = rewrite_opt_args(typed_argv[1:])
        if not _MULTIRUN & set(argv):
            compose_config(config_name, argv)
    except RecipeError as e:
        fail(str(e))
    sys.argv = [typed_argv[0], *argv]

    def main(cfg: Any) -> None:
        archs = {cls.hf_class_name: cls for cls in model_classes}
        model_cls = archs.get(cfg.model.architecture, model_classes[0])  # else preflight says
        try:
            resolve_auto_tp(cfg, model_cls)  # parallel.tp=auto: the planner's choice, everywhere
            if cfg.bench.role == "worker":
                run_worker(cfg, model_cls)
            else:
                run_main(cfg, model_cls)
        except RecipeError as e:
            fail(str(e))
        except Exception as e:
            if cfg.bench.role != "worker":
                raise
            # The orchestrator reports a worker's last stderr line: make it name the error.
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            fail(f"internal error in the worker: {type(e).__name__}: {first}")

    with exit_on_signals():
        hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)(main)()
