"""Plan before you run: the memory a model needs per device, and the parallel strategy to serve it.

    python scripts/plan.py memory --model llama65b [--quant none int8 int4 w8a8]
        [--kv-dtype bf16 int8] [--tp 1 2 4 8] [--pp 1] [--batch 16] [--context 2048]
        [--device-memory-gb 64]
    python scripts/plan.py strategy --model llama65b --hardware ascend910b_x8
        [--batch 64] [--prompt-len 512] [--output-len 128] [--ttft-slo-ms 2000]
        [--tpot-slo-ms 100] [--quant none int8 int4] [--kv-dtype bf16 int8] [--top 5]

--model: a configs/model name (with --scale, default full), a configs/plan card
(qwen2_vl_7b) or a checkpoint's config.json (or its directory). Arithmetic on the config: no
model is built. The logic is in common/parallel (calculator.py, strategy.py, simulate.py);
this script reads the inputs and prints and writes the tables (results/planning/*.md, .json).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.core.errors import RecipeError  # noqa: E402
from common.io.presets import preset_args  # noqa: E402
from common.nn.causal_lm import CausalLM, ModelArgs  # noqa: E402
from common.parallel.calculator import Serving, max_batch, max_context, serving_memory  # noqa: E402
from common.parallel.hardware import Hardware, from_spec  # noqa: E402
from common.parallel.layout import Layout  # noqa: E402
from common.parallel.memory import parameter_count  # noqa: E402
from common.parallel.simulate import Workload  # noqa: E402
from common.parallel.strategy import plan  # noqa: E402
from common.quant.formats import SCHEME_NAMES, WeightFormat, weight_format  # noqa: E402
from models.glm import GlmForCausalLM  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402

CLASSES: dict[str, type[CausalLM]] = {
    c.hf_class_name: c for c in (LlamaForCausalLM, GlmForCausalLM)
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GB, GIB = 1e9, 2**30
OUT = ROOT / "results/planning"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    args: ModelArgs
    other_params: int = 0  # outside the decoder (a vision tower)
    source: str = ""


def _class(architecture: str, where: str) -> type[CausalLM]:
    if architecture not in CLASSES:
        raise RecipeError(
            f"{where}: architecture {architecture!r} has no model here; "
            f"choose a config of {', '.join(CLASSES)}"
        )
    return CLASSES[architecture]


def load_model(model: str, scale: str = "full") -> ModelSpec:
    """A configs/model name, a configs/plan card, or an HF config.json (file or directory)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json":
        if not path.exists():
            raise RecipeError(f"--model {model}: no such config.json")
        config = json.loads(path.read_text())
        arch = (config.get("architectures") or ["?"])[0]
        return ModelSpec(
            arch, _class(arch, str(path)).args_cls.from_hf_config(config), 0, str(path)
        )
    for group in ("model", "plan"):
        card = ROOT / "configs" / group / f"{model}.yaml"
        if card.exists():
            cfg = OmegaConf.load(card)
            if group == "plan":
                cls = _class(cfg.sized_as, str(card))
                args = cls.args_cls(**OmegaConf.to_container(cfg.config))
                rel = str(card.relative_to(ROOT))
                return ModelSpec(cfg.name, args, int(cfg.get("vision_params", 0)), rel)
            cfg.scale, cfg.allow_random_full = scale, True  # dims only: nothing is allocated
            args = preset_args(cfg, _class(cfg.architecture, str(card)))
            name = cfg.name if scale == "full" else f"{cfg.name} {scale}"
            return ModelSpec(name, args, 0, f"{card.relative_to(ROOT)} preset {scale}")
    names = sorted(p.stem for g in ("model", "plan") for p in (ROOT / "configs" / g).glob("*.yaml"))
    raise RecipeError(
        f"unknown --model {model!r}; choose one of {', '.join(names)} or a config.json"
    )


def load_hardware(name: str) -> Hardware:
    card = ROOT / "configs/hardware" / f"{name}.yaml"
    cfg = OmegaConf.load(card) if card.exists() else None
    if cfg is None or not cfg.get("spec"):
        with_spec = [
            p.stem
            for p in sorted((ROOT / "configs/hardware").glob("*.yaml"))
            if OmegaConf.load(p).get("spec")
        ]
        raise RecipeError(
            f"--hardware {name}: no spec to plan with; choose one of {', '.join(with_spec)}"
        )
    return from_spec(cfg.name or name, OmegaConf.to_container(cfg.spec))


def formats(names: list[str], group_size: int) -> list[WeightFormat]:
    return [weight_format(n, group_size) for n in names]


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _md(title: str, notes: list[str], header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        [
            f"# {title}",
            "",
            *(f"- {n}" for n in notes),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows),
            "",
        ]
    )


def _print(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def memory(a: argparse.Namespace) -> None:
    spec = load_model(a.model, a.scale)
    args, dtype = spec.args, DTYPES[a.dtype]
    context = min(a.context, args.max_position_embeddings)
    contexts = [c for c in a.contexts if c <= args.max_position_embeddings]
    budget = int(a.device_memory_gb * GB)
    header = ["weights", "KV", "TP", "PP", "weights GiB", "KV GiB", "activations GiB",
              "workspace GiB", f"total GiB (b{a.batch} x {context})",
              *(f"max batch @ {c}" for c in contexts), "max context @ b1"]  # fmt: skip
    rows, data = [], []
    for fmt in formats(a.quant, a.group_size):
        for kv in a.kv_dtype:
            for tp in a.tp:
                for pp in a.pp:
                    s = Serving(dtype, fmt, kv == "int8", Layout(tp, pp), a.prefill_rows,
                                a.attention == "eager", spec.other_params)  # fmt: skip
                    try:
                        stages = serving_memory(args, s, a.batch, context)
                    except RecipeError as e:  # a tp that does not divide the heads
                        print(f"skip {fmt.label()} tp={tp} pp={pp}: {e}")
                        continue
                    m = max(stages, key=lambda d: d.total)
                    fit = {c: max_batch(args, s, c, budget) for c in contexts}
                    longest = max_context(args, s, 1, budget)
                    rows.append([fmt.label(), kv, str(tp), str(pp), _gib(m.weights.total),
                                 _gib(m.kv), _gib(m.activations), _gib(m.workspace), _gib(m.total),
                                 *(str(fit[c]) for c in contexts), str(longest)])  # fmt: skip
                    data.append({"weights": fmt.label(), "kv_dtype": kv, "tp": tp, "pp": pp,
                                 "stage": m.stage, "weight_bytes": m.weights.total,
                                 "kv_bytes": m.kv, "activation_bytes": m.activations,
                                 "workspace_bytes": m.workspace, "total_bytes": m.total,
                                 "max_batch": fit, "max_context_batch1": longest})  # fmt: skip
    title = f"{spec.name}: memory per device ({a.dtype})"
    notes = [
        f"command: `{command_line()}`",
        f"model: {spec.source}, {parameter_count(args) / 1e9:.2f}B decoder parameters"
        + (f" + {spec.other_params / 1e9:.3f}B vision tower" if spec.other_params else ""),
        f"per device: the fullest pipeline stage; KV for batch {a.batch} x {context} tokens; "
        f"activations and workspace of the larger of a prefill of {a.prefill_rows} prompt(s) "
        f"and a decode step of the batch ({a.attention} attention); "
        "common/parallel/calculator.py",
        f"max batch @ C: sequences of C tokens one replica holds in {a.device_memory_gb:g} GB "
        "per device (all of it: leave room for the runtime); max context @ b1: one sequence",
    ]
    _print(title, header, rows)
    out = a.out or OUT / f"memory_{Path(a.model).stem}"
    result = {"command": command_line(), "model": spec.name, "source": spec.source,
              "dtype": a.dtype, "batch": a.batch, "context": context,
              "device_memory_gb": a.device_memory_gb, "rows": data}  # fmt: skip
    write_table(out, result, _md(title, notes, header, rows))


def strategy(a: argparse.Namespace) -> None:
    spec = load_model(a.model, a.scale)
    hw = load_hardware(a.hardware)
    dtype = DTYPES[a.dtype]
    ms = 1e-3
    w = Workload(a.batch, a.prompt_len, a.output_len,
                 a.ttft_slo_ms and a.ttft_slo_ms * ms, a.tpot_slo_ms and a.tpot_slo_ms * ms)  # fmt: skip
    plans, dropped = plan(
        spec.args, dtype, hw, w, formats(a.quant, a.group_size),
        [k == "int8" for k in a.kv_dtype], a.tp, a.pp, spec.other_params,
    )  # fmt: skip
    if not plans:
        raise RecipeError(f"no strategy fits {spec.name} on {hw.name} ({dropped} tried)")
    header = ["#", "strategy", "devices", "peak GiB/device", "TTFT ms", "TPOT ms",
              "output tok/s", "SLO", "why"]  # fmt: skip
    top = plans[: a.top]
    rows = [[str(i + 1), p.sim.strategy.label(), str(p.sim.strategy.devices), _gib(p.peak_bytes),
             f"{p.sim.ttft / ms:.0f}", f"{p.sim.tpot / ms:.1f}", f"{p.sim.throughput:.0f}",
             "yes" if p.meets_slo else "no", p.reason] for i, p in enumerate(top)]  # fmt: skip
    slo = ", ".join(
        f"{k} <= {v:g} ms" for k, v in (("TTFT", a.ttft_slo_ms), ("TPOT", a.tpot_slo_ms)) if v
    )
    title = f"{spec.name} on {hw.name}: top {len(top)} of {len(plans)} strategies that fit"
    notes = [
        f"command: `{command_line()}`",
        f"workload: up to {a.batch} concurrent sequences, prompt {a.prompt_len}, output "
        f"{a.output_len} tokens; SLO: {slo or 'none'}; {a.dtype} activations",
        f"hardware: configs/hardware/{a.hardware}.yaml ({hw.devices} devices, "
        f"{hw.memory / GB:.0f} GB each, {100 * hw.usable_memory:.0f}% usable)",
        f"{dropped} candidates did not fit in memory (common/parallel/calculator.py); the rest "
        "simulated with a roofline + communication model (common/parallel/simulate.py): "
        "predictions from spec-sheet peaks, a lower bound on time",
        "strategy: tp/pp/dp = tensor-parallel ranks, pipeline stages, replicas; b = sequences "
        "per replica; mb = pipeline micro-batches; then the weight format and KV dtype",
    ]
    _print(title, header, rows)
    out = a.out or OUT / f"strategy_{Path(a.model).stem}_{a.hardware}"
    result = {"command": command_line(), "model": spec.name, "hardware": hw.name,
              "workload": w.__dict__, "dropped": dropped, "fits": len(plans),
              "top": [{"strategy": p.sim.strategy.label(), "tp": p.sim.strategy.tp,
                       "pp": p.sim.strategy.pp, "dp": p.sim.strategy.dp,
                       "batch": p.sim.strategy.batch, "weights": p.sim.strategy.scheme.label(),
                       "kv_int8": p.sim.strategy.kv_int8, "peak_bytes": p.peak_bytes,
                       "ttft_s": p.sim.ttft, "tpot_s": p.sim.tpot,
                       "tokens_per_s": p.sim.throughput, "meets_slo": p.meets_slo,
                       "reason": p.reason} for p in top]}  # fmt: skip
    write_table(out, result, _md(title, notes, header, rows))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in (("memory", memory), ("strategy", strategy)):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        s.add_argument("--model", required=True)
        s.add_argument("--scale", default="full")
        s.add_argument("--dtype", choices=list(DTYPES), default="bf16")
        s.add_argument("--quant", nargs="+", choices=SCHEME_NAMES, default=None)
        s.add_argument("--group-size", type=int, default=128, help="int4 group size")
        s.add_argument("--kv-dtype", nargs="+", choices=["bf16", "int8"], default=None)
        s.add_argument("--tp", type=int, nargs="+", default=None)
        s.add_argument("--pp", type=int, nargs="+", default=None)
        s.add_argument("--out", type=Path, default=None, help="results stem (.md, .json)")
    m = sub.choices["memory"]
    m.set_defaults(quant=["none", "int8", "int4", "w8a8"], kv_dtype=["bf16", "int8"],
                   tp=[1, 2, 4, 8], pp=[1])  # fmt: skip
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--context", type=int, default=4096, help="capped at the model's positions")
    m.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    m.add_argument("--prefill-rows", type=int, default=1)
    m.add_argument("--attention", choices=["flash", "eager"], default="flash")
    m.add_argument("--device-memory-gb", type=float, default=64)
    s = sub.choices["strategy"]
    s.set_defaults(quant=["none", "int8", "int4"], kv_dtype=["bf16", "int8"])
    s.add_argument("--hardware", default="ascend910b_x8")
    s.add_argument("--batch", type=int, default=64, help="concurrent sequences offered")
    s.add_argument("--prompt-len", type=int, default=512)
    s.add_argument("--output-len", type=int, default=128)
    s.add_argument("--ttft-slo-ms", type=float, default=None)
    s.add_argument("--tpot-slo-ms", type=float, default=None)
    s.add_argument("--top", type=int, default=5)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    for key in ("batch", "context", "prompt_len", "output_len", "top", "prefill_rows"):
        if getattr(a, key, 1) < 1:
            sys.exit(f"error: --{key.replace('_', '-')} must be >= 1")
    try:
        a.fn(a)
    except RecipeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
