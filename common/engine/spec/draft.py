"""Draft-model drafting: a smaller model with the target's vocabulary proposes k tokens by
k cheap forwards (greedy, or sampled with the request's own processors so verification
knows q). Each sequence keeps its draft KV in a contiguous row of its own; after a
verification only the positions whose tokens changed are fed again (slot = position, so
stale slots past the current position are never read)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from common.core.errors import RecipeError
from common.core.request import SamplingParams
from common.device.select import Device
from common.engine.runner import ModelRunner, pad_rows
from common.engine.sampler import sample_with_probs
from common.kv.rows import RowStorage
from common.kv.spec import KVSpec
from common.nn.causal_lm import CausalLM


class DraftModelDrafter:
    def __init__(
        self,
        model: CausalLM,
        target_vocab: int,
        device: Device,
        attention: str,
        generator_for: Callable[[int, SamplingParams], torch.Generator | None],
    ) -> None:
        if model.args.vocab_size != target_vocab:
            raise RecipeError(
                f"the draft model's vocabulary ({model.args.vocab_size}) differs from the "
                f"target's ({target_vocab}); spec.method=draft needs the same tokenizer"
            )
        self.runner = ModelRunner(model, device, KVSpec("contiguous"), attention)
        self.generator_for = generator_for
        # seq id -> (its draft KV, tokens fed, how many of them are the sequence's own)
        self.state: dict[int, tuple[RowStorage, list[int], int]] = {}
        self.probs: dict[int, Tensor] = {}

    def reset(self) -> None:
        self.state.clear()
        self.probs.clear()

    @torch.inference_mode()
    def propose(
        self, seq_id: int, tokens: list[int], k: int, final_len: int, sampling: SamplingParams
    ) -> list[int]:
        if seq_id in self.state:
            storage, fed, base = self.state[seq_id]
        else:
            storage, fed, base = self.runner.new_rows(1, final_len), [], 0
        common = base  # fed[:base] were the sequence's tokens then, so they still are
        while common < min(len(fed), len(tokens) - 1) and fed[common] == tokens[common]:
            common += 1
        history, new = list(tokens), tokens[common:]
        gen = self.generator_for(seq_id, sampling)
        qs = []
        for _ in range(k):
            ids, positions, valid = pad_rows([new], [common], self.runner.device.torch)
            hidden = self.runner.forward(storage, ids, positions, valid)
            logits = self.runner.model.logits(hidden[:, -1]).float()
            token, q = sample_with_probs(logits, [history], sampling, gen, sampling.do_sample)
            if q is not None:
                qs.append(q[0])
            common += len(new)
            new = [int(token)]
            history += new
        self.state[seq_id] = (storage, history[:-1], len(tokens))
        if qs:
            self.probs[seq_id] = torch.stack(qs)
        return history[len(tokens) :]
