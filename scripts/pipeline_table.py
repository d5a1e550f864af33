"""Pipeline parallel: throughput and bubble vs micro-batch count, against one device.

    python scripts/pipeline_table.py [--micro 1 2 4 8] [--results-dir DIR] [key=value ...]

Runs the LLaMA recipe twice, as a user would: on one device (parallel.pp=1), then over two
stages (parallel.pp=2, two ranks under torchrun) with a sweep over parallel.micro_batches.
Every run uses the same static batches (workload=throughput, batch 8, EOS ignored) and
greedy decoding; extra key=value arguments go to both runs. The table reads their JSON:
output tok/s and TPOT (median, min–max over rounds), the measured bubble (the share of the
generate span each stage sat idle, averaged over stages), GPipe's bound (p-1)/(M+p-1) for
one forward of M micro-batches over p stages, and whether the outputs equal one device's.
Writes results/llama65b/<hardware>/pipeline.{md,json} atomically.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.bench.report import command_line, write_table  # noqa: E402

RECIPE = ROOT / "recipes/llama65b/run.py"
WORKLOAD = [
    "workload=throughput",
    "workload.num_requests=16",
    "workload.batch_size=8",
    "workload.prompt_len=[64,128]",
    "workload.max_new_tokens=[32,64]",
    "workload.new_tokens_dist=uniform",
]


def run(args: list[str], results: Path) -> dict:
    cmd = [sys.executable, str(RECIPE), *WORKLOAD, *args, f"bench.results_dir={results}"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    (path,) = results.rglob("*.json")
    data = json.loads(path.read_text())
    path.unlink()
    return data


def rows(one: dict, pp: dict, stages: int) -> list[dict]:
    reference = one["variants"][0]["outputs"]
    out = []
    for label, v, p, m in [("1 device", one["variants"][0], 1, 1)] + [
        (f"{stages} stages", v, stages, int(v["name"].rsplit("=", 1)[1])) for v in pp["variants"]
    ]:
        metrics, spread = v["metrics"], v["spread"]
        out.append(
            {
                "layout": label,
                "micro_batches": m,
                "tokens_per_s": metrics["tokens_per_s"],
                "tokens_per_s_range": spread["tokens_per_s"],
                "tpot_ms": metrics["tpot_ms"],
                "bubble_pct": metrics.get("bubble_pct"),
                "gpipe_bound_pct": 100.0 * (p - 1) / (m + p - 1),
                "same_outputs": v["outputs"] == reference,
            }
        )
    return out


def markdown(table: list[dict], env: dict, desc: str) -> str:
    lines = [
        "| layout | micro-batches | output tok/s | TPOT ms | bubble % (measured) | "
        "GPipe bound % | outputs = 1 device |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in table:
        lo, hi = r["tokens_per_s_range"]
        bubble = "" if r["bubble_pct"] is None else f"{r['bubble_pct']:.1f}"
        lines.append(
            f"| {r['layout']} | {r['micro_batches']} | {r['tokens_per_s']:.1f} ({lo:.1f}–{hi:.1f}) "
            f"| {r['tpot_ms']:.1f} | {bubble} | {r['gpipe_bound_pct']:.1f} "
            f"| {'yes' if r['same_outputs'] else 'no'} |"
        )
    return "\n".join(
        [
            f"Pipeline parallel ({desc}); {env.get('device', '')}, {env.get('cpu', '')}.",
            "",
            *lines,
            "",
            f"Command: `{command_line()}`",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results")
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run([*overrides, "parallel.pp=1"], Path(tmp))
        sweep = f"bench.sweep={{key: parallel.micro_batches, values: {args.micro}}}"
        pp = run([*overrides, f"parallel.pp={args.stages}", sweep], Path(tmp))
    table = rows(one, pp, args.stages)
    hardware = one["hardware"]
    result = {"command": command_line(), "workload": one["workload_desc"], "model": one["model"],
              "env": one["env"], "rows": table}  # fmt: skip
    stem = args.results_dir / "llama65b" / hardware / "pipeline"
    md = markdown(table, one["env"], f"{one['model']}; {one['workload_desc']}")
    print(md)
    write_table(stem, result, md)


if __name__ == "__main__":
    main()
