"""Verification of a speculation: the target's processed scores at the k + 1 positions
(after the last accepted token and after each draft token) decide which drafts stand.

Greedy: a draft stands while it equals the target's argmax; the first mismatch is replaced
by the argmax, and when all k stand the (k+1)-th position adds a bonus token, so the output
is exactly what non-speculative greedy decoding produces.

Sampling (Leviathan et al. 2023, Chen et al. 2023): draft x drawn from q is accepted with
probability min(1, p(x) / q(x)); on rejection the token is drawn from max(0, p - q)
normalized, and after k acceptances the bonus token from p. Each emitted token is then
distributed exactly as p. A deterministic drafter (prompt lookup) is q = a point mass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.core.request import SamplingParams


def verify(
    scores: Tensor,
    drafts: list[int],
    q: Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """scores: processed target scores [k + 1, V] (common.engine.sampler.process_logits);
    q: the drafter's distributions [k, V], or None for a point mass. Returns the accepted
    drafts followed by one token from the target (a correction or the bonus)."""
    if not params.do_sample:
        best = scores.argmax(dim=-1).tolist()
        for i, d in enumerate(drafts):
            if best[i] != d:
                return drafts[:i] + [best[i]]
        return drafts + [best[len(drafts)]]
    p = scores.softmax(dim=-1)
    u = torch.rand(len(drafts), generator=generator, device=p.device).tolist()
    for i, d in enumerate(drafts):
        q_d = 1.0 if q is None else float(q[i, d])
        if u[i] * q_d < float(p[i, d]):  # accept with probability min(1, p/q)
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0.0)
        if not float(residual.sum()) > 0.0:  # p == q up to rounding: rejection had probability 0
            residual = p[i]
        token = torch.multinomial(residual, 1, generator=generator)
        return drafts[:i] + [int(token)]
    return drafts + [int(torch.multinomial(p[len(drafts)], 1, generator=generator))]
