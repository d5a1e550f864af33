"""A decode step's matmuls alone, per linear kernel, at 1-16 rows: what the dispatch table
chooses between.

    python scripts/linear_kernel_table.py [--scale small] [--rows 1,2,4,8,16] [--rounds 15]
        [--group-size 128]

One pass runs every weight matrix of the preset once (q/k/v and gate/up stacked, as `fuse`
and `int8` do, plus the LM head) at one row count: the matmuls of one decode step. Every
implementation that runs here of the float op `bf16_linear`, the weight-only `int8_linear`
(scales per output channel, and per group of --group-size inputs: `int8_linear g128`) and
`int4_linear` (groups of --group-size), and the int8 x int8 `w8a8_linear` and int4 x int8
`w4a8_linear` (their times include quantizing the activations) gets a row, except the
int4 ops' portable fallbacks (slow: they unpack each weight in torch on every call, seconds
per step, and lose to any kernel that runs). All layers' weights together exceed the L3, so
passes read them from DRAM as a real step does; timing one matrix in a loop would measure the
cache instead. Passes of all kernels are interleaved; median (min-max) over the rounds. GB/s
is weight bytes over time, next to a streaming read of a buffer the size of the bf16 weights.
Writes results/llama65b/cpu/linear_kernels.{md,json} atomically.
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
from common.device.probe import cpu_info, measure_read_bandwidth  # noqa: E402
from common.device.select import Device  # noqa: E402
from common.io.presets import preset_args  # noqa: E402
from common.ops.bf16_linear import bf16_linear  # noqa: E402
from common.ops.dispatch import Op  # noqa: E402
from common.ops.int4_linear import ROW_ALIGN, int4_linear  # noqa: E402
from common.ops.int4_linear import pack as int4_pack  # noqa: E402
from common.ops.int8_linear import int8_linear  # noqa: E402
from common.ops.w4a8_linear import pack as w4a8_pack  # noqa: E402
from common.ops.w4a8_linear import w4a8_linear  # noqa: E402
from common.ops.w8a8_linear import w8a8_linear  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402

SLOW = {"int4_linear dequant_mm", "w4a8_linear reference"}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="small")
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--group-size", type=int, default=128, help="int4, w4a8 and int8 groups")
    p.add_argument("--out", type=Path, default=ROOT / "results/llama65b/cpu/linear_kernels")
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    mcfg = OmegaConf.load(ROOT / "configs/model/llama65b.yaml")
    mcfg.scale = args.scale
    shapes = step_shapes(preset_args(mcfg, LlamaForCausalLM))
    torch.manual_seed(0)  # random values: timing only
    g = args.group_size
    # per matrix: (input width, weight tensors)
    bf16, int8, int8g, int4, w4a8 = [], [], [], [], []
    smooth: list[tuple] = []  # w8a8's smoothing multiplier, per matrix
    for n, k in shapes:
        bf16.append((k, (torch.randn(n, k, dtype=torch.bfloat16),)))
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        int8.append((k, (w8, torch.rand(n, dtype=torch.bfloat16))))
        groups = -(-k // g)
        int8g.append((k, (w8, torch.rand(n, groups, dtype=torch.bfloat16))))
        # o_proj / down_proj carry it; timing it on every matrix is the upper bound (the
        # multiply rides on the quantization pass)
        smooth.append((torch.rand(k, dtype=torch.bfloat16) + 0.5,))
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        scales, zeros = torch.rand(2, n, groups, dtype=torch.bfloat16) / 50
        # int4_linear: rows padded to 16 and the input to whole groups, as Int4Linear stores them
        n16 = -(-n // ROW_ALIGN) * ROW_ALIGN
        packed = int4_pack(F.pad(q, (0, groups * g - k, 0, n16 - n), value=8))
        sz = torch.stack([scales, zeros], -1).transpose(0, 1)
        sz = F.pad(sz, (0, 0, 0, n16 - n)).contiguous()
        int4.append((groups * g, (packed, sz)))
        w4a8.append((k, (w4a8_pack(q), scales, zeros)))
    none = [()] * len(shapes)
    grouped = [(g,)] * len(shapes)
    ops: list[tuple[str, Op, list[tuple[int, tuple]], list[tuple]]] = [  # weights, extra args
        ("bf16_linear", bf16_linear, bf16, [(None,)] * len(shapes)),  # no bias
        ("int8_linear", int8_linear, int8, none),
        (f"int8_linear g{g}", int8_linear, int8g, grouped),
        ("w8a8_linear", w8a8_linear, int8, smooth),
        ("int4_linear", int4_linear, int4, grouped),
        ("w4a8_linear", w4a8_linear, w4a8, grouped),
    ]
    widths = {width for weights in (bf16, int4) for width, _ in weights}
    inputs = {(m, k): torch.randn(m, k, dtype=torch.bfloat16) for m in rows for k in widths}
    kernels: dict[str, tuple[int, Callable[[int], Callable[[], None]]]] = {}
    for label, op, weights, extras in ops:
        nbytes = sum(t.nbytes for _, tensors in weights for t in tensors)
        calls = [(k, (*tensors, *extra)) for (k, tensors), extra in zip(weights, extras)]
        for impl in op.impls.values():
            if (
                f"{label} {impl.name}" not in SLOW
                and impl.available("cpu", torch.bfloat16)
                and all(impl.allows((inputs[1, k], *c)) for k, c in calls)
            ):
                fn = impl.fn

                def make(m: int, fn=fn, calls=calls) -> Callable[[], None]:
                    return lambda: [fn(inputs[m, k], *c) for k, c in calls]

                kernels[f"{label} {impl.name}"] = (nbytes, make)
    runs = {(name, m): make(m) for name, (_, make) in kernels.items() for m in rows}
    for run in runs.values():
        run()  # warm-up: builds the C++ kernels, faults in every page
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)
    stream = measure_read_bandwidth(Device("cpu"), kernels["bf16_linear torch"][0])

    ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    base = {m: ms["bf16_linear torch", m] for m in rows}

    def cell(name: str, m: int) -> str:
        t = sorted(times[name, m])
        gbs = kernels[name][0] / ms[name, m] / 1e6
        return (f"{ms[name, m]:.2f} ({t[0] * 1e3:.2f}–{t[-1] * 1e3:.2f}), {gbs:.1f} GB/s, "
                f"{base[m] / ms[name, m]:.2f}×")  # fmt: skip

    header = " | ".join(f"{m} row{'s' if m > 1 else ''}" for m in rows)
    lines = [
        "# A decode step's matmuls per linear kernel, 1-16 rows",
        "",
        f"- command: `{command_line()}`",
        f"- {len(shapes)} matrices of the llama-65b {args.scale} preset (q/k/v and gate/up "
        f"stacked, LM head included), bf16 activations; {cpu_info()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        f"- per cell: ms per step, median (min–max) of {args.rounds} interleaved rounds; weight "
        "bytes / time; speed vs bf16 F.linear (`bf16_linear torch`) at the same rows. "
        "w8a8 and w4a8 include quantizing the activations; int4, w4a8 and "
        f"`int8_linear g{g}` in groups of {g}",
        f"- streaming read of a {kernels['bf16_linear torch'][0] / 1e6:.0f} MB buffer (the "
        f"bf16 weights): {stream / 1e9:.1f} GB/s",
        "",
        f"| kernel | weights MB | {header} |",
        "|---|---:|" + "---|" * len(rows),
        *(
            f"| {name} | {nbytes / 1e6:.1f} | " + " | ".join(cell(name, m) for m in rows) + " |"
            for name, (nbytes, _) in kernels.items()
        ),
        "",
    ]
    print("\n".join(lines))
    result = {
        "command": command_line(),
        "cpu": cpu_info(),
        "stream_gb_per_s": stream / 1e9,
        "rows": rows,
        "ms": {name: {str(m): ms[name, m] for m in rows} for name in kernels},
    }
    write_table(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
