"""Peer rows: the engines users would pick instead, run on the same weights and requests.

`hf`: transformers' generate() (dynamic cache, its default attention), greedy or with the
same sampling parameters; per-token times come from a generation streamer.
`llama_cpp`: llama.cpp (llama-cpp-python) on a GGUF of our weights, at the format matching
the row's quantization (the model's dtype, q8_0 for int8 and w8a8, q4_0 for int4 and w4a8),
one sequence at a time.
`vllm`: vLLM's CPU backend on our weights as an HF checkpoint, with max_num_seqs = our max
batch, from its own virtualenv. Both run in their own process (common/bench/peer_process.py);
neither is a dependency: a missing one is one line naming its install command.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from common.bench.runners import Runner
from common.bench.workload import batches
from common.core.errors import RecipeError
from common.core.request import Completion, Request
from common.engine.stop import StopRule
from common.nn.causal_lm import CausalLM

PEERS = ("hf", "llama_cpp", "vllm")
INSTALL = {
    "llama_cpp": "scripts/install_peers.sh llama_cpp",
    "vllm": "scripts/install_peers.sh vllm",
}
# quant.weights -> the llama.cpp format a llama.cpp user would pick for it
GGUF_QUANT = {"int8": "q8_0", "w8a8": "q8_0", "int4": "q4_0", "w4a8": "q4_0"}
GGUF_DTYPE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
VLLM_PYTHON = Path("~/.cache/llm-recipes/venv-vllm/bin/python")


class _Clock(BaseStreamer):
    """Records the time of every generated step (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.start, self.times, self.prompt_seen = time.perf_counter(), [], False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter() - self.start)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def hf_model(model: CausalLM) -> transformers.PreTrainedModel:
    """The transformers implementation of this architecture holding our exact weights."""
    cls = getattr(transformers, model.hf_class_name)
    dtype = next(model.parameters()).dtype
    hf = cls._from_config(cls.config_class(**model.args.to_hf_config()), dtype=dtype)
    hf.load_state_dict(model.state_dict(), strict=False)
    return hf.to(next(model.parameters()).device).eval()


def hf_runner(model: CausalLM, max_batch: int, tokenizer: Any | None = None) -> Runner:
    hf = hf_model(model)
    eos = model.args.eos_ids
    stop = StopRule(eos, tokenizer)  # the engine's rule, applied to what generate() returned
    pad = eos[0] if eos else 0
    peak = [0]

    @torch.inference_mode()
    def generate(requests: list[Request]) -> list[Completion]:
        width = max(len(r.prompt) for r in requests)
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):  # left padding, as transformers expects for decoders
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        new = max(r.max_new_tokens for r in requests)
        s = requests[0].sampling
        clock = _Clock()
        out = hf.generate(
            ids.to(hf.device),
            attention_mask=mask.to(hf.device),
            max_new_tokens=new,
            # ignore_eos: EOS may be generated but does not stop (as in the engine);
            # min_new_tokens would instead forbid EOS and change the tokens.
            eos_token_id=None if requests[0].ignore_eos else eos,
            do_sample=s.do_sample,
            temperature=s.temperature if s.do_sample else None,
            top_k=s.top_k if s.do_sample else None,
            top_p=s.top_p if s.do_sample else None,
            repetition_penalty=s.repetition_penalty,
            no_repeat_ngram_size=s.no_repeat_ngram_size,
            pad_token_id=pad,
            streamer=clock,
            return_dict_in_generate=True,
        )
        cache = out.past_key_values
        peak[0] = max(peak[0], sum(x.keys.nbytes + x.values.nbytes for x in cache.layers))
        comps = []
        for i, r in enumerate(requests):
            generated = out.sequences[i, width : width + r.max_new_tokens].tolist()
            tokens, reason = stop.cut(r, generated, r.max_new_tokens)
            comps.append(Completion(tokens, reason, clock.times[: len(tokens)]))
        return comps

    @torch.inference_mode()
    def teacher_forced_logits(
        prompt: list[int], continuation: list[int], stepwise: bool = False
    ) -> torch.Tensor:
        """One forward, stepwise or not: a peer is scored on its prefill path (its decode
        kernels are not ours to compare)."""
        seq = torch.tensor([prompt + continuation[:-1]], device=hf.device)
        return hf(seq).logits[0, len(prompt) - 1 :].float()

    return Runner(
        generate,
        teacher_forced_logits,
        lambda: peak[0],
        lambda reqs: batches(reqs, max_batch),
    )


def gguf_format(quant: str, dtype: str) -> str:
    """The llama.cpp format of a row: its quantization's, else the model's dtype."""
    if quant == "none":
        return GGUF_DTYPE[dtype]
    if quant not in GGUF_QUANT:
        raise RecipeError(
            f"the llama_cpp peer has no format for quant.weights={quant!r}; it maps "
            + ", ".join(f"{q} to {f}" for q, f in GGUF_QUANT.items())
        )
    return GGUF_QUANT[quant]


def opt_quant(opts: list[str]) -> str:
    """quant.weights as these opts set it (each opt's yaml, or a row's own
    `quant.weights=...` override), "none" if none does."""
    from omegaconf import OmegaConf

    from common.core.config import CONFIG_DIR

    quant = "none"
    for entry in opts:
        key, eq, value = entry.partition("=")
        if eq:
            quant = value if key.lstrip("+") == "quant.weights" else quant
            continue
        opt = OmegaConf.load(CONFIG_DIR / "opt" / f"{entry}.yaml")
        quant = OmegaConf.select(opt, "quant.weights", default=quant)
    return quant


def peer_rows(peer: str, groups: list[list[str]], dtype: str) -> list[tuple[str, list[str]]]:
    """(row name, opts) of a peer's rows. llama_cpp: one row per llama.cpp format among the
    baseline and the rows (bf16 and q8_0 for a ladder ending in int8), with the opts of the
    first row of that format, from which the worker reads the quantization."""
    if peer == "hf":
        return [("hf generate()", [])]
    if peer == "vllm":
        return [("vLLM", [])]
    formats: dict[str, list[str]] = {}
    for opts in [[], *groups]:
        formats.setdefault(gguf_format(opt_quant(opts), dtype), opts)
    return [(f"llama.cpp {fmt}", opts) for fmt, opts in formats.items()]


def vllm_python(cfg: Any) -> Path:
    return Path(cfg.bench.peer_python or VLLM_PYTHON).expanduser()


def check_peer(peer: str, cfg: Any, model_cls: type[CausalLM], args: Any) -> None:
    """A peer that cannot run here: one line naming what to install or choose."""
    from common.io.gguf import check_supported

    if peer == "llama_cpp":
        check_supported(model_cls, args)
        missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
        if missing:
            raise RecipeError(
                f"bench.peers=[llama_cpp] needs {' and '.join(missing)} (not installed in "
                f"{sys.executable}); install it with {INSTALL['llama_cpp']}"
            )
        if cfg.generation.repetition_penalty != 1.0:
            raise RecipeError(
                "the llama_cpp peer penalizes repeats over its last 64 tokens only, unlike "
                "transformers; leave generation.repetition_penalty at 1.0 with it"
            )
    if peer == "vllm" and not os.access(vllm_python(cfg), os.X_OK):
        raise RecipeError(
            f"bench.peers=[vllm] needs vLLM's interpreter at {vllm_python(cfg)} (not found); "
            f"install it with {INSTALL['vllm']} or give bench.peer_python=PATH"
        )
    if peer == "vllm" and args.kv_head_dim < 32:
        raise RecipeError(
            f"vLLM's CPU attention runs head_dim 32 to 512; this model's is {args.kv_head_dim}"
        )


def _gguf_weights(path: Path) -> tuple[int, int]:
    """(bytes of all tensors, bytes a decode step reads: all but the embedding table,
    unless llama.cpp reads it as the tied output)."""
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    total = sum(sizes.values())
    return total, total - (sizes["token_embd.weight"] if "output.weight" in sizes else 0)


def llama_cpp_runner(model: CausalLM, cfg: Any, requests: list[Request], stop: StopRule) -> Runner:
    from common.bench.peer_process import (
        PeerProcess,
        sampling_message,
        server_runner,
        teacher_logits,
    )
    from common.io.export import gguf_file
    from common.parallel.memory import kv_bytes_per_token

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    fmt = gguf_format(cfg.quant.weights, dtype)
    f32 = gguf_file(model)
    n_ctx = max(len(r.prompt) + r.max_new_tokens for r in requests)
    setup = {
        "gguf": str(f32), "format": fmt, "n_ctx": n_ctx, "threads": torch.get_num_threads(),
        "seed": cfg.bench.seed, "eos": model.args.eos_ids,
        "sampling": sampling_message(requests[0].sampling),
    }  # fmt: skip
    proc = PeerProcess("llama_cpp", sys.executable, setup, {})
    path = Path(proc.call({"cmd": "info"})["file"])
    kv = n_ctx * kv_bytes_per_token(model.args, torch.float16)  # llama.cpp's default f16 KV
    return server_runner(proc, stop, 1, False, None, kv, _gguf_weights(path), teacher_logits)


def vllm_runner(
    model: CausalLM,
    cfg: Any,
    requests: list[Request],
    stop: StopRule,
    arrivals: list[float] | None,
    queued: bool,
) -> Runner:
    from common.bench.peer_process import (
        PeerProcess,
        sampling_message,
        server_runner,
        teacher_argmax,
    )
    from common.io.checkpoint import read_hf_config
    from common.io.export import hf_checkpoint
    from common.parallel.measured import decode_weight_bytes, weight_bytes
    from common.parallel.memory import kv_bytes_per_token

    dtype = next(model.parameters()).dtype
    path = cfg.model.path and Path(cfg.model.path).expanduser()
    loadable = path and any(path.glob("*.safetensors")) and read_hf_config(path).get("architectures")  # fmt: skip
    if not loadable:  # seeded weights, a pickle checkpoint or a config naming no class
        path = hf_checkpoint(model)
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    max_batch = cfg.scheduler.max_batch
    # KV space for max_batch sequences at the longest length (what our preallocated KV
    # holds), in vLLM's whole GiB, plus a fifth for its block rounding.
    kv_gib = max(1, math.ceil(1.2 * max_batch * max_len * kv_bytes_per_token(model.args, dtype) / 2**30))  # fmt: skip
    # vLLM's default layout on x86 keeps a core for its scheduler process (1 of 2 cores here);
    # by default it runs in one process on our rows' threads instead. Any of these set in the
    # environment wins (docs/peers.md).
    threads = torch.get_num_threads()
    cpus = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, "sched_getaffinity") else []
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)) or "auto",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "OMP_NUM_THREADS": str(threads),
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    setup = {
        "model": str(path), "dtype": str(dtype).removeprefix("torch."), "max_num_seqs": max_batch,
        "max_model_len": max_len, "prefix_cache": bool(cfg.kv_cache.prefix_cache),
        "seed": cfg.bench.seed, "eos": model.args.eos_ids,
        "sampling": sampling_message(requests[0].sampling),
    }  # fmt: skip
    proc = PeerProcess("vllm", str(vllm_python(cfg)), setup, env)
    one_call = queued or arrivals is not None
    weights = (weight_bytes(model), decode_weight_bytes(model))
    return server_runner(proc, stop, max_batch, one_call, arrivals, kv_gib << 30, weights, teacher_argmax)  # fmt: skip


def peer_runner(
    name: str,
    model: CausalLM,
    cfg: Any,
    requests: list[Request],
    arrivals: list[float] | None = None,
    queued: bool = False,
    tokenizer: Any | None = None,
) -> Runner:
    """transformers' generate() runs static batches of up to max_batch requests; llama.cpp
    one request at a time; vLLM schedules a whole queued (or arriving) workload at once."""
    if name == "hf":
        return hf_runner(model, cfg.scheduler.max_batch, tokenizer)
    if name not in PEERS:
        raise RecipeError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    check_peer(name, cfg, type(model), model.args)
    stop = StopRule(model.args.eos_ids, tokenizer)
    if name == "llama_cpp":
        return llama_cpp_runner(model, cfg, requests, stop)
    return vllm_runner(model, cfg, requests, stop, arrivals, queued)
