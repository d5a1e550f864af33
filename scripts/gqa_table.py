"""What GQA with 2 KV heads buys GLM-4: KV bytes per token and how many sequences fit a KV budget.

Arithmetic on the model configs (configs/model/glm4_9b.yaml), no model is built:

    python scripts/gqa_table.py [--budgets-gib 4 16] [--contexts 2048 8192]

Each GLM-4 preset is set against an MHA model with the same dims but one KV head per query
head. Writes results/chatglm/gqa_kv.md and .json atomically.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.ops.kv_int8 import SCALE_DTYPE  # noqa: E402
from common.parallel.capacity import contiguous_fit  # noqa: E402
from common.parallel.memory import kv_bytes_per_token  # noqa: E402
from models.glm import GlmArgs  # noqa: E402

GIB = 2**30
# name -> (model dtype, int8 KV), sized by the memory model (+opt=kv_int8's format).
KV_DTYPES = {"bf16": (torch.bfloat16, False), "int8": (torch.bfloat16, True)}
SCALE = str(SCALE_DTYPE).removeprefix("torch.")
MODEL_CONFIG = ROOT / "configs/model/glm4_9b.yaml"
PRESETS = ("full", "small")


@dataclass(frozen=True)
class Row:
    model: str
    attention: str
    kv_heads: int
    kv_dtype: str
    kv_bytes_per_token: int
    max_seqs: dict[str, int]  # "<budget> GiB @ <context>" -> sequences that fit


def budget_key(budget_gib: float, context: int) -> str:
    return f"{budget_gib:g} GiB @ {context}"


def table(budgets_gib: list[float], contexts: list[int]) -> list[Row]:
    cfg = OmegaConf.load(MODEL_CONFIG)
    rows = []
    for preset in PRESETS:
        name = cfg.name if preset == "full" else f"{cfg.name} {preset}"
        gqa = GlmArgs(**{**cfg.common, **cfg.presets[preset]})
        mha = replace(gqa, num_key_value_heads=gqa.num_attention_heads)
        for attention, a in (("GQA", gqa), ("MHA", mha)):
            for kv_dtype in KV_DTYPES:
                per_token = kv_bytes_per_token(a, *KV_DTYPES[kv_dtype])
                fits = {
                    budget_key(b, c): contiguous_fit(int(b * GIB), c, per_token)
                    for b in budgets_gib
                    for c in contexts
                }
                rows.append(Row(name, attention, a.num_key_value_heads, kv_dtype, per_token, fits))
    return rows


def cells(row: Row) -> list[str]:
    return [
        row.model,
        f"{row.attention} ({row.kv_heads} KV heads)",
        row.kv_dtype,
        f"{row.kv_bytes_per_token / 1024:.1f}",
        *(str(n) for n in row.max_seqs.values()),
    ]


def header(rows: list[Row]) -> list[str]:
    return ["model", "attention", "KV dtype", "KV KiB/token", *rows[0].max_seqs]


def markdown(rows: list[Row]) -> str:
    head = header(rows)
    per_model = {(r.model, r.attention): r.kv_bytes_per_token for r in rows if r.kv_dtype == "bf16"}
    savings = [
        f"- {model}: GQA stores {per_model[model, 'MHA'] // per_model[model, 'GQA']}x less KV "
        "per token than MHA, so about that many times more sequences fit"
        for model, attention in per_model
        if attention == "GQA"
    ]
    return "\n".join(
        [
            "# GLM-4: what 2 KV heads buy",
            "",
            f"- command: `{command_line()}`",
            f"- dims: `{MODEL_CONFIG.relative_to(ROOT)}` presets {', '.join(PRESETS)}; "
            "MHA = the same model with one KV head per query head",
            "- KV bytes/token = 2 (K, V) x layers x KV heads x head_dim x element bytes; int8 "
            f"(`+opt=kv_int8`) adds one {SCALE} scale per token, KV head and K/V",
            "- columns `B GiB @ L`: sequences of L tokens whose KV cache fits in B GiB "
            "(KV only: weights, activations and allocator slack not counted)",
            *savings,
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|",
            *("| " + " | ".join(cells(r)) + " |" for r in rows),
            "",
        ]
    )


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="GLM-4: KV cache per token and sequences per KV budget")
    for i, h in enumerate(header(rows)):
        t.add_column(h, justify="left" if i < 3 else "right")
    for r in rows:
        t.add_row(*cells(r))
    Console().print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets-gib", type=float, nargs="+", default=[4, 16])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--out", type=Path, default=ROOT / "results/chatglm/gqa_kv")
    args = p.parse_args()
    if min(args.budgets_gib) <= 0 or min(args.contexts) <= 0:
        p.error("budgets and contexts must be positive")
    rows = table(args.budgets_gib, args.contexts)
    print_table(rows)
    result = {
        "command": command_line(),
        "model_config": str(MODEL_CONFIG.relative_to(ROOT)),
        "int8_kv_scale": f"one {SCALE} per token, KV head and K/V",
        "rows": [r.__dict__ for r in rows],
    }
    write_table(args.out, result, markdown(rows))


if __name__ == "__main__":
    main()
