"""Generation: a scheduler plans each step, the model runner executes it, the stop rule
ends sequences. One path for every KV kind and scheduler kind: static batching (a batch
admitted together, waiting for its longest member) is a scheduler policy like continuous
batching. `arrivals` (seconds from the start) makes a call online: a request is visible
once it has arrived, and its times count from its arrival."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from common.core.errors import RecipeError
from common.core.request import Completion, Request
from common.device.select import Device
from common.engine.beam import BeamConfig, beam_search
from common.engine.multimodal import check_items
from common.engine.runner import ModelRunner
from common.engine.sampler import make_generator
from common.engine.scheduler import Scheduler, SchedulerParams, Sequence, Speculation
from common.engine.spec import Drafter, SpecConfig
from common.engine.spec.draft import DraftModelDrafter
from common.engine.spec.ngram import NgramDrafter
from common.engine.stop import StopRule
from common.kv.manager import KVManager, PagedKVManager, RowKVManager
from common.kv.paged import num_blocks_for
from common.kv.rows import RowStorage
from common.kv.spec import KVSpec
from common.nn.causal_lm import CausalLM


class Engine:
    def __init__(
        self,
        model: CausalLM,
        device: Device,
        kv_kind: str | KVSpec = "dynamic",
        attention: str = "eager",
        scheduler: SchedulerParams | None = None,
        tokenizer: Any | None = None,
        feature_cache_bytes: int | None = None,
        encode_overlap: bool = False,
        spec: SpecConfig | None = None,
        draft_model: CausalLM | None = None,
        beams: BeamConfig | None = None,
    ) -> None:
        """feature_cache_bytes: keep encoder features (images) in an LRU of this size, keyed
        by content; encode_overlap: encode waiting requests' content in a worker thread while
        the language model runs."""
        self.model, self.device = model, device
        self.kv = kv_kind if isinstance(kv_kind, KVSpec) else KVSpec(kv_kind)
        self.sched = scheduler or SchedulerParams()
        if not self.kv.paged and (
            self.sched.kind == "continuous" or self.sched.max_tokens_per_step is not None
        ):
            raise RecipeError(
                "continuous batching and chunked prefill schedule by sequence, which needs "
                f"paged KV (+opt=paged_kv), not kv_cache.kind={self.kv.kind}"
            )
        self.runner = ModelRunner(
            model, device, self.kv, attention, feature_cache_bytes, encode_overlap
        )
        self.stop = StopRule(model.args.eos_ids, tokenizer)
        if spec and self.kv.kind == "none":
            raise RecipeError(
                "speculative decoding verifies against stored KV; not kv_cache.kind=none"
            )
        self.beams = beams if beams and beams.num_beams > 1 else None
        if self.beams and (spec or self.kv.kind == "none"):
            raise RecipeError(
                "beam search needs stored KV and runs without speculative decoding "
                f"(got kv_cache.kind={self.kv.kind}, spec_decode {'on' if spec else 'off'})"
            )
        self.spec = spec
        self.drafter = self._drafter(spec, draft_model, attention) if spec else None
        self._gen: torch.Generator | None = None  # this call's generator (drafts draw from it)
        self._paged: PagedKVManager | None = None  # kept across calls, as a server's pool is
        self._paged_shape: tuple[int, int] | None = None

    @property
    def stats(self) -> Counter:
        encoder = self.runner.encoder
        if encoder is None:
            return self.runner.stats
        return self.runner.stats + Counter({f"encoder_{k}": v for k, v in encoder.stats.items()})

    @property
    def peak_kv_bytes(self) -> int:
        return self.runner.peak_kv_bytes

    @property
    def max_positions(self) -> int:
        return self.model.args.max_position_embeddings

    def _drafter(self, spec: SpecConfig, draft: CausalLM | None, attention: str) -> Drafter:
        if spec.method == "ngram":
            return NgramDrafter(spec.ngram_max, spec.ngram_min)
        if draft is None:
            raise RecipeError(
                "spec.method=draft needs a draft model (spec.draft.path or spec.draft.scale)"
            )
        return DraftModelDrafter(
            draft, self.model.args.vocab_size, self.device, attention,
            lambda seq_id, sampling: self.runner.generator_for(seq_id, sampling, self._gen),
        )  # fmt: skip

    def reset(self) -> None:
        """Forget counters and the paged pool (with its cached prefixes): a fresh server."""
        self.runner.stats.clear()
        if self.runner.encoder is not None:
            self.runner.encoder.reset()
        self._paged = self._paged_shape = None

    def check(self, req: Request) -> None:
        if not req.prompt:
            raise RecipeError("empty prompt: a request needs at least one token")
        if req.max_new_tokens <= 0:
            raise RecipeError(f"max_new_tokens must be > 0, got {req.max_new_tokens}")
        check_items(self.model, req)
        if len(req.prompt) >= self.max_positions:
            raise RecipeError(
                f"prompt of {len(req.prompt)} tokens does not fit the model's "
                f"{self.max_positions} max positions (need room for at least one new token)"
            )
        vocab = self.model.args.vocab_size
        if max(req.prompt) >= vocab or min(req.prompt) < 0:
            raise RecipeError(f"prompt token ids must be in [0, {vocab}) for this model")
        if req.stop_strings and self.stop.tokenizer is None:
            raise RecipeError("stop strings need a tokenizer (model.path with tokenizer files)")

    def _kv_manager(self, max_batch: int, longest: int) -> KVManager:
        if not self.kv.paged:  # a row padded to a speculation's k + 1 tokens needs k more slots
            return RowKVManager(self.kv.kind != "none", self.spec.k if self.spec else 0)
        self.runner.decode_slots = max_batch
        if self._paged_shape is None or self._paged_shape < (max_batch, longest):
            # The pool outlives a call, as a server's does: cached prefix blocks serve later calls.
            n = num_blocks_for(self.kv, *self.runner.dims, self.runner.dtype, max_batch, longest)
            self._paged = PagedKVManager(n, self.kv.block_size, self.kv.prefix_cache)
            self._paged_shape = (max_batch, longest)
            self.runner.storage = self.runner.new_paged(n)
        return self._paged

    @torch.inference_mode()
    def generate(
        self, requests: list[Request], seed: int | None = 0, arrivals: list[float] | None = None
    ) -> list[Completion]:
        for r in requests:
            self.check(r)
        budgets = [min(r.max_new_tokens, self.max_positions - len(r.prompt)) for r in requests]
        if self.beams:
            return self._beam_search(requests, budgets)
        seqs = [
            Sequence(
                i, list(r.prompt), budgets[i], r.sampling, r, r.priority,
                arrivals[i] if arrivals else 0.0, self.runner.prepare(r),
            )
            for i, r in enumerate(requests)
        ]  # fmt: skip
        config = self.sched
        if config.max_batch is None:
            config = replace(config, max_batch=len(requests))
        longest = max(len(r.prompt) + b for r, b in zip(requests, budgets))
        kv = self._kv_manager(config.max_batch, longest)
        speculation = None
        if self.drafter is not None:
            self.drafter.reset()
            speculation = Speculation(self.spec.k, self.drafter.propose, self.spec.max_batch)
        scheduler = Scheduler(kv, config, self.stop, speculation)
        pending = deque(sorted(seqs, key=lambda s: s.arrival))
        gen = self._gen = make_generator(seed, self.device.torch)
        self.runner.generators.clear()
        start = time.perf_counter()
        while pending or scheduler.has_work():
            now = time.perf_counter() - start
            while pending and pending[0].arrival <= now:
                scheduler.add(pending.popleft())
            if not scheduler.has_work():
                time.sleep(max(0.0, pending[0].arrival - now))
                continue
            plan = scheduler.schedule()
            if self.runner.encoder is not None:  # overlap: encode who waits while others run
                self.runner.encoder.prefetch([s.extras for s in scheduler.waiting])
            draft_probs = self.drafter.probs if self.drafter else None
            sampled, _ = self.runner.execute(plan, gen, draft_probs=draft_probs)
            self.runner.track(kv.usage())
            if sampled:
                self.device.synchronize()
                scheduler.update(plan, sampled, time.perf_counter() - start)
            else:
                scheduler.update(plan, {}, 0.0)
        if self.drafter is not None:
            self.drafter.reset()  # its per-sequence draft KV
        return [
            Completion(
                s.output, s.finish_reason, s.token_times, s.preemptions,
                truncated=s.finish_reason == "length" and len(s.output) < s.request.max_new_tokens,
            )
            for s in seqs
        ]  # fmt: skip

    def _beam_search(self, requests: list[Request], budgets: list[int]) -> list[Completion]:
        """Each request's beams run as one batch; requests one after another."""
        out = []
        for r, limit in zip(requests, budgets):
            kv = self._kv_manager(self.beams.num_beams, len(r.prompt) + limit)
            paged = kv if isinstance(kv, PagedKVManager) else None
            out.append(beam_search(self.runner, paged, r, limit, self.stop.eos, self.beams))
        return out

    @torch.inference_mode()
    def teacher_forced_logits(
        self,
        prompt: list[int],
        continuation: list[int],
        mm_items: tuple = (),
        stepwise: bool = False,
    ) -> Tensor:
        """Logits [len(continuation), V] predicting each continuation token from all before it
        (stepwise: through decode steps, as generated; see ModelRunner.teacher_forced_logits)."""
        return self.runner.teacher_forced_logits(prompt, continuation, mm_items, stepwise)

    # One forward on a row storage of one's own (the HF oracle tests drive the model so).
    def new_cache(self, batch: int, max_len: int) -> RowStorage:
        return self.runner.new_rows(batch, max_len)

    def forward(self, cache: RowStorage, ids: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        return self.runner.forward(cache, ids, positions, valid)
