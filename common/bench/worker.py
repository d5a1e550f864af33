"""The worker: measure one variant in this process (started by the orchestrator as a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from common import ops
from common.attention.backends import get_backend
from common.bench.fidelity import fidelity, perplexity, same_as_alone
from common.bench.measure import measure, roofline
from common.bench.runners import engine_runner, pipeline_runner, scheduler_config
from common.bench.spawn import die_with_parent_now
from common.bench.workload import arrival_times, build_requests
from common.core.request import SamplingParams
from common.device.select import resolve_dtype, select_device
from common.engine.beam import BeamConfig
from common.engine.engine import Engine
from common.engine.pipeline import Pipeline
from common.engine.spec import SpecConfig
from common.kv.spec import KVSpec
from common.nn.causal_lm import CausalLM
from common.parallel.capacity import kv_capacity
from common.parallel.launch import init_distributed, is_writer, share, under_torchrun
from common.parallel.layout import Layout
from common.parallel.measured import weight_bytes
from common.parallel.memory import kv_bytes_per_token
from common.parallel.mesh import rank_role
from common.parallel.offload import offload_layers
from common.parallel.placement import combined
from common.parallel.stages import stage_placement
from common.parallel.tensor import TensorParallel
from common.quant.data import load_texts, token_blocks
from common.transforms.compile import compile_stats
from common.transforms.registry import apply_transforms, encoder

QUEUED = ("throughput", "online")


def pinned_kernels(cfg: Any) -> dict[str, str]:
    return {op: impl for op, impl in cfg.kernels.items() if impl}


def kv_spec(cfg: Any) -> KVSpec:
    kv = cfg.kv_cache
    # int8 KV and a compiled decode step (static shapes) need preallocated storage: on the
    # default growing cache they take the contiguous one, so +opt=kv_int8 and +opt=compile
    # work alone and compose with static_kv / paged_kv in any order.
    static = bool(cfg.compile.enabled)
    kind = "contiguous" if (kv.int8 or static) and kv.kind == "dynamic" else kv.kind
    return KVSpec(
        kind, kv.int8, kv.block_size, cfg.scheduler.kv_budget, kv.prefix_cache, kv.max_len, static
    )


def compile_metrics(model: CausalLM) -> dict[str, float]:
    """Seconds spent compiling (in the warm-up pass, never in TPOT), for compiled rows."""
    stats = compile_stats(model)
    return {} if stats is None else {"compile_s": stats.seconds, "compiled_graphs": stats.graphs}


def spec_config(cfg: Any) -> SpecConfig | None:
    s = cfg.spec
    if not s.enabled:
        return None
    return SpecConfig(s.method, s.k, s.ngram.max, s.ngram.min, s.max_batch)


def beam_config(cfg: Any) -> BeamConfig | None:
    g = cfg.generation
    return BeamConfig(g.num_beams, g.length_penalty, g.early_stopping) if g.num_beams > 1 else None


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
    from common.io.presets import build_draft, build_model

    ops.pin(pinned_kernels(cfg))
    par = cfg.parallel
    if under_torchrun():
        die_with_parent_now()
    device_type = select_device(cfg.hardware.device).type
    init_distributed(device_type, par.tp * par.pp, par.timeout_s, par.cpu_bind)
    if cfg.bench.threads:  # after init_distributed, which gives each CPU rank its cores
        torch.set_num_threads(int(cfg.bench.threads))
    device = select_device(cfg.hardware.device)  # now with its rank and group
    dtype = resolve_dtype(cfg.model.dtype, device)
    layout = Layout(par.tp, par.pp)
    role = rank_role(device_type, layout)
    shm = int(par.shm_mb * 2**20)
    tp = TensorParallel(role.tp_rank, par.tp, role.tp_group, shm) if par.tp > 1 else None
    stage_place = stage_placement(role.stage, par.pp) if par.pp > 1 else None
    place = combined(stage_place, tp.shard if tp else None)  # prune to the stage, then slice
    model, tokenizer, weights_desc = build_model(cfg.model, model_cls, device.torch, dtype, place)
    requests = build_requests(cfg.workload, model.args.vocab_size, tokenizer, model, cfg.model.path)
    arrivals = arrival_times(cfg.workload, len(requests))
    sampling = SamplingParams.from_generation(cfg.generation)
    for r in requests:
        r.sampling = sampling
    spec = kv_spec(cfg)
    w = cfg.workload
    if cfg.bench.peer:
        runner = peer_runner(
            cfg.bench.peer, model, cfg, requests, arrivals, w.kind in QUEUED, tokenizer
        )
    else:
        model = apply_transforms(model, cfg, tokenizer)
        if tp:
            model = tp.parallelize(model)
        model = offload_layers(model, cfg.offload, device.torch, cfg.offload_dir, cfg.offload_cold)
        if par.pp > 1:
            backend = get_backend(cfg.attention.backend, device)
            pipe = Pipeline(
                model, role.stage, par.pp, device.torch, spec, backend, par.micro_batches,
                role.pp_group,
            )  # fmt: skip
            runner = pipeline_runner(pipe, cfg.scheduler.max_batch, cfg.bench.seed)
        else:
            speculation, draft = spec_config(cfg), None
            if speculation and speculation.method == "draft":
                draft, draft_desc = build_draft(
                    cfg.spec.draft, cfg.model, model_cls, device.torch, dtype, model.args.vocab_size
                )
                draft = apply_transforms(
                    draft, cfg, tokenizer
                )  # the same weight format as the target
                weights_desc += f"; draft model {draft_desc}"
            cache_mb = cfg.encoder.cache_mb
            engine = Engine(
                model, device, spec, cfg.attention.backend, scheduler_config(cfg.scheduler),
                tokenizer, int(cache_mb * 2**20) if cache_mb else None, cfg.encoder.overlap,
                spec=speculation, draft_model=draft, beams=beam_config(cfg),
            )  # fmt: skip
            for r in requests:
                engine.check(r)
            runner = engine_runner(engine, arrivals, cfg.bench.seed)
    slo = (w.slo_ttft_ms, w.slo_tpot_ms) if "slo_ttft_ms" in w else None
    kv_int8 = spec.int8 and not cfg.bench.peer  # a peer keeps its own (16-bit) KV
    roof = roofline(
        model, dtype, float(cfg.bench.bandwidth), kv_int8, layout, role.stage,
        runner.decode_weight_bytes,
    )  # fmt: skip
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
    is_baseline = share(not (reference / "outputs.pt").exists())  # every rank alike
    writer = is_writer()
    capacity = kv_capacity(
        [len(r.prompt) + r.max_new_tokens for r in requests],
        kv_bytes_per_token(model.args, dtype, spec.int8, layout, role.stage),
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
            "weight_bytes": runner.weight_bytes or weight_bytes(model),
            "kv_bytes": runner.peak_kv(),
            "kv_budget_bytes": capacity.budget_bytes,
            "max_concurrent_contiguous": capacity.contiguous,
            "max_concurrent_paged": capacity.paged,
            "peak_mem_bytes": runner.peak_memory()
            if runner.peak_memory
            else device.peak_memory_bytes(),
            **compile_metrics(model),
        },
        "fidelity": {
            **fidelity(runner, requests, reference, is_baseline, outputs, writer),
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
        "ranks": device.world_size,
    }
    if writer:
        Path(cfg.bench.worker_out).write_text(json.dumps(result))
