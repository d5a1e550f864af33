"""The vllm peer: vLLM's CPU backend on our checkpoint dir, token-id prompts.

Started by common/bench/peer_process.py with the interpreter of vLLM's own virtualenv
(scripts/install_peers.sh vllm); speaks _protocol.py. The engine is the one LLM.generate
drives (add requests, then step until done), stepped here so that every token gets its time
and requests can arrive mid-run (online workloads): max_num_seqs is our max batch. KV space
comes from VLLM_CPU_KVCACHE_SPACE, set by the caller. Prefix caching is on only when the row
asks for it, and dropped between passes, so a pass never reuses an earlier pass's prompts.
"""

from __future__ import annotations

import itertools
import os
import time

from common.bench.peer_servers._protocol import serve


def setup(msg: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=msg["model"],
        skip_tokenizer_init=True,
        dtype=msg["dtype"],
        max_num_seqs=msg["max_num_seqs"],
        max_model_len=msg["max_model_len"],
        enable_prefix_caching=msg["prefix_cache"],
        seed=msg["seed"],
        # One process when asked (the caller's default, see peers.vllm_runner): the engine
        # steps in this process, on all the threads it was given, with no scheduler process
        # spinning on a core the model needs.
        distributed_executor_backend="uni"
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        else None,
    )
    engine = llm.llm_engine
    ids = itertools.count()
    s = msg["sampling"]
    eos = msg["eos"]

    def params(r: dict) -> SamplingParams:
        return SamplingParams(
            temperature=s["temperature"] if s["do_sample"] else 0.0,
            top_k=s["top_k"] if s["do_sample"] and s["top_k"] > 0 else -1,
            top_p=s["top_p"] if s["do_sample"] else 1.0,
            repetition_penalty=s["repetition_penalty"],
            max_tokens=r["max_new_tokens"],
            ignore_eos=r["ignore_eos"],
            stop_token_ids=None if r["ignore_eos"] else eos,
            detokenize=False,
        )

    def generate(m: dict) -> dict:
        reqs = m["requests"]
        arrivals = m["arrivals"] or [0.0] * len(reqs)
        pending = sorted(range(len(reqs)), key=lambda i: arrivals[i])
        index: dict[str, int] = {}
        tokens: list[list[int]] = [[] for _ in reqs]
        times: list[list[float]] = [[] for _ in reqs]
        steps = ctx = 0
        t0 = time.perf_counter()
        while pending or engine.has_unfinished_requests():
            now = time.perf_counter() - t0
            while pending and arrivals[pending[0]] <= now:
                i = pending.pop(0)
                rid = str(next(ids))
                index[rid] = i  # vLLM may suffix the id it reports: both map to the request
                rid = engine.add_request(rid, {"prompt_token_ids": reqs[i]["prompt"]}, params(reqs[i]))  # fmt: skip
                index[rid] = i
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, arrivals[pending[0]] - now))
                continue
            decoded = False
            for out in engine.step():
                i = index[out.request_id]
                got = list(out.outputs[0].token_ids)
                t = time.perf_counter() - t0 - arrivals[i]
                for k in range(len(tokens[i]), len(got)):
                    times[i].append(t)
                    if k > 0:
                        decoded = True
                        ctx += len(reqs[i]["prompt"]) + k
                tokens[i] = got
            steps += decoded
        outputs = [{"tokens": t, "times": tt} for t, tt in zip(tokens, times)]
        return {"outputs": outputs, "stats": {"decode_steps": steps, "decode_ctx_tokens": ctx}}

    def argmax(m: dict) -> dict:
        """Teacher-forced greedy choice at each continuation position: vLLM gives prompt
        logprobs, not logits, so the top-1 of each (and the next token for the last)."""
        seq = m["prompt"] + m["continuation"][:-1]
        p = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        (out,) = llm.generate([{"prompt_token_ids": seq}], p, use_tqdm=False)
        top = [
            next(t for t, lp in out.prompt_logprobs[i].items() if lp.rank == 1)
            for i in range(len(m["prompt"]), len(seq))
        ]
        return {"argmax": [*top, out.outputs[0].token_ids[0]]}

    info = {"version": vllm.__version__}
    return {
        "generate": generate,
        "argmax": argmax,
        "reset": lambda m: {"ok": llm.reset_prefix_cache()},
        "info": lambda m: info,
    }


if __name__ == "__main__":
    serve(setup)
