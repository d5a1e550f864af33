"""Generation over a KV cache: batched prefill, batched decode, sampling, stopping.

The engine owns no policy: a scheduler (static batches here) decides which requests run
together; the engine runs them. Rows are right-padded; each row keeps its own positions,
so a prompt gives the same greedy output alone or inside a padded batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from common.attention import Backend, ForwardContext, get_backend
from common.device import Device
from common.errors import RecipeError
from common.kv_cache import KVCache, NoCache, make_cache
from common.model_base import CausalLM
from common.sampling import SamplingParams, make_generator, sample


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False  # benchmarks fix the output length, as vLLM's benchmarks do


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "eos" | "length"
    token_times: list[float]  # seconds from the batch start to each generated token

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def _pad(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad to [B, T]; positions keep counting past each row's end (harmless, masked)."""
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    positions = torch.arange(t).expand(len(rows), t)
    valid = positions < torch.tensor([len(r) for r in rows])[:, None]
    return ids.to(device), positions.to(device), valid.to(device)


class Engine:
    def __init__(
        self,
        model: CausalLM,
        device: Device,
        kv_kind: str = "dynamic",
        attention: str = "eager",
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.device, self.kv_kind = model, device, kv_kind
        self.backend: Backend = get_backend(attention, device)
        self.kv_dtype = kv_dtype or next(model.parameters()).dtype
        make_cache(kv_kind, 0, 0, 0, 0, 0, self.kv_dtype, device.torch)  # validate the kind now
        self.peak_kv_bytes = 0

    @property
    def max_positions(self) -> int:
        return self.model.args.max_position_embeddings

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.model.args
        return make_cache(
            self.kv_kind,
            a.num_hidden_layers,
            batch,
            a.num_key_value_heads,
            a.kv_head_dim,
            max_len,
            self.kv_dtype,
            self.device.torch,
        )

    def forward(self, cache: KVCache, ids: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """One model pass over new tokens [B, T]; returns final hidden states [B, T, H]."""
        ctx = ForwardContext(cache, self.backend, cache.begin(positions, valid))
        return self.model(ids, positions, ctx)

    def check(self, req: Request) -> None:
        if not req.prompt:
            raise RecipeError("empty prompt: a request needs at least one token")
        if req.max_new_tokens <= 0:
            raise RecipeError(f"max_new_tokens must be > 0, got {req.max_new_tokens}")
        if len(req.prompt) >= self.max_positions:
            raise RecipeError(
                f"prompt of {len(req.prompt)} tokens does not fit the model's "
                f"{self.max_positions} max positions (need room for at least one new token)"
            )
        vocab = self.model.args.vocab_size
        if max(req.prompt) >= vocab or min(req.prompt) < 0:
            raise RecipeError(f"prompt token ids must be in [0, {vocab}) for this model")

    @torch.inference_mode()
    def generate(self, requests: list[Request], seed: int | None = 0) -> list[Completion]:
        """Run one static batch to completion: it ends when its longest member ends."""
        for r in requests:
            self.check(r)
        budgets = [min(r.max_new_tokens, self.max_positions - len(r.prompt)) for r in requests]
        seqs = [list(r.prompt) for r in requests]
        params = [r.sampling for r in requests]
        eos = set(self.model.args.eos_ids)
        done = [False] * len(requests)
        outs = [Completion([], "length", []) for _ in requests]
        gen = make_generator(seed, self.device.torch)
        cache = self.new_cache(len(requests), max(len(s) + b for s, b in zip(seqs, budgets)))
        dev = self.device.torch
        start = time.perf_counter()
        ids, positions, valid = _pad(seqs, dev)
        last = torch.tensor([len(s) - 1 for s in seqs], device=dev)
        while True:
            hidden = self.forward(cache, ids, positions, valid)
            logits = self.model.logits(hidden[torch.arange(len(seqs), device=dev), last])
            tokens = sample(logits.float(), seqs, params, gen).tolist()
            self.device.synchronize()
            now = time.perf_counter() - start
            for i, tok in enumerate(tokens):
                if done[i]:
                    continue
                seqs[i].append(tok)
                outs[i].tokens.append(tok)
                outs[i].token_times.append(now)
                if tok in eos and not requests[i].ignore_eos:
                    done[i], outs[i].finish_reason = True, "eos"
                elif len(outs[i].tokens) >= budgets[i]:
                    done[i] = True
            if all(done):
                self.peak_kv_bytes = max(self.peak_kv_bytes, cache.nbytes())
                return outs
            if cache.recompute:  # no KV cache: feed every token again
                cache = NoCache()
                ids, positions, valid = _pad(seqs, dev)
                last = torch.tensor([len(s) - 1 for s in seqs], device=dev)
            else:  # finished rows re-feed their last position: the batch waits, slots stay put
                ids = torch.tensor([[s[-1]] for s in seqs], device=dev)
                last = torch.zeros(len(seqs), dtype=torch.long, device=dev)
                positions = torch.tensor([[len(s) - 1] for s in seqs], device=dev)
                valid = torch.ones_like(ids, dtype=torch.bool)

    @torch.inference_mode()
    def teacher_forced_logits(self, prompt: list[int], continuation: list[int]) -> Tensor:
        """Logits [len(continuation), V] predicting each continuation token from all before it."""
        seq = prompt + continuation
        ids, positions, valid = _pad([seq[:-1]], self.device.torch)
        hidden = self.forward(self.new_cache(1, len(seq)), ids, positions, valid)
        return self.model.logits(hidden[0, len(prompt) - 1 :]).float()
