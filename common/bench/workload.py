"""Workloads: the requests a benchmark runs, built from the workload config group."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.core.errors import RecipeError
from common.core.request import Request

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = ("latency", "throughput", "shared_prefix", "online", "file", "vl")


def _span(value: Any) -> tuple[int, int]:
    """A length is an int or a [lo, hi] range (inclusive)."""
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    if not 0 < lo <= hi:
        raise RecipeError(f"workload length range {value} must satisfy 0 < lo <= hi")
    return lo, hi


def length_sampler(value: Any, mean: float | None = None) -> Callable[[random.Random], int]:
    """Uniform over the length range; with a mean (output lengths only), lo plus an
    exponential of that mean, capped at hi (long-tailed, like chat answers)."""
    lo, hi = _span(value)
    if mean is None:
        return lambda rng: rng.randint(lo, hi)
    if not lo < mean < hi:
        raise RecipeError(
            f"workload.new_tokens_mean={mean} must lie inside max_new_tokens [{lo}, {hi}]"
        )
    return lambda rng: min(hi, lo + round(rng.expovariate(1 / (mean - lo))))


def synthetic_requests(
    n: int,
    prompt_len: Any,
    max_new: Any,
    vocab: int,
    seed: int,
    ignore_eos: bool,
    new_mean: float | None = None,
) -> list[Request]:
    """Seeded random token ids (avoiding ids 0-2: pad/bos/eos in LLaMA vocabularies); output
    lengths uniform, or long-tailed around new_mean."""
    rng = random.Random(seed)
    prompt_len, max_new = length_sampler(prompt_len), length_sampler(max_new, new_mean)
    return [
        Request(
            prompt=[rng.randrange(3, vocab) for _ in range(prompt_len(rng))],
            max_new_tokens=max_new(rng),
            ignore_eos=ignore_eos,
        )
        for _ in range(n)
    ]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a token


def _chat_ids(messages: Any, tokenizer: Any, where: str) -> list[int]:
    """[{"role": ..., "content": ...}, ...] rendered by the tokenizer's chat template, with the
    assistant's turn opened (add_generation_prompt), as a chat server would."""
    if not (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
    ):
        raise RecipeError(f"{where}: messages must be a list of {{'role', 'content'}} objects")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            f"{where}: chat messages need a tokenizer with a chat template in model.path"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def file_requests(path: str, max_new: int, tokenizer, ignore_eos: bool) -> list[Request]:
    """One request per non-empty line: {"prompt": TEXT} or {"prompt_ids": [INT, ...]}, with
    an optional "max_new_tokens": INT. Any other line is `FILE:LINE: what is wrong`."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
        p = (
            ROOT / p
        )  # a file shipped with the project (configs/workload/chat_prompts.jsonl), from anywhere
    if not p.is_file():
        raise RecipeError(f"workload.path {path!r} is not a file")
    if not _is_int(max_new) or max_new <= 0:
        raise RecipeError(f"workload.max_new_tokens must be an int > 0, got {max_new!r}")
    requests = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise RecipeError(
                f"{path}:{i}: each line must be a JSON object such as "
                f'{{"prompt_ids": [1, 2, 3]}}, got {type(row).__name__} {line.strip()[:40]}'
            )
        if "prompt_ids" in row:
            ids = row["prompt_ids"]
        elif "messages" in row:
            ids = _chat_ids(row["messages"], tokenizer, f"{path}:{i}")
        elif "prompt" in row:
            if not isinstance(row["prompt"], str):
                raise RecipeError(f"{path}:{i}: prompt must be a string (text)")
            if tokenizer is None:
                raise RecipeError(
                    f"{path}:{i}: text prompts need a tokenizer in model.path; give prompt_ids instead"
                )
            ids = tokenizer(row["prompt"])["input_ids"]
        else:
            raise RecipeError(
                f"{path}:{i}: each line needs 'prompt' (text), 'messages' (chat) or 'prompt_ids' (ints)"
            )
        if not (isinstance(ids, list) and all(_is_int(t) for t in ids)):
            raise RecipeError(f"{path}:{i}: prompt_ids must be a list of ints")
        new = row.get("max_new_tokens", max_new)
        if not _is_int(new) or new <= 0:
            raise RecipeError(f"{path}:{i}: max_new_tokens must be an int > 0, got {new!r}")
        requests.append(Request(ids, new, ignore_eos=ignore_eos))
    if not requests:
        raise RecipeError(f"workload.path {path!r} holds no prompts")
    return requests


def build_requests(
    cfg: Any, vocab: int, tokenizer=None, model=None, model_path: str | None = None
) -> list[Request]:
    """model (possibly on the meta device) and its checkpoint dir: for workloads with images."""
    kind = cfg.kind
    if kind == "vl":
        from common.bench.vl_workload import vl_requests

        return vl_requests(cfg, model, tokenizer, model_path)
    if kind == "latency":
        count, plen, new = "num_prompts", cfg.prompt_len, cfg.max_new_tokens
    elif kind in ("throughput", "online"):
        count, plen, new = "num_requests", cfg.prompt_len, cfg.max_new_tokens
    elif kind == "shared_prefix":
        count, plen, new = "num_prompts", cfg.prompt_len, cfg.max_new_tokens
    elif kind == "file":
        if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, "path"):
            raise RecipeError("workload=file needs workload.path=FILE.jsonl")
        return file_requests(cfg.path, cfg.max_new_tokens, tokenizer, cfg.ignore_eos)
    else:
        raise RecipeError(f"unknown workload.kind {kind!r}; choose one of {', '.join(WORKLOADS)}")
    n = getattr(cfg, count)
    if n <= 0:  # no requests would leave every metric empty
        raise RecipeError(f"workload.{count} must be > 0, got {n}")
    if isinstance(new, int) and new <= 0:
        raise RecipeError(f"max_new_tokens must be > 0, got {new}")
    dist = cfg.get("new_tokens_dist", "uniform")
    if dist not in ("uniform", "exponential"):
        raise RecipeError(
            f"unknown workload.new_tokens_dist {dist!r}; choose uniform or exponential"
        )
    mean = cfg.new_tokens_mean if dist == "exponential" else None
    requests = synthetic_requests(n, plen, new, vocab, cfg.seed, cfg.ignore_eos, mean)
    if kind == "shared_prefix":  # one seeded system prompt in front of every question
        (prefix,) = synthetic_requests(1, cfg.prefix_len, 1, vocab, cfg.seed + 1, True)
        for r in requests:
            r.prompt = prefix.prompt + r.prompt
    return requests


def arrival_times(cfg: Any, n: int) -> list[float] | None:
    """Online workloads: seeded Poisson arrivals (exponential gaps) at cfg.rate requests/s."""
    if cfg.kind != "online":
        return None
    if cfg.rate <= 0:
        raise RecipeError(f"workload.rate must be > 0 requests/s, got {cfg.rate}")
    rng = random.Random(cfg.seed + 7)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(cfg.rate)
    return times


def batches(requests: list[Request], size: int) -> list[list[Request]]:
    """Static batching: fixed groups in arrival order."""
    if size <= 0:
        raise RecipeError(f"workload.batch_size must be > 0, got {size}")
    return [requests[i : i + size] for i in range(0, len(requests), size)]
