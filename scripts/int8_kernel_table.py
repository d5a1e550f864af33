"""The decode step's matmuls alone, per int8 kernel: what the dispatch table chooses between.

    python scripts/int8_kernel_table.py [--scale small] [--rounds 15]

One pass runs every weight matrix of the preset once at one row (q/k/v and gate/up stacked,
as the int8 opt does, plus the LM head): the matmuls of one decode step. The weights of all
layers together are larger than the L3 cache, as in a real step, so every pass reads them
from DRAM; timing one matrix in a loop would measure the cache instead. Passes of all
kernels are interleaved; median (min-max) over the rounds. Writes
results/llama65b/cpu/int8_kernels.{md,json} atomically.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.device.probe import measure_read_bandwidth  # noqa: E402
from common.device.select import Device  # noqa: E402
from common.io.presets import preset_args  # noqa: E402
from common.ops.int8_linear import int8_linear  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402


def step_shapes(a) -> list[tuple[int, int]]:
    """(out, in) of every matrix one decode step reads, projections stacked."""
    kv = a.num_key_value_heads * a.kv_head_dim
    layer = [
        (a.num_attention_heads * a.kv_head_dim + 2 * kv, a.hidden_size),
        (a.hidden_size, a.num_attention_heads * a.kv_head_dim),
        (2 * a.intermediate_size, a.hidden_size),
        (a.hidden_size, a.intermediate_size),
    ]
    return layer * a.num_hidden_layers + [(a.vocab_size, a.hidden_size)]


Weights = list[tuple[torch.Tensor, torch.Tensor]]


def step_weights(scale: str) -> tuple[list[tuple[int, int]], list[torch.Tensor], Weights]:
    """One decode step's matrices at the LLaMA recipe's `scale`, seeded: their shapes, bf16
    weights, and int8 weights with per-row scales (random values: timing only)."""
    mcfg = OmegaConf.load(ROOT / "configs/model/llama65b.yaml")
    mcfg.scale = scale
    shapes = step_shapes(preset_args(mcfg, LlamaForCausalLM))
    torch.manual_seed(0)
    bf16 = [torch.randn(n, k, dtype=torch.bfloat16) for n, k in shapes]
    int8 = [
        (torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16))
        for n, k in shapes
    ]
    return shapes, bf16, int8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="small")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=ROOT / "results/llama65b/cpu/int8_kernels")
    args = p.parse_args()
    shapes, bf16, int8 = step_weights(args.scale)
    inputs = {k: torch.randn(1, k, dtype=torch.bfloat16) for _, k in shapes}

    def step(impl: str) -> Callable[[], None]:
        fn = int8_linear.impls[impl].fn  # an implementation of the int8_linear op, by name
        return lambda: [fn(inputs[w.shape[1]], w, s) for w, s in int8]

    kernels: dict[str, tuple[str, Callable[[], None]]] = {
        "bf16 F.linear": ("bf16", lambda: [F.linear(inputs[w.shape[1]], w) for w in bf16]),
        # Labels as in the committed table (registry names: int8pack_mm, cpp_matvec, dequant_mm).
        "int8 torch._weight_int8pack_mm": ("int8", step("int8pack_mm")),
        "int8 C++ int8_matvec_cpp": ("int8", step("cpp_matvec")),
        "int8 dequantize + F.linear": ("int8", step("dequant_mm")),
    }
    nbytes = {
        "bf16": sum(w.numel() * 2 for w in bf16),
        "int8": sum(w.numel() + s.numel() * 2 for w, s in int8),
    }
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _, run in kernels.values():
        run()  # warm-up: builds the C++ kernel, faults in every page
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, (_, run) in kernels.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    stream = measure_read_bandwidth(Device("cpu"), nbytes["bf16"])  # what one decode step reads

    rows = []
    for name, (kind, _) in kernels.items():
        med = statistics.median(times[name])
        rows.append(
            {
                "kernel": name,
                "weights_mb": nbytes[kind] / 1e6,
                "ms": med * 1e3,
                "ms_min": min(times[name]) * 1e3,
                "ms_max": max(times[name]) * 1e3,
                "gb_per_s": nbytes[kind] / med / 1e9,
            }
        )
    base = rows[0]["ms"]
    lines = [
        "# The matmuls of one decode step, per kernel",
        "",
        f"- command: `{command_line()}`",
        f"- {len(shapes)} matrices of the llama-65b {args.scale} preset (q/k/v and gate/up "
        f"stacked, LM head included), one row, bf16 activations; {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}",
        f"- {args.rounds} interleaved rounds, median (min–max); streaming read of a "
        f"{nbytes['bf16'] / 1e6:.0f} MB buffer (the bf16 weights) on this machine: "
        f"{stream / 1e9:.1f} GB/s",
        "",
        "| kernel | weights MB | ms per step | GB/s | vs bf16 |",
        "|---|---:|---|---:|---:|",
        *(
            f"| {r['kernel']} | {r['weights_mb']:.1f} | {r['ms']:.2f} ({r['ms_min']:.2f}–"
            f"{r['ms_max']:.2f}) | {r['gb_per_s']:.1f} | {base / r['ms']:.2f}× |"
            for r in rows
        ),
        "",
    ]
    print("\n".join(lines))
    result = {"command": command_line(), "stream_gb_per_s": stream / 1e9, "rows": rows}
    write_table(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
