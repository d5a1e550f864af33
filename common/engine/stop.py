"""The stop rule, once for every runner (the engine and the HF peer): EOS, max_new_tokens
(or the model's positions), stop token sequences, and stop strings (needs a tokenizer)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from common.core.errors import RecipeError
from common.core.request import Request


class StopRule:
    def __init__(self, eos_ids: Iterable[int], tokenizer: Any | None = None) -> None:
        self.eos, self.tokenizer = frozenset(eos_ids), tokenizer

    def check(self, req: Request, tokens: list[int], num_new: int, limit: int) -> str | None:
        """Why generation ends after `tokens`, whose last num_new were generated, or None.
        limit: max_new_tokens, lowered when the model's positions run out first. Reads only
        the tail, so a step costs the same however long the sequence is."""
        if tokens[-1] in self.eos and not req.ignore_eos:
            return "eos"
        for stop in req.stop_sequences:
            if len(stop) <= num_new and tokens[-len(stop) :] == list(stop):
                return "stop"
        if req.stop_strings and self._ends_with_stop_string(req, tokens, num_new):
            return "stop"
        if num_new >= limit:
            return "length"
        return None

    def _ends_with_stop_string(self, req: Request, tokens: list[int], num_new: int) -> bool:
        """A stop string ending in the last token lies within the last len(string) tokens
        (every token decodes to at least one character); only generated tokens count."""
        if self.tokenizer is None:
            raise RecipeError("stop strings need a tokenizer (model.path with tokenizer files)")
        width = min(num_new, max(map(len, req.stop_strings)))
        tail = self.tokenizer.decode(tokens[len(tokens) - width :])
        return any(s in tail for s in req.stop_strings)

    def cut(self, req: Request, output: list[int], limit: int) -> tuple[list[int], str]:
        """Apply the rule to a finished output (a peer that generated past the stop)."""
        for i in range(1, len(output) + 1):
            reason = self.check(req, output[:i], i, limit)
            if reason:
                return output[:i], reason
        return output, "length"
