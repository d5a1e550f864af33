"""What offload means on paper for LLaMA-65B on one 64 GB accelerator (no model is built).

    python scripts/offload_table.py [--device-gib 64] [--hbm-gbs 1600] [--link-gbs 25]
                                    [--disk-gbs 7] [--tflops 300] [--context 2048] [--batches 1 8]

From the memory model (common/parallel/memory.py): the weights, what stays on the device
when the decoder layers are offloaded (embedding, final norm and head, two layer buffers,
activations and workspace of a decode step), the KV tokens the rest of the device holds
(and so the largest batch at the context; `fits` asks for the batch's KV too),
and the decode step time as the larger of streaming and compute: in device memory the
weights stream from HBM; offloaded, every decode step streams all layers over the host link
(`cpu`) or from the SSD (`disk`), so a step costs the same for 1 or 64 sequences until
compute catches up (why FlexGen runs large batches). Bandwidths and FLOP/s are assumptions
given on the command line (defaults: HBM2e-class 1.6 TB/s, PCIe 4.0 x16 at ~25 GB/s
effective, a PCIe 4.0 NVMe SSD at ~7 GB/s sequential read, 300 dense bf16 TFLOP/s), not
measurements. Writes results/llama65b/offload_paper.{md,json} atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.parallel.layout import ONE_DEVICE, shard  # noqa: E402
from common.parallel.memory import (  # noqa: E402
    device_memory,
    kv_bytes_per_token,
    layer_weight_bytes,
    parameter_count,
)
from models.llama import LlamaArgs  # noqa: E402

GIB = 2**30
SCHEMES = {"bf16": "none", "int8 weights": "int8"}


def llama65b() -> LlamaArgs:
    cfg = OmegaConf.load(ROOT / "configs/model/llama65b.yaml")
    return LlamaArgs(**{**cfg.common, **cfg.presets.full})


def table(a: argparse.Namespace, batch: int) -> list[dict]:
    args, dtype, budget = llama65b(), torch.bfloat16, a.device_gib * GIB
    params = parameter_count(args)
    rows = []
    for label, scheme in SCHEMES.items():
        (mem,) = device_memory(args, dtype, ONE_DEVICE, scheme, batch=batch, seq_len=1,
                               context=a.context, eager_attention=False)  # fmt: skip
        layer = layer_weight_bytes(args, dtype, scheme, shard(args, ONE_DEVICE))
        layers = args.num_hidden_layers * layer
        w = mem.weights
        per_token_kv = kv_bytes_per_token(args, dtype)
        step_overhead = mem.activations + mem.workspace
        compute_s = 2 * params * batch / (a.tflops * 1e12)
        for where in ("device", "cpu", "disk"):
            resident = w.total if where == "device" else w.total - layers + 2 * layer
            free = budget - resident - step_overhead
            streamed = w.decode_read if where == "device" else layers
            bw = {"device": a.hbm_gbs, "cpu": a.link_gbs, "disk": a.disk_gbs}[where] * 1e9
            step_s = max(streamed / bw, compute_s)
            rows.append(
                {
                    "weights": label,
                    "layers_on": {"device": "device memory", "cpu": "host memory", "disk": "SSD"}[
                        where
                    ],  # fmt: skip
                    "weights_gib": w.total / GIB,
                    "on_device_gib": resident / GIB,
                    "batch": batch,
                    "fits": free >= batch * a.context * per_token_kv,
                    "kv_tokens": max(0, int(free // per_token_kv)),
                    "max_batch": max(0, int(free // per_token_kv) // a.context),
                    "bytes_streamed_per_step_gib": streamed / GIB,
                    "step_ms": 1e3 * step_s,
                    "tokens_per_s": batch / step_s,
                }
            )
    return rows


def markdown(rows: list[dict], a: argparse.Namespace) -> str:
    lines = [
        f"LLaMA-65B (bf16 activations, KV bf16) on one {a.device_gib} GiB accelerator, on "
        f"paper: decode at {a.context} tokens of context. Assumed: HBM "
        f"{a.hbm_gbs} GB/s, host link {a.link_gbs} GB/s, SSD {a.disk_gbs} GB/s, "
        f"{a.tflops} TFLOP/s.",
        "",
        "| weights | decoder layers in | weights GiB | on device GiB | KV tokens left "
        f"| max batch at {a.context} | batch | fits | streamed / step GiB | step ms | tok/s |",
        "|---|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for r in rows:
        ms, tps = (f"{r['step_ms']:.0f}", f"{r['tokens_per_s']:.2f}") if r["fits"] else ("—", "—")
        lines.append(
            f"| {r['weights']} | {r['layers_on']} | {r['weights_gib']:.1f} | "
            f"{r['on_device_gib']:.1f} | {r['kv_tokens']:,} | {r['max_batch']} | "
            f"{r['batch']} | {'yes' if r['fits'] else 'no'} | "
            f"{r['bytes_streamed_per_step_gib']:.1f} | {ms} | {tps} |"
        )
    return "\n".join([*lines, "", f"Command: `{command_line()}`", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-gib", type=float, default=64)
    parser.add_argument("--hbm-gbs", type=float, default=1600)
    parser.add_argument("--link-gbs", type=float, default=25)
    parser.add_argument("--disk-gbs", type=float, default=7)
    parser.add_argument("--tflops", type=float, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "results")
    a = parser.parse_args()
    rows = [r for batch in a.batches for r in table(a, batch)]
    md = markdown(rows, a)
    print(md)
    write_table(a.results_dir / "llama65b" / "offload_paper", {"args": vars(a) | {
        "results_dir": str(a.results_dir)}, "rows": rows, "command": command_line()}, md)  # fmt: skip


if __name__ == "__main__":
    main()
