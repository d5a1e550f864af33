"""Generation over a KV cache: batched prefill, batched decode, sampling, stopping.

The engine owns no policy: a scheduler (static batches here) decides which requests run
together; the engine runs them. Rows are right-padded; each row keeps its own positions,
so a prompt gives the same greedy output alone or inside a padded batch.
"""

from __future__ import annotations

import time
from collections import Counter, deque

import torch
from torch import Tensor

from common.attention.backends import get_backend
from common.attention.meta import Backend, ForwardContext
from common.core.errors import RecipeError
from common.core.request import Completion, Request
from common.device.select import Device
from common.engine.sampler import make_generator, sample
from common.engine.scheduler import Scheduler, Sequence, Work
from common.kv.cache import KVCache, KVSpec, NoCache, make_cache
from common.nn.causal_lm import CausalLM


def _pad(
    rows: list[list[int]], device: torch.device, starts: list[int] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad to [B, T]; row i's tokens sit at positions starts[i], starts[i] + 1, ...
    Positions keep counting past each row's end (harmless: those tokens are invalid)."""
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    offsets = torch.arange(t).expand(len(rows), t)
    valid = offsets < torch.tensor([len(r) for r in rows])[:, None]
    positions = offsets + torch.tensor(starts or [0] * len(rows))[:, None]
    return ids.to(device), positions.to(device), valid.to(device)


class Engine:
    def __init__(
        self,
        model: CausalLM,
        device: Device,
        kv_kind: str | KVSpec = "dynamic",
        attention: str = "eager",
    ) -> None:
        self.model, self.device = model, device
        self.kv = kv_kind if isinstance(kv_kind, KVSpec) else KVSpec(kv_kind)
        self.backend: Backend = get_backend(attention, device, paged=self.kv.kind == "paged")
        self.kv_dtype = next(model.parameters()).dtype  # the activation dtype
        self.peak_kv_bytes = 0  # reserved at the fullest moment
        # decode_steps, decode_ctx_tokens (KV read), useful_row_steps / capacity_row_steps,
        # kv_reserved_byte_steps / kv_used_byte_steps
        self.stats: Counter[str] = Counter()
        self._pool: KVCache | None = None  # serve()'s paged pool, kept across calls
        self._pool_shape: tuple[int, int] | None = None

    def reset(self) -> None:
        """Forget counters and the paged pool (with its cached prefixes): a fresh server."""
        self.stats.clear()
        self._pool = self._pool_shape = None

    @property
    def max_positions(self) -> int:
        return self.model.args.max_position_embeddings

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a = self.model.args
        return make_cache(
            self.kv,
            a.num_hidden_layers,
            a.num_key_value_heads,
            a.kv_head_dim,
            batch,
            max_len,
            self.kv_dtype,
            self.device.torch,
        )

    def _count_decode(self, ctx_tokens: int, rows: int, capacity: int) -> None:
        self.stats.update(
            decode_steps=1,
            decode_ctx_tokens=ctx_tokens,
            useful_row_steps=rows,
            capacity_row_steps=capacity,
        )

    def _track(self, cache: KVCache) -> None:
        """Per step: peak reserved bytes, and reserved vs used summed over steps (the
        time-averaged share of reserved KV that holds real tokens)."""
        reserved = cache.nbytes()
        self.peak_kv_bytes = max(self.peak_kv_bytes, reserved)
        self.stats.update(
            kv_steps=1, kv_reserved_byte_steps=reserved, kv_used_byte_steps=cache.used_bytes()
        )

    def forward(
        self,
        cache: KVCache,
        ids: Tensor,
        positions: Tensor,
        valid: Tensor,
        seq_ids: list[int] | None = None,
    ) -> Tensor:
        """One model pass over new tokens [B, T]; returns final hidden states [B, T, H]."""
        ctx = ForwardContext(cache, self.backend, cache.begin(positions, valid, seq_ids))
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
        if self.kv.kind == "paged":  # sequences own blocks: the scheduler's static mode
            return self.serve(requests, "static", max_batch=len(requests), seed=seed)
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
            self._track(cache)
            if all(done):
                return outs
            self._count_decode(sum(map(len, seqs)), len(seqs) - sum(done), len(seqs))
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
        cache = self.new_cache(1, len(seq))
        cache.admit(0, seq[:-1])
        hidden = self.forward(cache, ids, positions, valid, [0])
        return self.model.logits(hidden[0, len(prompt) - 1 :]).float()

    @torch.inference_mode()
    def serve(
        self,
        requests: list[Request],
        kind: str = "continuous",
        policy: str = "fcfs",
        max_batch: int = 8,
        max_tokens_per_step: int | None = None,
        arrivals: list[float] | None = None,
        seed: int | None = 0,
    ) -> list[Completion]:
        """Iteration-level serving over paged KV: every step the scheduler picks the work
        (prefill chunks and decodes), finished sequences retire at once, and waiting ones
        take their place. `arrivals` (seconds from the start) makes it online: a request is
        visible once it has arrived, and its times count from its arrival."""
        if self.kv.kind != "paged":
            raise RecipeError(
                f"scheduling by sequence needs paged KV (+opt=paged_kv), not kv_cache.kind={self.kv.kind}"
            )
        for r in requests:
            self.check(r)
        longest = min(self.max_positions, max(len(r.prompt) + r.max_new_tokens for r in requests))
        if self._pool_shape is None or self._pool_shape < (max_batch, longest):
            # The pool outlives a call, as a server's does: cached prefix blocks serve later calls.
            self._pool, self._pool_shape = self.new_cache(max_batch, longest), (max_batch, longest)
        cache = self._pool
        scheduler = Scheduler(cache, kind, policy, max_batch, max_tokens_per_step)
        seqs = [
            Sequence(
                i,
                list(r.prompt),
                min(r.max_new_tokens, self.max_positions - len(r.prompt)),
                r.sampling,
                r.ignore_eos,
                r.priority,
                arrivals[i] if arrivals else 0.0,
            )
            for i, r in enumerate(requests)
        ]
        pending = deque(sorted(seqs, key=lambda s: s.arrival))
        eos = set(self.model.args.eos_ids)
        gen = make_generator(seed, self.device.torch)
        start = time.perf_counter()
        while pending or scheduler.has_work():
            now = time.perf_counter() - start
            while pending and pending[0].arrival <= now:
                scheduler.add(pending.popleft())
            if not scheduler.has_work():
                time.sleep(max(0.0, pending[0].arrival - now))
                continue
            work = scheduler.schedule()
            # Decodes (one token each) and prefill chunks run as two forwards of the same step,
            # so short decode rows are never padded to a long prompt.
            sampled: list[tuple[Sequence, Tensor]] = []
            decodes = [w for w in work if w.num_tokens == 1]
            if decodes:
                ctx = sum(w.seq.num_computed + 1 for w in decodes)
                self._count_decode(ctx, len(decodes), scheduler.max_batch)
            for group in (decodes, [w for w in work if w.num_tokens > 1]):
                if group:
                    sampled += self._run(cache, group)
            self._track(cache)
            if not sampled:
                continue
            logits = torch.cat([row for _, row in sampled])
            batch = [s for s, _ in sampled]
            tokens = sample(
                logits.float(), [s.tokens for s in batch], [s.sampling for s in batch], gen
            )
            self.device.synchronize()
            now = time.perf_counter() - start
            for seq, tok in zip(batch, tokens.tolist()):
                seq.output.append(tok)
                seq.token_times.append(now - seq.arrival)
                if tok in eos and not seq.ignore_eos:
                    seq.finish_reason = "eos"
                elif len(seq.output) >= seq.max_new_tokens:
                    seq.finish_reason = "length"
                if seq.finish_reason:
                    scheduler.retire(seq)
        return [Completion(s.output, s.finish_reason, s.token_times, s.preemptions) for s in seqs]

    def _run(self, cache: KVCache, group: list[Work]) -> list[tuple[Sequence, Tensor]]:
        """Feed each sequence its scheduled tokens; logits for those that reach their end."""
        rows = [w.seq.tokens[w.seq.num_computed : w.seq.num_computed + w.num_tokens] for w in group]
        starts = [w.seq.num_computed for w in group]
        ids, positions, valid = _pad(rows, self.device.torch, starts)
        hidden = self.forward(cache, ids, positions, valid, [w.seq.id for w in group])
        picked = [i for i, w in enumerate(group) if w.samples]
        # One LM-head matmul for all sampled rows: it reads the whole head once, not per row.
        index = torch.tensor(
            [[i, group[i].num_tokens - 1] for i in picked], dtype=torch.long, device=hidden.device
        ).view(-1, 2)
        logits = self.model.logits(hidden[index[:, 0], index[:, 1]]) if picked else None
        for w in group:
            w.seq.num_computed += w.num_tokens
            cache.commit(w.seq.id, w.seq.tokens[: w.seq.num_computed])
        return [(group[i].seq, logits[j : j + 1]) for j, i in enumerate(picked)]
