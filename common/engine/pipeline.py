"""Pipeline parallel: decoder layers split into stages, one rank each, micro-batches in flight.

A static batch splits into `micro_batches` micro-batches, each with its own KV rows. Every
stage walks the same fixed schedule (micro-batch 0, 1, ..., M-1, then the next step of each):
stage s receives a micro-batch's hidden states from stage s-1, runs its layers and passes
them on with a non-blocking send, so while stage 1 works on micro-batch 0, stage 0 already
works on micro-batch 1. The last stage samples and sends the tokens back to stage 0, which
needs them only when that micro-batch's next step comes round: with M >= stages, decode
keeps every stage busy (GPipe's bubble (p-1)/(M+p-1) is the prefill's; decode has none in
steady state), with M = 1 stages take turns.

The schedule is known in advance on every rank (a micro-batch runs until its longest
request's budget; a row stopped early by EOS keeps feeding its last token, as a static
batch does, and its output is cut afterwards), so no stage waits on a decision it cannot see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from common.attention.meta import ForwardContext
from common.core.errors import RecipeError
from common.core.request import Completion, Request
from common.engine.runner import pad_rows
from common.engine.sampler import make_generator, sample_with_probs
from common.engine.stop import StopRule
from common.kv.rows import RowStorage, make_rows
from common.kv.spec import KVSpec
from common.nn.causal_lm import CausalLM


@dataclass
class _MicroBatch:
    requests: list[Request]
    steps: int  # forwards: the prefill, then decodes up to the longest budget
    storage: RowStorage
    tokens: list[list[int]] = field(default_factory=list)  # generated so far, per row
    times: list[list[float]] = field(default_factory=list)


class Pipeline:
    """One rank's stage of a pipeline-parallel model, and the generation schedule."""

    def __init__(
        self,
        model: CausalLM,
        stage: int,
        stages: int,
        device: torch.device,
        spec: KVSpec,
        backend: Any,
        micro_batches: int,
        group: Any = None,
    ) -> None:
        if spec.kind not in ("dynamic", "contiguous"):
            raise RecipeError(
                "pipeline parallel keeps each micro-batch's KV in rows: kv_cache.kind must be "
                f"dynamic or contiguous (+opt=static_kv), not {spec.kind}"
            )
        self.model, self.stage, self.stages = model, stage, stages
        self.first, self.last = stage == 0, stage == stages - 1
        self.device, self.spec, self.backend, self.group = device, spec, backend, group
        self.micro_batches = micro_batches
        self.dtype = next(model.parameters()).dtype
        self.stop = StopRule(model.args.eos_ids)
        self.busy_s = self.wall_s = 0.0  # this stage's compute time and the calls' span
        self.stage_busy: list[float] = []  # every stage's, gathered after each call
        self.peak_kv_bytes = 0

    # -- one stage's forward
    def _forward(self, x: Tensor, positions: Tensor, valid: Tensor, storage: RowStorage) -> Tensor:
        decoder = self.model.model
        ctx = ForwardContext(storage, self.backend, storage.begin(positions, valid))
        h = decoder.embed_tokens(x) if self.first else x
        cos, sin = decoder.rotary_emb(positions, self.dtype)
        out, residual = h, None  # the residual stream is carried apart, as in nn/decoder.py
        for layer in decoder.layers.values():
            out, residual = layer(out, residual, cos, sin, ctx)
        return decoder.norm.add(out, residual)[0] if self.last else out + residual

    def _send(self, t: Tensor, dst_stage: int, pending: list) -> None:
        pending.append((dist.isend(t.contiguous(), self._rank(dst_stage), self.group), t))

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src_stage: int) -> Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, self._rank(src_stage), self.group)
        return t

    def _rank(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage) if self.group is not None else stage

    def _step_inputs(self, mb: _MicroBatch, step: int) -> tuple[list[list[int]], list[int]]:
        """Each row's tokens and first position at `step` (stage 0 knows the token values;
        the other stages only their count and positions)."""
        if step == 0:
            return [r.prompt for r in mb.requests], [0] * len(mb.requests)
        last = [t[-1] if t else 0 for t in mb.tokens]
        return [[x] for x in last], [len(r.prompt) + step - 1 for r in mb.requests]

    # -- generation
    @torch.inference_mode()
    def generate(self, requests: list[Request], seed: int | None = 0) -> list[Completion]:
        n = min(self.micro_batches, len(requests))
        size = -(-len(requests) // n)
        limit = self.model.args.max_position_embeddings
        budgets = [min(r.max_new_tokens, limit - len(r.prompt)) for r in requests]
        mbs = []
        for i in range(0, len(requests), size):
            reqs, bud = requests[i : i + size], budgets[i : i + size]
            longest = max(len(r.prompt) + b for r, b in zip(reqs, bud))
            storage = self._storage(len(reqs), longest)
            mbs.append(_MicroBatch(reqs, max(bud), storage, [[] for _ in reqs], [[] for _ in reqs]))
        gen = make_generator(seed, self.device) if self.last else None
        pending: list = []
        busy, start = 0.0, time.perf_counter()
        # Stage 0 takes each micro-batch's tokens from the last stage one step later, in
        # the order they were sent; the extra round receives the final ones.
        rounds = max(mb.steps for mb in mbs) + (self.first and not self.last)
        for step in range(rounds):
            for mb in mbs:
                if step > mb.steps or (step == mb.steps and not self.first):
                    continue
                if self.first and step > 0:
                    got = self._recv((len(mb.requests),), torch.long, self.stages - 1)
                    self._append(mb, got.tolist(), start)
                if step == mb.steps:
                    continue
                rows, starts = self._step_inputs(mb, step)
                ids, positions, valid = pad_rows(rows, starts, self.device)
                if not self.first:
                    shape = (*ids.shape, self.model.args.hidden_size)
                    x = self._recv(shape, self.dtype, self.stage - 1)
                t0 = time.perf_counter()
                h = self._forward(ids if self.first else x, positions, valid, mb.storage)
                if not self.last:
                    busy += time.perf_counter() - t0
                    self._send(h, self.stage + 1, pending)
                    continue
                index = torch.tensor([len(r) - 1 for r in rows], device=h.device)
                logits = self.model.logits(h[torch.arange(len(rows)), index]).float()
                histories = [r.prompt + t for r, t in zip(mb.requests, mb.tokens)]
                sampling = [r.sampling for r in mb.requests]
                tokens = sample_with_probs(logits, histories, sampling, gen, False)[0]
                busy += time.perf_counter() - t0
                self._append(mb, tokens.tolist(), start)  # the sampler's histories
                self._send(tokens, 0, pending)
            self.peak_kv_bytes = max(self.peak_kv_bytes, sum(mb.storage.nbytes() for mb in mbs))
            pending = self._settle(pending, keep_last=True)
        self._settle(pending, keep_last=False)
        self.wall_s, self.busy_s = time.perf_counter() - start, busy
        self._gather_busy()
        # every rank returns the last stage's view: each token when it was sampled (times
        # count from each rank's own start; the previous call's collectives align them)
        box = [[(mb.tokens, mb.times) for mb in mbs]]
        dist.broadcast_object_list(box, src=self._rank(self.stages - 1), group=self.group)
        for mb, (tokens, times) in zip(mbs, box[0]):
            mb.tokens, mb.times = tokens, times
        return [self._completion(r, t, ts, b) for r, t, ts, b in self._rows(mbs, budgets)]

    def _rows(self, mbs: list[_MicroBatch], budgets: list[int]):
        rows = [(r, t, ts) for mb in mbs for r, t, ts in zip(mb.requests, mb.tokens, mb.times)]
        return [(*row, b) for row, b in zip(rows, budgets)]

    def _append(self, mb: _MicroBatch, tokens: list[int], start: float) -> None:
        now = time.perf_counter() - start
        for i, tok in enumerate(tokens):
            mb.tokens[i].append(tok)
            mb.times[i].append(now)

    def _completion(self, req: Request, tokens: list[int], times: list[float], budget: int):
        """A row's tokens, cut where the stop rule ends it."""
        tokens, reason = self.stop.cut(req, tokens[:budget], budget) if tokens else ([], "length")
        truncated = reason == "length" and len(tokens) < req.max_new_tokens
        return Completion(tokens, reason, times[: len(tokens)], 0, truncated)

    @staticmethod
    def _settle(pending: list, keep_last: bool) -> list:
        """Wait for sends of earlier steps (their buffers are then free); the newest may
        still be in flight while the receiver catches up."""
        keep = pending[-1:] if keep_last else []
        for work, _ in pending[: len(pending) - len(keep)]:
            work.wait()
        return keep

    def _gather_busy(self) -> None:
        busy = [0.0] * self.stages
        dist.all_gather_object(busy, self.busy_s, group=self.group)
        self.stage_busy = busy

    def _storage(self, rows: int, max_len: int) -> RowStorage:
        a = self.model.args
        return make_rows(
            self.spec, len(self.model.model.layers), a.num_key_value_heads, a.kv_head_dim,
            rows, max_len, self.dtype, self.device,
        )  # fmt: skip

    @torch.inference_mode()
    def teacher_forced_logits(
        self, prompt: list[int], continuation: list[int], stepwise: bool = False
    ) -> Tensor:
        """Logits [len(continuation), V] on stage 0 (the last stage sends them); other
        stages return zeros of that shape. One forward, stepwise or not (not yet through
        the stages' decode steps)."""
        fed = prompt + continuation[:-1]
        ids, positions, valid = pad_rows([fed], [0], self.device)
        storage = self._storage(1, len(fed) + 1)
        shape = (len(continuation), self.model.args.vocab_size)
        if not self.first:
            x = self._recv((*ids.shape, self.model.args.hidden_size), self.dtype, self.stage - 1)
        h = self._forward(ids if self.first else x, positions, valid, storage)
        pending: list = []
        if not self.last:
            self._send(h, self.stage + 1, pending)
            out = self._recv(shape, torch.float32, self.stages - 1) if self.first else None
        else:
            out = self.model.logits(h[0, len(prompt) - 1 :]).float()
            if not self.first:
                self._send(out, 0, pending)
        self._settle(pending, keep_last=False)
        return out if out is not None else torch.zeros(shape)

    def stats(self) -> dict:
        """The pipeline bubble of the last call: the share of the span each stage sat idle."""
        if not self.wall_s:
            return {}
        idle = [1 - b / self.wall_s for b in self.stage_busy]
        return {"bubble_pct": 100.0 * sum(idle) / len(idle)}
