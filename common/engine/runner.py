"""The model runner: turns the scheduler's StepPlan into batches, runs the model, samples.

Row storage (dynamic, contiguous, none) advances every row of its static batch in one
forward: rows are right-padded, each with its own positions, and a row whose sequence has
finished repeats its last token until the batch ends (what a padded static batch costs).
Paged storage runs a step of decodes alone as rows of one token (padded to fixed row counts
for a compiled step), and a step with prompt chunks as one packed forward: every sequence's
tokens one after another in a single row (vLLM's varlen batch), so no row is padded to the
longest prompt and the decodes share the chunks' pass over the weights; block tables say
where each sequence's K/V live.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common.attention.backends import get_backend
from common.attention.meta import ForwardContext
from common.core.request import MultimodalItem, Request, SamplingParams
from common.device.select import Device
from common.engine.multimodal import Encoder, SeqContent, model_inputs
from common.engine.plan import ScheduledSeq, StepPlan
from common.engine.sampler import make_generator, process_logits, sample_with_probs
from common.engine.spec.verify import verify
from common.kv.paged import PagedStorage
from common.kv.rows import RowStorage, make_rows
from common.kv.spec import KVSpec
from common.nn.causal_lm import CausalLM, MultimodalLM


def pad_rows(
    rows: list[list[int]], starts: list[int], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, positions, valid) [B, T], right-padded; row i's tokens sit at positions
    starts[i], starts[i] + 1, ... Positions keep counting past a row's end (those are invalid)."""
    lens = [len(r) for r in rows]
    t = max(lens)
    if min(lens) == t == 1:  # a decode step: nothing to pad
        ids = torch.tensor(rows, dtype=torch.long)
        return (
            ids.to(device),
            torch.tensor(starts)[:, None].to(device),
            torch.ones_like(ids, dtype=torch.bool).to(device),
        )
    ids = torch.tensor([r + [0] * (t - len(r)) for r in rows], dtype=torch.long)
    offsets = torch.arange(t)
    positions = offsets + torch.tensor(starts)[:, None]
    valid = offsets < torch.tensor(lens)[:, None]
    return ids.to(device), positions.to(device), valid.to(device)


Rows = list[tuple[SeqContent | None, int, int]]  # per batch row: (content, chunk start, length)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        device: Device,
        spec: KVSpec,
        attention: str,
        feature_cache_bytes: int | None = None,
        encode_overlap: bool = False,
    ) -> None:
        self.model, self.device, self.spec = model, device, spec
        self.encoder = (
            Encoder(model, device.torch, feature_cache_bytes, encode_overlap)
            if isinstance(model, MultimodalLM)
            else None
        )
        self.backend = get_backend(attention, device, paged=spec.paged)
        self.dtype = next(model.parameters()).dtype  # the activation dtype, K/V's too
        a = model.args
        # a tensor-parallel rank stores only its KV heads
        self.kv_heads = model.kv_head_range or (0, a.num_key_value_heads)
        kv_heads = self.kv_heads[1] - self.kv_heads[0]
        self.dims = (a.num_hidden_layers, kv_heads, a.kv_head_dim)
        self.storage: RowStorage | PagedStorage | None = None
        self.decode_slots = 1  # paged, static: the most rows a decode forward pads to (max batch)
        self.history: list[list[int] | None] = []  # row storage: each row's tokens so far
        self.peak_kv_bytes = 0  # reserved at the fullest moment
        # decode_steps, decode_ctx_tokens (KV read), useful_row_steps / capacity_row_steps,
        # kv_steps, kv_reserved_byte_steps / kv_used_byte_steps
        # + spec_steps, spec_proposed, spec_accepted (speculative decoding)
        self.stats: Counter[str] = Counter()
        self.generators: dict[int, torch.Generator] = {}  # per sequence with a seed

    # -- storage
    def new_rows(self, rows: int, max_len: int) -> RowStorage:
        layers, heads, dim = self.dims
        return make_rows(
            self.spec, layers, heads, dim, rows, max_len, self.dtype, self.device.torch
        )

    def new_paged(self, num_blocks: int) -> PagedStorage:
        layers, _, dim = self.dims
        return PagedStorage(
            layers, self.kv_heads, dim, num_blocks, self.spec.block_size,
            self.dtype, self.device.torch, self.spec.int8, self.spec.static,
        )  # fmt: skip

    # -- forward
    def forward(
        self,
        storage: RowStorage | PagedStorage,
        ids: Tensor,
        positions: Tensor,
        valid: Tensor,
        paged: tuple | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Tensor:
        """One model pass over new tokens [B, T]; returns final hidden states [B, T, H].
        paged: (block tables, slots, seq lens[, query lengths of a packed row]); extra:
        model inputs passed through as is (e.g. image embeddings, see `extras`)."""
        meta = storage.begin(positions, valid, *paged) if paged else storage.begin(positions, valid)
        ctx = ForwardContext(storage, self.backend, meta)
        return (
            self.model(ids, positions, ctx, **extra) if extra else self.model(ids, positions, ctx)
        )

    def extras(self, rows: Rows, positions: Tensor, packed: bool = False) -> dict[str, Any]:
        """Extra model inputs for rows with encoded content (encoding what the chunks need);
        packed: the rows are segments of positions' one row, one after another."""
        if self.encoder is None:
            return {}
        self.encoder.ensure(rows)
        return model_inputs(rows, positions, packed)

    def _paged_inputs(self, group: list[ScheduledSeq]) -> tuple[Tensor, Tensor, Tensor]:
        bs, dev = self.spec.block_size, self.device.torch
        slots = [
            e.where[p // bs] * bs + p % bs
            for e in group
            for p in range(e.start, e.start + len(e.tokens))
        ]
        width = max(len(e.where) for e in group)
        tables = torch.tensor(
            [e.where + [0] * (width - len(e.where)) for e in group], dtype=torch.int32
        )
        seq_lens = torch.tensor([e.start + len(e.tokens) for e in group])
        return tables.to(dev), torch.tensor(slots, device=dev), seq_lens.to(dev)

    def _static_decode(
        self,
        storage: PagedStorage,
        ids: Tensor,
        positions: Tensor,
        paged: tuple[Tensor, Tensor, Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """A decode forward in one of a few fixed shapes: rows padded to the next power of two
        up to decode_slots (vLLM's capture sizes; a padding row writes the scratch slot and
        sees no keys), block tables to the blocks of the model's longest sequence. So a
        compiled step has at most log2(max batch) + 1 graphs, and a step of 2 running
        sequences does not pay for 16 rows of linears."""
        tables, slots, lens = paged
        rows = ids.shape[0]
        extra = min(self.decode_slots, 1 << (rows - 1).bit_length()) - rows
        width = -(-self.model.args.max_position_embeddings // self.spec.block_size)
        tables = F.pad(tables, (0, width - tables.shape[1], 0, extra))
        slots = F.pad(slots, (0, extra), value=storage.scratch_slot)
        ids, positions = F.pad(ids, (0, 0, 0, extra)), F.pad(positions, (0, 0, 0, extra))
        valid = torch.ones_like(ids, dtype=torch.bool)
        return ids, positions, valid, (tables, slots, F.pad(lens, (0, extra)))

    def _logits(self, hidden: Tensor, rows: list[tuple[int, int, ScheduledSeq]]) -> Tensor | None:
        """One LM-head matmul for all sampled rows (it reads the whole head once, not per
        row): each (batch row, offset of its tokens in the row, entry) gives its last
        1 + num_draft positions, in order."""
        if not rows:
            return None
        index = torch.tensor(
            [
                (i, at + t)
                for i, at, e in rows
                for t in range(len(e.tokens) - 1 - e.num_draft, len(e.tokens))
            ],
            dtype=torch.long,
            device=hidden.device,
        )
        return self.model.logits(hidden[index[:, 0], index[:, 1]])

    # -- one step
    def run(self, plan: StepPlan) -> tuple[list[ScheduledSeq], Tensor | None]:
        """Apply the plan's KV ops and run its forwards; returns the sequences that sample
        and their logits, 1 + num_draft rows each, in that order (decodes first when paged)."""
        if self.spec.paged:
            if plan.kv_ops:
                self.storage.apply(plan.kv_ops)
            sampled, logits = self._step_paged(plan)
        else:
            sampled, logits = self._step_rows(plan)
        if not sampled:
            return [], None
        return sampled, torch.cat(logits) if len(logits) > 1 else logits[0]

    def generator_for(
        self, seq_id: int, sampling: SamplingParams | None, default: torch.Generator | None
    ) -> torch.Generator | None:
        """A request with a seed draws from a generator of its own (kept for its lifetime),
        so its output does not depend on what else is in the batch."""
        if sampling is None or sampling.seed is None:
            return default
        if seq_id not in self.generators:
            self.generators[seq_id] = make_generator(sampling.seed, self.device.torch)
        return self.generators[seq_id]

    def execute(
        self,
        plan: StepPlan,
        generator: torch.Generator | None,
        with_probs: bool = False,
        draft_probs: dict[int, Tensor] | None = None,
    ) -> tuple[dict[int, int | list[int]], Tensor | None]:
        """Run the plan and sample; returns the sampled token of each sequence that reached
        its end (seq id -> token; a speculation: its accepted drafts and the target's next
        token) and, with_probs, the plain rows' distributions [n, V] in run order.
        draft_probs: the drafter's q per speculating sequence (absent: a point mass)."""
        sampled, logits = self.run(plan)
        if not sampled:
            return {}, None
        logits = logits.float()
        out: dict[int, int | list[int]] = {}
        plain, rows, row = [], [], 0
        for e in sampled:
            if e.num_draft:
                out[e.seq_id] = self._verify(e, logits[row : row + 1 + e.num_draft], generator,
                                             (draft_probs or {}).get(e.seq_id))  # fmt: skip
            else:
                plain.append(e)
                rows.append(row)
            row += 1 + e.num_draft
        if not plain:
            return out, None
        if len(rows) < len(logits):  # leave out speculations' rows (none: no gather a step)
            logits = logits[rows]
        tokens, probs = sample_with_probs(
            logits, [e.history for e in plain], [e.sampling for e in plain],
            [self.generator_for(e.seq_id, e.sampling, generator) for e in plain], with_probs,
        )  # fmt: skip
        out.update(zip((e.seq_id for e in plain), tokens.tolist()))
        return out, probs

    def _verify(
        self, e: ScheduledSeq, logits: Tensor, generator: torch.Generator | None, q: Tensor | None
    ) -> list[int]:
        """A speculation: the target's processed scores after the pending token and after
        each draft (each with its own history), then the accept/reject rule."""
        drafts = e.tokens[len(e.tokens) - e.num_draft :]
        params = e.sampling or SamplingParams()
        histories = [e.history + drafts[:i] for i in range(e.num_draft + 1)]
        scores = process_logits(logits, histories, params)
        gen = self.generator_for(e.seq_id, e.sampling, generator)
        accepted = verify(scores, drafts, q, params, gen)
        self.stats.update(spec_steps=1, spec_proposed=e.num_draft, spec_accepted=len(accepted) - 1)
        return accepted

    def _count_decode(self, ctx_tokens: int, rows: int, capacity: int) -> None:
        self.stats.update(
            decode_steps=1, decode_ctx_tokens=ctx_tokens, useful_row_steps=rows,
            capacity_row_steps=capacity,
        )  # fmt: skip

    def _step_paged(self, plan: StepPlan) -> tuple[list[ScheduledSeq], list[Tensor]]:
        # decodes: one pending token (+ a speculation's drafts); the rest are prompt chunks
        decodes = [e for e in plan.seqs if len(e.tokens) == 1 + e.num_draft]
        chunks = [e for e in plan.seqs if len(e.tokens) > 1 + e.num_draft]
        if decodes:
            ctx = sum(e.start + len(e.tokens) for e in decodes)
            self._count_decode(ctx, len(decodes), plan.capacity)
        group = decodes + chunks
        contents = [(e.extras, e.start, len(e.tokens)) for e in group]
        paged = self._paged_inputs(group)
        dev = self.device.torch
        if chunks:  # one packed row: decodes first, then the chunks
            ids = torch.tensor([[t for e in group for t in e.tokens]], device=dev)
            positions = torch.tensor(
                [[e.start + j for e in group for j in range(len(e.tokens))]], device=dev
            )
            valid = torch.ones_like(ids, dtype=torch.bool)
            extra = self.extras(contents, positions, packed=True)
            paged = (*paged, tuple(len(e.tokens) for e in group))
            offsets = itertools.accumulate((len(e.tokens) for e in group), initial=0)
            rows = [(0, at, e) for at, e in zip(offsets, group)]
        else:
            ids, positions, valid = pad_rows(
                [e.tokens for e in group], [e.start for e in group], dev
            )
            extra = self.extras(contents, positions)
            if self.spec.static:
                ids, positions, valid, paged = self._static_decode(
                    self.storage, ids, positions, paged
                )
            rows = [(i, 0, e) for i, e in enumerate(group)]
        hidden = self.forward(self.storage, ids, positions, valid, paged, extra)
        rows = [r for r in rows if r[2].sample]
        return [e for _, _, e in rows], [self._logits(hidden, rows)] if rows else []

    def _step_rows(self, plan: StepPlan) -> tuple[list[ScheduledSeq], list[Tensor]]:
        if plan.kv_ops.new_rows:
            self.storage = self.new_rows(*plan.kv_ops.new_rows)
            self.history = [None] * plan.kv_ops.new_rows[0]
        for row, keep in plan.kv_ops.truncate:
            self.storage.truncate(row, keep)
        if plan.kv_ops.reorder is not None:
            self.storage.reorder(plan.kv_ops.reorder)
        by_row = {e.where: e for e in plan.seqs}
        rows, starts, contents = [], [], []
        for r in range(len(self.history)):
            e = by_row.get(r)
            contents.append((e.extras, e.start, len(e.tokens)) if e is not None else (None, 0, 0))
            if e is not None:
                self.history[r] = e.history
                rows.append(e.tokens)
                starts.append(e.start)
                continue
            h = self.history[r]  # no work: a finished row repeats its last token
            if h is None:
                rows.append([])
                starts.append(0)
            elif self.storage.stores_kv:
                rows.append(h[-1:])
                starts.append(len(h) - 1)
            else:
                rows.append(h)
                starts.append(0)
        if plan.seqs and all(e.decode for e in plan.seqs):
            ctx = sum(s + len(r) for s, r in zip(starts, rows))
            self._count_decode(ctx, len(plan.seqs), len(rows))
        ids, positions, valid = pad_rows(rows, starts, self.device.torch)
        extra = self.extras(contents, positions)
        hidden = self.forward(self.storage, ids, positions, valid, extra=extra)
        sampled = [e for e in plan.seqs if e.sample]
        logits = self._logits(hidden, [(e.where, 0, e) for e in sampled])
        return sampled, [logits] if sampled else []

    def track(self, slots: tuple[int, int] | None) -> None:
        """Per step: peak reserved KV bytes, and reserved vs used summed over steps (the
        time-averaged share of reserved KV that holds real tokens). slots: the KV manager's
        (reserved, used) token slots; None when the storage measures itself (rows)."""
        if slots is None:
            reserved, used = self.storage.nbytes(), self.storage.used_bytes()
        else:
            reserved, used = (n * self.storage.bytes_per_token for n in slots)
        self.peak_kv_bytes = max(self.peak_kv_bytes, reserved)
        self.stats.update(kv_steps=1, kv_reserved_byte_steps=reserved, kv_used_byte_steps=used)

    def prepare(self, req: Request) -> SeqContent | None:
        """A sequence's encoded-content state (None for plain text)."""
        return self.encoder.prepare(req) if self.encoder is not None else None

    def teacher_forced_logits(
        self,
        prompt: list[int],
        continuation: list[int],
        mm_items: tuple[MultimodalItem, ...] = (),
        stepwise: bool = False,
    ) -> Tensor:
        """Logits [len(continuation), V] predicting each continuation token from all before
        it, in a storage of its own (the serving storage is left alone). stepwise: the prompt
        in one forward, then each continuation token as a decode step, the path generation
        takes (decode kernels and a compiled step included); otherwise one forward."""
        fed = prompt + continuation[:-1]
        dev = self.device.torch
        content = self.prepare(Request(prompt, 1, mm_items=mm_items))
        if self.spec.paged:
            blocks = list(range(-(-len(fed) // self.spec.block_size)))
            # a compiled step's graph is specialized to the serving storage's size: match it
            same = stepwise and self.spec.static and self.storage is not None
            storage = self.new_paged(max(len(blocks), self.storage.num_blocks if same else 0))
        else:
            storage = self.new_rows(1, len(fed) + 1)
        stepwise = stepwise and (self.spec.paged or storage.stores_kv)
        segments = [
            (0, prompt),
            *((len(prompt) + i, [t]) for i, t in enumerate(fed[len(prompt) :])),
        ]
        logits = []  # per forward, as generation computes them (the head's kernel by rows)
        for start, tokens in segments if stepwise else [(0, fed)]:
            ids, positions, valid = pad_rows([tokens], [start], dev)
            extra = self.extras([(content, start, len(tokens))], positions)
            if self.spec.paged:
                end = start + len(tokens)
                entry = ScheduledSeq(0, start, tokens, True, False, fed[:end], None, blocks)
                paged = self._paged_inputs([entry])
                if stepwise and self.spec.static and len(tokens) == 1:
                    ids, positions, valid, paged = self._static_decode(
                        storage, ids, positions, paged
                    )
                h = self.forward(storage, ids, positions, valid, paged, extra)
            else:
                h = self.forward(storage, ids, positions, valid, extra=extra)
            logits.append(self.model.logits(h[0, max(len(prompt) - 1 - start, 0) : len(tokens)]))
        return torch.cat(logits).float()
