"""Result tables: printed with rich, written atomically as json + md + png."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from common.bench.plan import workload_desc
from common.device.probe import cpu_info

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = [  # (key, header, format)
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("tpot_ms", "TPOT ms", "{:.2f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("tokens_per_s", "output tok/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}×"),
    # workloads with encoded content (images): encoder time per item in the workload, the
    # feature cache's hit rate, encoder time hidden behind the LM, TTFT split by whether
    # the request's content appeared in an earlier request
    ("encode_ms_per_item", "encode ms/item", "{:.1f}"),
    ("encoder_cache_hit_pct", "encoder cache hits", "{:.0f}%"),
    ("encode_hidden_pct", "encode hidden", "{:.0f}%"),
    ("ttft_seen_ms", "TTFT seen-content ms", "{:.1f}"),
    ("ttft_new_ms", "TTFT new-content ms", "{:.1f}"),
    ("weight_bytes", "weights MB", "mb"),
    ("kv_bytes", "KV MB", "mb"),
    ("peak_mem_bytes", "peak MB", "mb"),
    ("token_agreement", "token agree", "{:.3f}"),
    ("max_logit_err", "max logit err", "{:.3g}"),
    ("perplexity", "perplexity", "{:.3f}"),  # held-out text (eval.*), real weights
    ("perplexity_change", "ppl vs baseline", "{:+.2%}"),
    ("roofline_pct", "% roofline", "{:.0f}%"),
    ("compile_s", "compile s", "{:.1f}"),  # in the warm-up pass, so never in TPOT
    ("spec_accept_pct", "draft accept", "{:.0f}%"),  # speculative decoding only
    ("spec_tokens_per_step", "tokens/verify", "{:.2f}"),
]
# Second table: scheduling and KV memory (throughput, online and KV-cache runs).
SERVING_COLUMNS = [
    ("same_outputs", "same outputs", "{:.0%}"),  # requests whose tokens equal the baseline's
    ("same_as_alone", "same as alone", "{:.0%}"),  # bench.check_alone
    ("requests_per_s", "req/s", "{:.2f}"),
    ("ttft_p90_ms", "TTFT p90 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("tpot_p90_ms", "TPOT p90 ms", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
    ("goodput_rps", "goodput req/s", "{:.2f}"),
    ("idle_pct", "idle decode slots", "{:.0f}%"),
    ("preemptions", "preemptions", "{:.0f}"),
    ("kv_reserved_bytes", "KV reserved MB (avg)", "mb"),
    ("kv_used_bytes", "KV used MB (avg)", "mb"),
    ("kv_waste_pct", "KV waste", "{:.1f}%"),
    ("max_concurrent_contiguous", "seqs in budget: contiguous", "{:.0f}"),
    ("max_concurrent_paged", "seqs in budget: paged", "{:.0f}"),
]
SPREAD = {"ttft_ms", "tpot_ms", "decode_tokens_per_s", "tokens_per_s"}


def git_revision(root: Path = ROOT) -> str | None:
    """HEAD, with +dirty when tracked or new files outside results/ differ from it: results
    regenerated from a committed tree are not dirty because earlier results were rewritten."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, cwd=root,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":(exclude)results"],
            capture_output=True, text=True, check=True, cwd=root,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if changed.strip() else "")


def environment(device_desc: str, threads: int) -> dict[str, Any]:
    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "torch_npu": version("torch_npu"),
        "device": device_desc,
        "cpu": cpu_info(),
        "threads": threads,
        "platform": platform.platform(),
        "git_revision": git_revision(),
    }


def _cell(variant: dict, key: str, fmt: str) -> str:
    value = {**variant["metrics"], **variant["fidelity"]}.get(key)
    if value is None or value != value:  # missing or NaN
        return "–"
    text = f"{value / 1e6:.1f}" if fmt == "mb" else fmt.format(value)
    if key in SPREAD and key in variant.get("spread", {}):
        lo, hi = variant["spread"][key]
        text += f" ({fmt.format(lo)}–{fmt.format(hi)})"
    return text


def rows(result: dict, columns: list = COLUMNS) -> tuple[list[str], list[list[str]]]:
    columns = [
        c
        for c in columns
        if any(c[0] in {**v["metrics"], **v["fidelity"]} for v in result["variants"])
    ]
    header = ["variant", *(h for _, h, _ in columns)]
    return header, [
        [v["name"], *(_cell(v, k, f) for k, _, f in columns)] for v in result["variants"]
    ]


def serving_table(result: dict) -> bool:
    """Serving workloads, or any row on paged KV (whose reserved/used bytes differ)."""
    return result["workload"]["kind"] in ("throughput", "online", "shared_prefix") or any(
        v.get("kv_kind") == "paged" for v in result["variants"]
    )


def truncation_lines(result: dict) -> list[str]:
    """Requests whose output the model's max positions cut short of max_new_tokens."""
    cut = [f"{v['name']} {v['metrics']['truncated']:.0f}" for v in result["variants"]
           if v["metrics"].get("truncated")]  # fmt: skip
    if not cut:
        return []
    return [f"- warning: requests stopped at the model's max positions before max_new_tokens: "
            f"{', '.join(cut)}"]  # fmt: skip


def _kernel_summary(kernels: dict[str, str]) -> str:
    """ "op impl (rows buckets)" per op: device and dtype are in the hardware and model lines;
    the full labels (with size classes) stay in the JSON."""
    by_op: dict[str, dict[str, list[str]]] = {}
    for label, impls in kernels.items():
        op, _, inside = label.partition("[")
        rows = next(
            (p.removeprefix("rows=") for p in inside.split(",") if p.startswith("rows=")), ""
        )
        for impl in impls.split(", "):
            buckets = by_op.setdefault(op, {}).setdefault(impl, [])
            if rows not in buckets:
                buckets.append(rows)

    def rows_of(buckets: list[str]) -> str:
        return (
            " (rows "
            + " ".join(sorted(buckets, key=lambda b: int(b.split("-")[0].rstrip("+"))))
            + ")"
        )

    return "; ".join(
        f"{op} "
        + ", ".join(impl + (rows_of(b) if len(impls) > 1 else "") for impl, b in impls.items())
        for op, impls in sorted(by_op.items())
    )


def kernel_lines(result: dict) -> list[str]:
    """Which implementation each op ran (chosen by measurement on this machine, or pinned),
    one line per distinct set, naming the rows that ran it."""
    rows: dict[str, list[str]] = {}
    for v in result["variants"]:
        if v.get("kernels"):
            rows.setdefault(_kernel_summary(v["kernels"]), []).append(v["name"])
    lines = [f"  - {', '.join(names)}: {summary}" for summary, names in rows.items()]
    return (
        ["- kernels (chosen by measurement on this machine unless pinned):", *lines]
        if lines
        else []
    )


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    tables = [(describe_workload(result), COLUMNS)]
    if serving_table(result):
        tables.append(("scheduling and KV memory", SERVING_COLUMNS))
    for title, columns in tables:
        header, body = rows(result, columns)
        table = Table(title=f"{result['recipe']} · {result['hardware']} · {title}")
        for h in header:
            table.add_column(h, justify="left" if h == "variant" else "right")
        for r in body:
            table.add_row(*r)
        console = Console()
        if not console.is_terminal:  # a pipe or a log: the whole table, not squeezed to 80 columns
            wide = console.options.update(max_width=1000)
            console = Console(
                width=max(console.width, console.measure(table, options=wide).maximum)
            )
        console.print(table)
    for line in truncation_lines(result):
        Console(stderr=True).print(line.removeprefix("- "), markup=False)


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in body),
        "",
    ]


def _on_cpu(env: dict) -> str:
    """The host CPU and its caches (results written before they were recorded lack them)."""
    return f" on {env['cpu']}" if env.get("cpu") else ""


def _read_bandwidth(result: dict) -> str:
    """The probed read bandwidth and its buffer size (a decode step's bytes): a buffer that
    fits a cache reads faster, so the size says which bound the roofline column uses."""
    size = result.get("bandwidth_buffer_bytes")
    if not size:
        return ""
    return f", memory read {result['bandwidth_gbs']:.1f} GB/s over a {size / 1e6:.3g} MB buffer (one decode step)"


def markdown(result: dict) -> str:
    header, body = rows(result)
    env = result["env"]
    lines = [
        f"# {result['recipe']}: {' vs '.join(result['rows'])}",
        "",
        f"- command: `{result['command']}`",
        f"- hardware: {env['device']} ({result['hardware']}){_on_cpu(env)}{_read_bandwidth(result)}, "
        f"torch {env['torch']}, transformers {env['transformers']}, {env['date']}, "
        f"git {env['git_revision']}",
        f"- model: {result['model']}",
        f"- workload: {describe_workload(result)}",
        f"- timing: {result['bench']['rounds']} rounds; in each, every variant runs in turn in a "
        f"fresh process: {result['bench']['warmup']} warm-up + {result['bench']['repeats']} timed "
        "pass(es); median (min–max) over all timed passes",
        f"- speedup: {result['speedup_of']} against the baseline row",
        "- contiguous KV: every sequence reserves "
        + (
            f"kv_cache.max_len = {result['kv_max_len']} slots (max-length allocation)"
            if result.get("kv_max_len")
            else "its batch's longest sequence (kv_cache.max_len unset)"
        ),
        f"- roofline: decode bytes (weights + live KV) / {result['bandwidth_gbs']:.1f} GB/s "
        f"({result['bandwidth_source']})",
        f"- wall time: {result['wall_s']:.0f} s for the whole run, every round and variant "
        "(interpreter start-up excluded)",
        *kernel_lines(result),
        *truncation_lines(result),
        "",
        *_md_table(header, body),
    ]
    if serving_table(result):
        lines += ["Scheduling and KV memory:", "", *_md_table(*rows(result, SERVING_COLUMNS))]
    return "\n".join(lines)


def describe_workload(result: dict) -> str:
    """The workload line; a swept workload key shows the values its rows ran at, not the
    config's single value (which no row ran at)."""
    sweep = result.get("sweep")
    if not sweep or not sweep["key"].startswith("workload."):
        return result["workload_desc"]
    values = [str(v) for v in sweep["values"]]
    swept = " or ".join([", ".join(values[:-1]), values[-1]] if len(values) > 1 else values)
    key = sweep["key"].removeprefix("workload.")
    return workload_desc(OmegaConf.create({**result["workload"], key: f"{swept} (swept)"}))


def _sweep_points(result: dict) -> dict[str, list[tuple[str, dict]]]:
    """Per row name, (swept value, metrics) in sweep order."""
    key = result["sweep"]["key"].split(".")[-1]
    lines: dict[str, list] = {}
    for v in result["variants"]:
        name, _, value = v["name"].partition(f" @ {key}=")
        lines.setdefault(name, []).append((value, v["metrics"]))
    return lines


def plot_sweep(result: dict, path: Path) -> None:
    """Latency vs throughput, one line per variant through the swept values, with the SLO
    drawn; and goodput against the swept value (against the offered rate when it is the rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = result["sweep"]["key"].split(".")[-1]
    lines = _sweep_points(result)
    workload = result["workload"]
    slo = {"ttft_p90_ms": workload.get("slo_ttft_ms"), "tpot_p90_ms": workload.get("slo_tpot_ms")}
    has_goodput = all("goodput_rps" in m for points in lines.values() for _, m in points)
    fig, axes = plt.subplots(1, 3 if has_goodput else 2, figsize=(16 if has_goodput else 11, 4))
    for ax, metric, label in [
        (axes[0], "ttft_p90_ms", "TTFT p90 (ms)"),
        (axes[1], "tpot_p90_ms", "TPOT p90 (ms)"),
    ]:
        for name, points in lines.items():
            xs = [m["tokens_per_s"] for _, m in points]
            ys = [m[metric] for _, m in points]
            ax.plot(xs, ys, marker="o", label=name)
            for (value, _), x, y in zip(points, xs, ys):
                ax.annotate(
                    f"{key}={value}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        if slo[metric]:
            ax.axhline(slo[metric], color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(f"SLO {slo[metric]:g} ms", (0, slo[metric]), xycoords=("axes fraction",
                        "data"), fontsize=7, color="tab:red", xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel("output tok/s")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if has_goodput:
        ax = axes[2]
        labels = [v for v, _ in next(iter(lines.values()))]
        try:
            xs = [float(v) for v in labels]
        except ValueError:  # a swept value that is not a number: evenly spaced
            xs = list(range(len(labels)))
        top = 0.0
        for name, points in lines.items():
            ys = [m["goodput_rps"] for _, m in points]
            ax.plot(xs, ys, marker="o", label=name)
            top = max(top, *ys)
        if key == "rate":  # goodput can at most equal the offered load
            ax.plot(xs, xs, color="gray", linestyle=":", label="offered rate")
            ax.set_xscale("log")
            ax.set_ylim(0, 1.1 * max(top, min(max(xs), 2 * top)))
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
        ax.legend(fontsize=8)
        ax.set_xlabel(result["sweep"]["key"] + (" (req/s)" if key == "rate" else ""))
        ax.set_ylabel("goodput req/s (both SLOs met)")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{result['recipe']} · {result['hardware']} · {describe_workload(result)}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(result: dict, path: Path) -> None:
    if result.get("sweep"):
        return plot_sweep(result, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["name"] for v in result["variants"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(names) + 2))
    for ax, key, label in [
        (axes[0], "decode_tokens_per_s", "decode tok/s (higher is better)"),
        (axes[1], "ttft_ms", "TTFT ms (lower is better)"),
    ]:
        mid = [v["metrics"][key] for v in result["variants"]]
        lo = [m - v["spread"][key][0] for m, v in zip(mid, result["variants"])]
        hi = [v["spread"][key][1] - m for m, v in zip(mid, result["variants"])]
        ax.barh(names, mid, xerr=[lo, hi], color="tab:blue", capsize=3)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.suptitle(
        f"{result['recipe']} · {result['hardware']} · {result['workload_desc']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_table(stem: Path, result: dict, md: str) -> None:
    """A script's table: stem.json (the data) and stem.md (what it printed), atomically."""
    for path, text in ((Path(f"{stem}.json"), json.dumps(result, indent=1) + "\n"),
                       (Path(f"{stem}.md"), md)):  # fmt: skip
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
        print(f"wrote {path}")


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(result: dict, stem: Path) -> list[Path]:
    """stem.json, stem.md, stem.png — each replaced atomically, only after all are rendered."""
    text_json = json.dumps(result, indent=1) + "\n"
    text_md = markdown(result)
    paths = [stem.with_suffix(s) for s in (".json", ".md", ".png")]
    atomic_write(paths[0], lambda p: p.write_text(text_json))
    atomic_write(paths[1], lambda p: p.write_text(text_md))
    atomic_write(paths[2], lambda p: plot(result, p))
    return paths


_TYPED_ARGV: list[str] | None = None


def set_command_line(argv: list[str]) -> None:
    """Remember the command line as the user typed it (the entry point rewrites sys.argv)."""
    global _TYPED_ARGV
    _TYPED_ARGV = list(argv)


def command_line() -> str:
    argv = _TYPED_ARGV or sys.argv
    return " ".join(["python", os.path.relpath(argv[0]), *argv[1:]])
