"""A decode step's matmuls per int8 kernel at 1-16 rows (batched decode), against bf16.

    python scripts/int8_rows_table.py [--scale small] [--rows 1,2,4,8,16] [--rounds 10]

The sibling of scripts/int8_kernel_table.py (one row): every weight matrix of the preset
(q/k/v and gate/up stacked, LM head included) once per pass, at each row count, for bf16
F.linear, each implementation of the weight-only int8_linear op and each of the int8 x int8
w8a8_linear op (whose time includes quantizing the activations). All layers' weights
together exceed the L3, so passes read them from DRAM as a real step does. Passes of all
kernels are interleaved; median over the rounds. A kernel that does not run here (no VNNI,
no g++) is left out. Writes results/llama65b/cpu/int8_kernels_rows.{md,json} atomically.
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
from tqdm import tqdm  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.ops.int8_linear import int8_linear  # noqa: E402
from common.ops.w8a8_linear import w8a8_linear  # noqa: E402
from scripts.int8_kernel_table import step_weights  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="small")
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "results/llama65b/cpu/int8_kernels_rows")
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    shapes, bf16, int8 = step_weights(args.scale)
    smooth = {k: torch.rand(k, dtype=torch.bfloat16) + 0.5 for _, k in shapes}
    inputs = {(m, k): torch.randn(m, k, dtype=torch.bfloat16) for m in rows for _, k in shapes}

    def weight_only(impl: str, m: int) -> Callable[[], None]:
        fn = int8_linear.impls[impl].fn
        return lambda: [fn(inputs[m, w.shape[1]], w, s) for w, s in int8]

    def act_int8(impl: str, m: int) -> Callable[[], None]:
        # o_proj / down_proj carry an explicit smoothing multiplier; timing it everywhere
        # is the upper bound (the multiply rides on the quantization pass).
        fn = w8a8_linear.impls[impl].fn
        return lambda: [fn(inputs[m, w.shape[1]], w, s, smooth[w.shape[1]]) for w, s in int8]

    kernels: dict[str, Callable[[int], Callable[[], None]]] = {
        "bf16 F.linear": lambda m: lambda: [F.linear(inputs[m, w.shape[1]], w) for w in bf16]
    }
    for op, make, extra in ((int8_linear, weight_only, ()), (w8a8_linear, act_int8, (None,))):
        for impl in op.impls.values():
            runs_here = impl.available("cpu", torch.bfloat16) and all(
                impl.allows((inputs[1, w.shape[1]], w, s, *extra)) for w, s in int8
            )
            if runs_here:
                kernels[f"{op.name} {impl.name}"] = lambda m, i=impl.name, make=make: make(i, m)
    runs = {(name, m): make(m) for name, make in kernels.items() for m in rows}
    for run in runs.values():
        run()  # warm-up: builds the C++ kernels, faults in every page
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)

    med = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    base = {m: med["bf16 F.linear", m] for m in rows}
    header = " | ".join(f"{m} row{'s' if m > 1 else ''}" for m in rows)
    lines = [
        "# A decode step's matmuls per kernel, 1-16 rows",
        "",
        f"- command: `{command_line()}`",
        f"- {len(shapes)} matrices of the llama-65b {args.scale} preset (q/k/v and gate/up "
        f"stacked, LM head included), bf16 activations; {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        f"- ms per step, median of {args.rounds} interleaved rounds, and speed vs bf16 at the "
        "same rows; w8a8 times include quantizing the activations",
        "",
        f"| kernel | {header} |",
        "|---|" + "---:|" * len(rows),
        *(
            f"| {name} | "
            + " | ".join(f"{med[name, m]:.2f} ({base[m] / med[name, m]:.2f}×)" for m in rows)
            + " |"
            for name in kernels
        ),
        "",
    ]
    print("\n".join(lines))
    result = {
        "command": command_line(),
        "rows": rows,
        "ms": {name: {str(m): med[name, m] for m in rows} for name in kernels},
    }
    write_table(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
