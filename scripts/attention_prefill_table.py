"""Prefill attention, eager vs fused (`flash_attn`): time and the extra memory each needs.

    python scripts/attention_prefill_table.py [--scale small] [--lengths 512 1024 2048 4096]

One causal self-attention of the LLaMA preset's dims (all query heads, one layer, batch 1)
at each prompt length, through the recipe's own backends: `eager` (the baseline: it
materializes the [heads, T, T] score matrix) and `flash` (what +opt=flash_attn selects:
SDPA for prefill). Each (backend, length) runs in a fresh process, so its peak memory is
its own: extra memory = peak after the calls - peak before (on CPU the process's peak RSS,
on accelerators the peak allocation). Rounds interleave the backends; median (min–max) of
the timed calls over all rounds. Writes results/llama65b/<device>/attention_prefill.{md,json}
atomically.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from common.attention.backends import get_backend  # noqa: E402
from common.attention.meta import AttnMeta  # noqa: E402
from common.bench.report import command_line, write_table  # noqa: E402
from common.device.probe import cpu_info  # noqa: E402
from common.device.select import resolve_dtype, select_device  # noqa: E402
from common.io.presets import preset_args  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402

BACKENDS = {"eager": "eager (baseline)", "flash": "fused (flash_attn: SDPA)"}


def measure_one(backend: str, length: int, scale: str, device_name: str, dtype_name: str,
                repeats: int) -> dict:  # fmt: skip
    """In this process: calls at 8 tokens (one-time library set-up), one warm-up call at full
    length (its peak is the memory figure), two more untimed, then the timed calls."""
    device = select_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    a = preset_args(_model_cfg(scale), LlamaForCausalLM)
    gen = torch.Generator().manual_seed(0)
    shape = (1, a.num_attention_heads, length, a.kv_head_dim)
    kv_shape = (1, a.num_key_value_heads, length, a.kv_head_dim)
    q, k, v = (
        torch.randn(s, generator=gen).to(device.torch, dtype) for s in (shape, kv_shape, kv_shape)
    )
    attend = get_backend(backend, device)
    meta = AttnMeta(causal=True)
    for _ in range(5):  # one-time library and thread-pool set-up: neither its time nor memory
        attend(*(x[:, :, :8] for x in (q, k, v)), meta)
    device.reset_peak_memory()
    before = device.peak_memory_bytes()
    attend(q, k, v, meta)
    device.synchronize()
    extra = device.peak_memory_bytes() - before
    for _ in range(2):  # kernels pick and warm per shape on their first calls
        attend(q, k, v, meta)
    times = []
    for _ in range(repeats):
        device.synchronize()
        t0 = time.perf_counter()
        attend(q, k, v, meta)
        device.synchronize()
        times.append(time.perf_counter() - t0)
    return {"extra_bytes": extra, "times_s": times, "heads": a.num_attention_heads,
            "kv_heads": a.num_key_value_heads, "head_dim": a.kv_head_dim,
            "dtype": str(dtype).removeprefix("torch."), "device": device.describe(),
            "device_type": device.type}  # fmt: skip


def _model_cfg(scale: str):
    mcfg = OmegaConf.load(ROOT / "configs/model/llama65b.yaml")
    mcfg.scale = scale
    return mcfg


def _spawn(args: argparse.Namespace, backend: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, str(length), "--scale", args.scale,
           "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        sys.exit(f"error: {backend} attention at {length} tokens failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="small")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", nargs=2, metavar=("BACKEND", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        backend, length = args.worker
        result = measure_one(
            backend, int(length), args.scale, args.device, args.dtype, args.repeats
        )
        print(json.dumps(result))
        return

    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both alike
        for length in args.lengths:
            for backend in BACKENDS:
                runs.setdefault((backend, length), []).append(_spawn(args, backend, length))
    first = next(iter(runs.values()))[0]
    out = args.out or ROOT / f"results/llama65b/{first['device_type']}/attention_prefill"
    rows = []
    for length in args.lengths:
        for backend, label in BACKENDS.items():
            done = runs[(backend, length)]
            times = [1e3 * t for r in done for t in r["times_s"]]
            rows.append({"tokens": length, "backend": backend, "label": label,
                         "ms": statistics.median(times), "ms_min": min(times),
                         "ms_max": max(times),
                         "extra_bytes": statistics.median(r["extra_bytes"] for r in done)})  # fmt: skip
    eager_ms = {r["tokens"]: r["ms"] for r in rows if r["backend"] == "eager"}
    for r in rows:
        r["vs_eager"] = eager_ms[r["tokens"]] / r["ms"]
    lines = [
        "# Prefill attention: eager vs fused",
        "",
        f"- command: `{command_line()}`",
        f"- hardware: {first['device']} on {cpu_info()}, torch {torch.__version__}",
        f"- one causal self-attention of the llama-65b {args.scale} preset ({first['heads']} "
        f"query heads, {first['kv_heads']} KV heads, head_dim {first['head_dim']}), batch 1, "
        f"{first['dtype']}; the recipe's `eager` and `flash` backends",
        f"- {args.rounds} rounds, each backend and length in a fresh process: 3 warm-up calls, "
        f"then {args.repeats} timed; median (min–max) over all timed calls",
        "- extra memory: the process's peak during the first full-length call minus its peak "
        "before it "
        "(peak RSS on CPU; median over rounds)",
        "",
        "| prompt tokens | attention | ms | extra memory | speedup vs eager |",
        "|---:|---|---|---:|---:|",
        *(
            f"| {r['tokens']} | {r['label']} | {r['ms']:.1f} ({r['ms_min']:.1f}–{r['ms_max']:.1f}) "
            f"| {_mib(r['extra_bytes'])} | {r['vs_eager']:.2f}× |"
            for r in rows
        ),
        "",
    ]
    print("\n".join(lines))
    result = {"command": command_line(), "cpu": cpu_info(), "scale": args.scale, **first,
              "rows": rows}  # fmt: skip
    result.pop("times_s")
    result.pop("extra_bytes")
    write_table(out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
