"""Where a decode step's time goes, per variant: kernel calls per step, step time and tok/s,
time inside ops vs outside them (Python and dispatch overhead), and the ops by time.

    python scripts/decode_profile.py [--recipe llama65b] [--steps 32] \
        [--variants "baseline;fuse;compile;fuse,compile"] [key=value ...]

Each variant runs in a fresh process, built as the recipe's worker builds it (the recipe's
config, the variant's +opt=..., the given overrides such as model.scale=small or
model.path=...), on the workload's first prompt, `workload.batch_size` copies of it at once
(default 1; e.g. workload.batch_size=16 for a batched decode step). One warm-up generation (it
compiles, for compile), then `--steps` decode steps timed without the profiler (step ms and
tok/s), then the same steps under torch.profiler (CPU):

- kernel calls: the ops the step's code calls itself (Python when eager, the generated
  wrapper when compiled), views excluded; the C++ kernels are torch ops named llm_recipes::*,
  inductor's generated kernels show by their names.
- time in ops: those calls' inclusive CPU time; outside ops = profiled step time minus it:
  the Python and dispatch overhead a compiled step removes. The profiler adds ~1-2 us per
  op to both, so the unprofiled step time is the one to quote.

Writes results/<recipe>/cpu/decode_profile.{md,json} (or --out) atomically.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = (
    "baseline;fuse;compile;fuse,compile;fuse,fast_linear;fuse,fast_linear,compile;"
    "flash_attn,int8;flash_attn,int8,fuse,compile"
)
MODELS = {"llama65b": "models.llama:LlamaForCausalLM", "chatglm": "models.glm:GlmForCausalLM"}
# Ops that only make views or metadata: not kernel calls.
VIEWS = {
    "aten::view", "aten::reshape", "aten::transpose", "aten::t", "aten::unsqueeze",
    "aten::squeeze", "aten::expand", "aten::slice", "aten::select", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::as_strided",
    "aten::_unsafe_view", "aten::permute", "aten::detach", "aten::alias", "aten::empty",
    "aten::empty_strided", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::contiguous", "aten::flatten", "aten::unbind", "aten::view_as",
}  # fmt: skip
# Ranges that hold the step's calls without being calls themselves; dynamo's guard check is
# overhead of the compiled step, so it counts outside ops.
WRAPPERS = (
    "decode_step", "Torch-Compiled Region", "## Call CompiledFxGraph", "CompiledFunction",
    "TorchDynamo Cache Lookup",
)  # fmt: skip


def _is_wrapper(name: str) -> bool:
    return name.startswith(WRAPPERS) or name.startswith("##")


def _top_level(events) -> list:
    """Events under a decode_step whose ancestors below it are only wrappers (the calls the
    step's own code makes)."""
    out = []
    for e in events:
        if _is_wrapper(e.name):
            continue
        p, inside = e.cpu_parent, False
        while p is not None and _is_wrapper(p.name):
            if p.name == "decode_step":
                inside = True
                break
            p = p.cpu_parent
        if inside:
            out.append(e)
    return out


def _cfg(recipe: str, opts: list[str], overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from common.core.config import CONFIG_DIR

    extra = [f"+opt=[{','.join(opts)}]"] if opts else []
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose(recipe, overrides=[*overrides, *extra])


def profile_one(recipe: str, opts: list[str], overrides: list[str], steps: int) -> dict:
    """One variant in this process."""
    import importlib

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from common import ops
    from common.bench.runners import scheduler_config
    from common.bench.worker import kv_spec, pinned_kernels
    from common.bench.workload import build_requests
    from common.core.request import Request
    from common.device.select import resolve_dtype, select_device
    from common.engine.engine import Engine
    from common.io.presets import build_model
    from common.transforms.registry import apply_transforms

    cfg = _cfg(recipe, opts, overrides)
    module, name = MODELS[recipe].split(":")
    model_cls = getattr(importlib.import_module(module), name)
    if cfg.bench.threads:
        torch.set_num_threads(int(cfg.bench.threads))
    ops.pin(pinned_kernels(cfg))
    if cfg.compile.enabled:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # generated kernels show by name
    device = select_device(cfg.hardware.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model, tokenizer, desc = build_model(cfg.model, model_cls, device.torch, dtype)
    prompt = build_requests(cfg.workload, model.args.vocab_size, tokenizer)[0].prompt
    model = apply_transforms(model, cfg)
    engine = Engine(model, device, kv_spec(cfg), cfg.attention.backend,
                    scheduler_config(cfg.scheduler), tokenizer)  # fmt: skip
    times: list[float] = []
    execute = engine.runner.execute

    def timed(plan, gen, *args, **kwargs):  # one range and one time per decode step
        if not all(e.decode for e in plan.seqs):
            return execute(plan, gen, *args, **kwargs)
        t0 = time.perf_counter()
        with record_function("decode_step"):
            out = execute(plan, gen, *args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out

    batch = [Request(prompt, steps + 1, ignore_eos=True)] * cfg.workload.batch_size
    engine.generate(batch)  # warm-up: compiles, measures kernel choices
    times.clear()
    engine.runner.execute = timed
    engine.generate(batch)
    step_s = statistics.median(times)
    times.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(batch)
    profiled_s = sum(times) / len(times)
    top = _top_level(prof.events())
    n = len(times)
    calls, views, per_op_us = Counter(), 0, defaultdict(float)
    for e in top:
        if e.name in VIEWS:
            views += 1
            continue
        calls[e.name] += 1
        per_op_us[e.name] += e.cpu_time_total
    in_ops_s = sum(per_op_us.values()) / n / 1e6
    return {
        "variant": "+".join(opts) or "baseline",
        "model": f"{cfg.model.name}, {desc}, {str(dtype).removeprefix('torch.')}",
        "kernel_calls": sum(calls.values()) / n,
        "view_calls": views / n,
        "step_ms": step_s * 1e3,
        "tokens_per_s": len(batch) / step_s,
        "batch": len(batch),
        "profiled_step_ms": profiled_s * 1e3,
        "in_ops_ms": in_ops_s * 1e3,
        "outside_ops_ms": (profiled_s - in_ops_s) * 1e3,
        "ops": {
            k: {"calls": calls[k] / n, "ms": per_op_us[k] / n / 1e3}
            for k in sorted(per_op_us, key=per_op_us.get, reverse=True)
        },
        "kernels": ops.chosen(),
        "threads": torch.get_num_threads(),
    }


def markdown(result: dict, top: int) -> str:
    rows = result["rows"]
    lines = [
        "# Where the decode step's time goes",
        "",
        f"- command: `{result['command']}`",
        f"- model: {rows[0]['model']}; batch {rows[0]['batch']}, {result['steps']} "
        "decode steps after the "
        f"prompt; {rows[0]['threads']} threads, torch {result['torch']}, {result['cpu']}",
        "- kernel calls: ops the step's own code calls (views excluded); time in ops: their "
        "inclusive CPU time under torch.profiler; outside ops: the profiled step minus that "
        "(Python and dispatch overhead); step ms and tok/s: the same steps without the profiler",
        "",
        "| variant | kernel calls / step | views / step | step ms | tok/s | profiled step ms "
        "| in ops ms | outside ops ms | outside share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['variant']} | {r['kernel_calls']:.0f} | {r['view_calls']:.0f} | "
            f"{r['step_ms']:.2f} | {r['tokens_per_s']:.1f} | {r['profiled_step_ms']:.2f} | "
            f"{r['in_ops_ms']:.2f} | {r['outside_ops_ms']:.2f} | "
            f"{r['outside_ops_ms'] / r['profiled_step_ms']:.0%} |"
            for r in rows
        ),
        "",
    ]
    for r in rows:
        lines += [
            f"## {r['variant']}: the {top} ops with the most time per step",
            "",
            "| op | calls / step | ms / step | share of step |",
            "|---|---:|---:|---:|",
            *(
                f"| {name} | {o['calls']:.0f} | {o['ms']:.3f} | "
                f"{o['ms'] / r['profiled_step_ms']:.0%} |"
                for name, o in list(r["ops"].items())[:top]
            ),
            f"| (outside ops) | | {r['outside_ops_ms']:.3f} | "
            f"{r['outside_ops_ms'] / r['profiled_step_ms']:.0%} |",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="llama65b", choices=sorted(MODELS))
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated opt lists")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a worker: one variant
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="recipe config overrides, e.g. model.scale=small")
    args = p.parse_args()
    if args.one is not None:
        opts = [o for o in args.one.split(",") if o and o != "baseline"]
        row = profile_one(args.recipe, opts, args.overrides, args.steps)
        args.worker_out.write_text(json.dumps(row))
        return

    import torch
    from tqdm import tqdm

    from common.bench.report import command_line, write_table
    from common.device.probe import cpu_info

    rows = []
    for variant in tqdm(args.variants.split(";"), desc="variants"):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, "--recipe", args.recipe, "--steps", str(args.steps),
                   "--one", variant, "--worker-out", out.name, *args.overrides]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"error: variant {variant!r} failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(Path(out.name).read_text()))
    result = {
        "command": command_line(),
        "steps": args.steps,
        "torch": torch.__version__,
        "cpu": cpu_info(),
        "rows": rows,
    }
    md = markdown(result, args.top)
    print(md)
    write_table(args.out or ROOT / f"results/{args.recipe}/cpu/decode_profile", result, md)


if __name__ == "__main__":
    main()
