"""What a caller asks for and gets back: requests, sampling parameters, completions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from common.core.errors import RecipeError


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False  # False = greedy (argmax after the logits processors)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, valid: str) -> RecipeError:
            return RecipeError(
                f"sampling: {name}={getattr(self, name)!r} is invalid; expected {valid}"
            )

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not isinstance(self.do_sample, bool):
            raise bad("do_sample", "True or False")
        # Temperature only matters when sampling; greedy callers often pass 0 to mean "greedy".
        if self.do_sample and not (is_real(self.temperature) and self.temperature > 0):
            raise bad(
                "temperature",
                "a finite float > 0 when do_sample=True (use do_sample=False for greedy)",
            )
        if not (is_int(self.top_k) and self.top_k >= 0):
            raise bad("top_k", "an integer >= 0 (0 = off)")
        if not (is_real(self.top_p) and 0 < self.top_p <= 1):
            raise bad("top_p", "a float in (0, 1] (1.0 = off)")
        if not (is_real(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "a finite float > 0 (1.0 = off)")
        if not (is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0):
            raise bad("no_repeat_ngram_size", "an integer >= 0 (0 = off)")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**64):
            raise bad("seed", "None or an integer in [0, 2**64)")

    @classmethod
    def from_generation(cls, generation: Mapping[str, Any]) -> SamplingParams:
        """The `generation:` config's per-request fields (beam settings are not per request)."""
        return cls(**{f.name: generation[f.name] for f in fields(cls) if f.name in generation})


@dataclass(frozen=True, eq=False)
class MultimodalItem:
    """Content that the placeholder tokens prompt[start:start + length] stand for (an image):
    the model's encoder turns `inputs` (e.g. pixel_values and image_grid_thw tensors) into
    `length` embeddings. `digest` hashes the content: the key of the encoder-feature cache
    and of prefix-cache blocks holding the placeholders."""

    start: int
    length: int
    digest: bytes
    inputs: dict[str, Any]


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False  # benchmarks fix the output length, as vLLM's benchmarks do
    priority: int = 0  # lower runs first under scheduler.policy=priority
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token sequences that end generation
    stop_strings: tuple[str, ...] = ()  # need a tokenizer
    # Prefix-cache keys for content that tokens stand for: (start, end, digest) marks
    # positions [start, end) (e.g. image placeholders with the image's hash), so equal
    # tokens with different content never share KV.
    extra_keys: tuple[tuple[int, int, bytes], ...] = ()
    mm_items: tuple[MultimodalItem, ...] = ()  # in prompt order; each adds its extra key

    def __post_init__(self) -> None:
        keys = tuple((m.start, m.start + m.length, m.digest) for m in self.mm_items)
        self.extra_keys = tuple(dict.fromkeys(self.extra_keys + keys))


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str  # "eos" | "stop" (a stop sequence or string) | "length"
    token_times: list[float]  # seconds from the batch start (or arrival) to each token
    preemptions: int = 0
    # True when generation stopped at the model's max positions before max_new_tokens
    # (finish_reason "length"): the prompt left too little room, which a bench should say.
    truncated: bool = False
    score: float | None = None  # beam search: the hypothesis' length-penalized log-probability

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None
