"""The planner's predictions against measured runs on this machine (CPU ranks over gloo).

    python scripts/plan_validate.py [--tp 1 2] [--pp 1 2] [--batches 1 4 16] [--rounds 2]

Each (TP, PP, batch) runs as an ordinary recipe run,
`python recipes/llama65b/run.py model.scale=small workload=latency workload.num_prompts=B
workload.batch_size=B parallel.tp=T parallel.pp=P ...`, into a temporary results dir,
and its JSON gives the measured TTFT, TPOT and output tok/s. Next to it the simulation
(common/parallel/simulate.py) predicts the same for this machine, calibrated by measurement,
never a constant:
- bandwidth and FLOP/s: common/parallel/calibrate.py times the model's own matmuls (one
  rank's shard of its stage's decode step, in order) with T x P processes at once, each
  with cores / (T x P) threads (the slowest rank's figures; FLOP/s at the prefill's rows),
  and the link's bandwidth from a large all-reduce, right before each round's runs;
- the overhead per layer, collectives' latency included: the same recipe run, under the same
  layout, with the model narrowed to width 64 (same layers, vocabulary, runtime and
  collectives; its math is negligible) at each batch: what its TPOT (decode) and TTFT
  (prefill) leave beyond the simulation of the narrowed model with no overhead and no link
  latency. The calibration's own latency reading (all-reduces between matmul slices) is
  reported but not used: it moved 3x between runs on one machine, while the narrowed run
  times the real calls.
Each (layout, batch) takes --rounds rounds of calibration, narrowed run and measured run (one
timed pass each), in that order; predictions and measurements are the medians over rounds.
Keys the runtime does not have yet (parallel.tp, parallel.pp) are skipped with a note.
Writes results/planning/validate.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.device.probe import cpu_info  # noqa: E402
from common.device.select import resolve_dtype, select_device  # noqa: E402
from common.nn.causal_lm import ModelArgs  # noqa: E402
from common.parallel.calibrate import calibrate  # noqa: E402
from common.parallel.hardware import Hardware, Link  # noqa: E402
from common.parallel.layout import Layout, shard  # noqa: E402
from common.parallel.simulate import Strategy, Workload, simulate  # noqa: E402
from common.quant.formats import FLOAT  # noqa: E402

RECIPE = "recipes/llama65b/run.py"
NARROW = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 4}  # fmt: skip
METRICS = ("ttft_ms", "tpot_ms", "tokens_per_s")
KV_PASSES = 3  # the baseline's dynamic cache: torch.cat reads and writes the KV, attention reads it


class Round(NamedTuple):
    """One round of a (layout, batch): calibration notes, the narrowed run's overhead per
    layer (s), and the predicted and measured metrics."""

    notes: list[str]
    layer_s: float
    prefill_s: float
    predicted: dict
    measured: dict


def parallel_defaults() -> dict:
    """The recipes' parallel.* defaults (the keys the runtime accepts today)."""
    defaults = OmegaConf.load(ROOT / "configs/recipe_defaults.yaml")
    return dict(defaults.get("parallel") or {})


def model_args(scale: str) -> ModelArgs:
    sys.path.insert(0, str(ROOT / "scripts"))
    from plan import load_model  # noqa: PLC0415  (the planner's model loader)

    return load_model("llama65b", scale).args


def shard_shapes(args: ModelArgs, tp: int) -> list[tuple[int, int]]:
    """[out, in] of one tensor-parallel rank's matmuls in a layer, and the LM head's."""
    s, h, d = shard(args, Layout(tp)), args.hidden_size, args.kv_head_dim
    return [(s.heads * d, h), (s.kv_heads * d, h), (s.kv_heads * d, h), (h, s.heads * d),
            (s.intermediate, h), (s.intermediate, h), (h, s.intermediate), (s.vocab, h)]  # fmt: skip


def run_recipe(overrides: list[str]) -> dict | str:
    """One recipe run into a fresh results dir: the measured metrics of its one variant, or
    the run's last error line if it failed (the other runs still go ahead)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, RECIPE, *overrides, "bench.rounds=1", f"bench.results_dir={out}"]
        print("$", " ".join(cmd[1:]), flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        run = subprocess.run(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(run.stderr)
        if run.returncode:
            return (run.stderr.strip().splitlines() or ["no output"])[-1][:200]
        (path,) = glob.glob(f"{out}/**/*.json", recursive=True)
        return json.loads(Path(path).read_text())["variants"][0]["metrics"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--scale", default="small")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results/planning/validate")
    a = p.parse_args()
    if min(a.tp + a.pp + a.batches) < 1 or min(a.prompt_len, a.output_len, a.rounds) < 1:
        p.error("sizes, lengths and rounds must be >= 1")
    args = model_args(a.scale)
    dtype = resolve_dtype("auto", select_device("cpu"))
    par_defaults = parallel_defaults()
    have = {f"parallel.{k}" for k in par_defaults}
    shm_bytes = int(par_defaults.get("shm_mb", 0) * 2**20)  # as the runs' ranks use
    base = [f"model.scale={a.scale}", "workload=latency", "hardware=auto",
            f"workload.prompt_len={a.prompt_len}", f"workload.max_new_tokens={a.output_len}"]  # fmt: skip
    narrow = [f"model.presets.{a.scale}.{k}={v}" for k, v in NARROW.items()]
    narrow_args = dataclasses.replace(args, **NARROW)
    rows, skipped, calibrations, overhead = [], [], {}, {}
    for tp in a.tp:
        for pp in a.pp:
            keys = [k for k, n in (("parallel.tp", tp), ("parallel.pp", pp)) if n > 1]
            if missing := [k for k in keys if k not in have]:
                skipped.append(f"tp={tp} pp={pp}: the runtime has no {', '.join(missing)} yet")
                continue
            shapes = shard_shapes(args, tp)
            # the matmuls of the last (slowest) stage's decode step: its layers, then the head
            step = shapes[:7] * -(-args.num_hidden_layers // pp) + shapes[7:]
            par = [f"{k}={n}" for k, n in (("parallel.tp", tp), ("parallel.pp", pp)) if n > 1]
            for b in a.batches:
                mb = min(pp, b)
                if pp > 1 and "parallel.micro_batches" in have:
                    par_b = [*par, f"parallel.micro_batches={mb}"]
                else:
                    par_b = par
                run_b = [*base, *par_b, f"workload.num_prompts={b}", f"workload.batch_size={b}"]
                st = Strategy(tp, pp, 1, b, FLOAT, micro_batches=mb)
                work = Workload(b, a.prompt_len, a.output_len)
                rounds: list[Round] = []
                for _ in range(a.rounds):
                    # Calibration, narrowed run and measured run side by side, round after round:
                    # this VM's bandwidth drifts by a third in minutes, so each round's
                    # prediction sees the machine its measurement saw; medians over rounds.
                    hw = calibrate(tp * pp, step, dtype, 0.0, [shapes[:4], shapes[4:7]],
                                   args.hidden_size, rows=a.prompt_len * -(-b // mb),
                                   shm_bytes=shm_bytes)  # fmt: skip
                    hw = dataclasses.replace(  # latency: in the narrowed run's overhead (docstring)
                        hw, intra=Link(hw.intra.bandwidth, 0.0), inter=Link(hw.inter.bandwidth, 0.0)
                    )
                    narrowed, measured = run_recipe([*run_b, *narrow]), run_recipe(run_b)
                    failed = next((m for m in (narrowed, measured) if isinstance(m, str)), None)
                    if failed:
                        skipped.append(f"tp={tp} pp={pp} batch={b}: the run failed: {failed}")
                        break
                    layer_s, prefill_s = layer_overhead(narrow_args, dtype, st, work, hw, narrowed)
                    hw = dataclasses.replace(hw, layer_overhead=layer_s, prefill_overhead=prefill_s)
                    sim = simulate(args, dtype, st, work, hw, kv_passes=KV_PASSES)
                    predicted = {"ttft_ms": 1e3 * sim.ttft, "tpot_ms": 1e3 * sim.tpot,
                                 "tokens_per_s": sim.throughput}  # fmt: skip
                    rounds.append(Round(hw.notes, layer_s, prefill_s, predicted, measured))
                else:
                    key = f"tp{tp} pp{pp} b{b}"
                    calibrations[key] = [note for r in rounds for note in r.notes]
                    overhead[key] = (statistics.median(r.layer_s for r in rounds),
                                     statistics.median(r.prefill_s for r in rounds))  # fmt: skip
                    row = {"tp": tp, "pp": pp, "batch": b}
                    for m in METRICS:  # (predicted, measured), each the median over rounds
                        row[m] = (statistics.median(r.predicted[m] for r in rounds),
                                  statistics.median(r.measured[m] for r in rounds))  # fmt: skip
                    rows.append(row)
    write(a, rows, skipped, calibrations, overhead, dtype)


def layer_overhead(
    narrow_args: ModelArgs, dtype, st: Strategy, w: Workload, hw: Hardware, narrowed: dict
) -> tuple[float, float]:
    """Seconds per layer of a decode and of a prefill forward that the narrowed model's
    measured TPOT and TTFT leave beyond its simulation without overhead."""

    def sim(decode: float, prefill: float):
        hw_o = dataclasses.replace(hw, layer_overhead=decode, prefill_overhead=prefill)
        return simulate(narrow_args, dtype, st, w, hw_o, kv_passes=KV_PASSES)

    decode = _solve(lambda x: sim(x, 0.0).tpot, 1e-3 * narrowed["tpot_ms"])
    prefill = _solve(lambda x: sim(decode, x).ttft, 1e-3 * narrowed["ttft_ms"])
    return decode, prefill


def _solve(f, target: float) -> float:
    """x in [0, 1 s] with f(x) = target, for f rising with x (0 if f(0) is already above it):
    bisection, since the slowest stage, and so the slope, can change with x."""
    lo, hi = 0.0, 1.0
    if f(lo) >= target:
        return 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def _err(pair: tuple[float, float]) -> float:
    predicted, measured = pair
    return 100 * (predicted - measured) / measured


def write(
    a, rows: list[dict], skipped: list[str], calibrations: dict, overhead: dict, dtype
) -> None:
    header = ["TP", "PP", "batch", "TTFT ms pred / meas", "TPOT ms pred / meas", "TPOT err",
              "output tok/s pred / meas", "tok/s err", "within 20%"]  # fmt: skip
    body = []
    for r in rows:
        ok = abs(_err(r["tpot_ms"])) <= 20 and abs(_err(r["tokens_per_s"])) <= 20
        body.append([str(r["tp"]), str(r["pp"]), str(r["batch"]),
                     "{:.0f} / {:.0f}".format(*r["ttft_ms"]), "{:.1f} / {:.1f}".format(*r["tpot_ms"]),
                     f"{_err(r['tpot_ms']):+.0f}%", "{:.1f} / {:.1f}".format(*r["tokens_per_s"]),
                     f"{_err(r['tokens_per_s']):+.0f}%", "yes" if ok else "no"])  # fmt: skip
    notes = [
        f"command: `{command_line()}`",
        f"machine: {cpu_info()}, {os.cpu_count()} cores, {str(dtype).removeprefix('torch.')}",
        f"runs: `{RECIPE} model.scale={a.scale} workload=latency` with num_prompts = batch_size "
        f"= batch, prompt {a.prompt_len}, {a.output_len} new tokens; "
        f"{a.rounds} rounds of calibrate, narrowed run, run (medians) "
        "(baseline opts: dynamic KV cache, eager attention)",
        "predicted: common/parallel/simulate.py with this machine measured "
        "(common/parallel/calibrate.py: the slowest rank's matmul bandwidth, and FLOP/s at the "
        "prefill's rows; its all-reduce latency reported, not used); per-layer overhead of a "
        "decode / a prefill forward, collectives' latency included, from the same runs (same "
        "layout and batch) narrowed to width 64, beyond their simulation without it: "
        + ", ".join(f"{k}: {1e6 * d:.0f} / {1e6 * p:.0f} us" for k, (d, p) in overhead.items()),
        *(f"calibration {k}: {'; '.join(v)}" for k, v in calibrations.items()),
        *(f"skipped {s}" for s in skipped),
        "err = (predicted - measured) / measured; target: TPOT and throughput within 20%",
    ]
    md = "\n".join(["# Planner: predicted vs measured on this machine", "",
                    *(f"- {n}" for n in notes), "", "| " + " | ".join(header) + " |",
                    "|" + "|".join("---" for _ in header) + "|",
                    *("| " + " | ".join(r) + " |" for r in body), ""])  # fmt: skip
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Planner: predicted vs measured")
    for h in header:
        t.add_column(h)
    for r in body:
        t.add_row(*r)
    Console().print(t)
    for s in skipped:
        print("skipped", s)
    write_table(a.out, {"command": command_line(), "cpu": cpu_info(), "rows": rows,
                        "skipped": skipped, "calibration": calibrations,
                        "layer_overhead_s": overhead}, md)  # fmt: skip


if __name__ == "__main__":
    main()
