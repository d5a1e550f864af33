"""The worker: measure one variant in this process (started by the orchestrator as a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common import ops
from common.bench.fidelity import fidelity, perplexity, same_as_alone
from common.bench.measure import measure, roofline
from common.bench.runners import engine_runner, scheduler_config
from common.bench.workload import arrival_times, build_requests
from common.core.request import SamplingParams
from common.device.select import resolve_dtype, select_device
from common.engine.engine import Engine
from common.kv.spec import KVSpec
from common.nn.causal_lm import CausalLM
from common.parallel.capacity import kv_capacity
from common.parallel.measured import weight_bytes
from common.parallel.memory import kv_bytes_per_token
from common.quant.data import load_texts, token_blocks
from common.transforms.registry import apply_transforms, encoder

QUEUED = ("throughput", "online")


def pinned_kernels(cfg: Any) -> dict[str, str]:
    return {op: impl for op, impl in cfg.kernels.items() if impl}


def kv_spec(cfg: Any) -> KVSpec:
    kv = cfg.kv_cache
    # int8 needs preallocated storage: on the default growing cache it takes the contiguous one,
    # so +opt=kv_int8 works alone and composes with static_kv / paged_kv in any order.
    kind = "contiguous" if kv.int8 and kv.kind == "dynamic" else kv.kind
    return KVSpec(
        kind, kv.int8, kv.block_size, cfg.scheduler.kv_budget, kv.prefix_cache, kv.max_len
    )


def eval_blocks(cfg: Any, tokenizer: Any, args: Any):
    """Held-out token blocks for perplexity, or None when it is off (by default: on with real
    weights only; a seeded model's perplexity says nothing). Blocks are at most the model's
    max positions long."""
    ev = cfg.eval
    if not (ev.perplexity if ev.perplexity is not None else bool(cfg.model.path)):
        return None
    texts = load_texts(ev.path, ev.dataset, ev.split, "eval")
    seq_len = min(ev.seq_len, args.max_position_embeddings)
    return token_blocks(texts, encoder(tokenizer, args.vocab_size), ev.num_samples, seq_len)


def run_worker(cfg: Any, model_cls: type[CausalLM]) -> None:
    from common.bench.peers import peer_runner
    from common.io.presets import build_model

    if cfg.bench.threads:
        torch.set_num_threads(int(cfg.bench.threads))
    ops.pin(pinned_kernels(cfg))
    device = select_device(cfg.hardware.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    model, tokenizer, weights_desc = build_model(cfg.model, model_cls, device.torch, dtype)
    requests = build_requests(cfg.workload, model.args.vocab_size, tokenizer)
    arrivals = arrival_times(cfg.workload, len(requests))
    sampling = SamplingParams(**cfg.generation)
    for r in requests:
        r.sampling = sampling
    spec = kv_spec(cfg)
    if cfg.bench.peer:
        runner = peer_runner(cfg.bench.peer, model, cfg.scheduler.max_batch)
    else:
        model = apply_transforms(model, cfg, tokenizer)
        engine = Engine(
            model, device, spec, cfg.attention.backend, scheduler_config(cfg.scheduler), tokenizer
        )
        for r in requests:
            engine.check(r)
        runner = engine_runner(engine, arrivals, cfg.bench.seed)
    w = cfg.workload
    slo = (w.slo_ttft_ms, w.slo_tpot_ms) if "slo_ttft_ms" in w else None
    roof = roofline(model, dtype, float(cfg.bench.bandwidth), spec.int8)
    runs, outputs = measure(
        runner,
        requests,
        cfg.bench.warmup,
        cfg.bench.repeats,
        roof,
        w.kind in QUEUED,
        slo,
        online=arrivals is not None,
    )
    reference = Path(cfg.bench.reference)
    capacity = kv_capacity(
        [len(r.prompt) + r.max_new_tokens for r in requests],
        kv_bytes_per_token(model.args, dtype, spec.int8),
        spec.block_size,
        cfg.scheduler.max_batch,
        spec.max_len,
        spec.budget_bytes,
    )
    first_round = cfg.bench.round == 0
    held_out = eval_blocks(cfg, tokenizer, model.args) if first_round else None
    result = {
        "runs": runs,
        "metrics": {
            "weight_bytes": weight_bytes(model),
            "kv_bytes": runner.peak_kv(),
            "kv_budget_bytes": capacity.budget_bytes,
            "max_concurrent_contiguous": capacity.contiguous,
            "max_concurrent_paged": capacity.paged,
            "peak_mem_bytes": device.peak_memory_bytes(),
        },
        "fidelity": {
            **fidelity(
                runner, requests, reference, not (reference / "outputs.pt").exists(), outputs
            ),
            **(same_as_alone(runner, requests, outputs) if cfg.bench.check_alone else {}),
            **({"perplexity": perplexity(runner, held_out)} if held_out is not None else {}),
        }
        if first_round
        else None,
        "outputs": outputs,
        "kv_kind": spec.kind,
        "kernels": ops.chosen(),  # what ran in this process, per op and shape bucket
        "model": f"{cfg.model.name}, {weights_desc}, {str(dtype).removeprefix('torch.')}",
        "device": device.describe(),
        "threads": torch.get_num_threads(),
    }
    Path(cfg.bench.worker_out).write_text(json.dumps(result))
