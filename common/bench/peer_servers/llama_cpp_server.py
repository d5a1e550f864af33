"""The llama_cpp peer: llama.cpp (through llama-cpp-python) on a GGUF of our weights.

Started by common/bench/peer_process.py; speaks _protocol.py. Setup quantizes the float32
GGUF to the row's format with llama.cpp's own quantizer (llama_model_quantize, what the
llama-quantize tool calls), once per file: the result is cached next to its source. One
sequence at a time (llama-cpp-python runs one per context), greedy unless asked to sample.
"""

from __future__ import annotations

import ctypes
import os
import time

from common.bench.peer_servers._protocol import serve

FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama.h LLAMA_FTYPE_*


def quantize(src: str, dst: str, fmt: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[fmt]
    params.nthread = threads
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        if llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama_model_quantize {src} -> {fmt} failed")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def setup(msg: dict) -> dict:
    import llama_cpp
    import numpy as np

    path, threads = msg["gguf"], msg["threads"]
    if msg["format"] != "f32":
        src, path = path, path.replace("-f32.gguf", f"-{msg['format']}.gguf")
        if not os.path.exists(path):
            quantize(src, path, msg["format"], threads)
    common = dict(
        model_path=path, n_ctx=msg["n_ctx"], n_batch=msg["n_ctx"], n_ubatch=msg["n_ctx"],
        n_threads=threads, n_threads_batch=threads, seed=msg["seed"], verbose=False,
    )  # fmt: skip
    llm = llama_cpp.Llama(**common)
    teacher: list = []  # a second context that keeps every position's logits, made on first use
    eos = set(msg["eos"])
    s = msg["sampling"]
    sampler = (
        dict(temp=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], min_p=0.0)
        if s["do_sample"]
        else dict(temp=0.0)  # llama-cpp-python: temperature 0 is the greedy sampler
    )

    def generate(m: dict) -> dict:
        outputs, steps, ctx = [], 0, 0
        for r in m["requests"]:
            llm.reset()  # no reuse of the previous request's KV, even for an equal prompt
            tokens, times = [], []
            t0 = time.perf_counter()
            for tok in llm.generate(r["prompt"], repeat_penalty=1.0, **sampler):
                times.append(time.perf_counter() - t0)
                tokens.append(int(tok))
                if len(tokens) >= r["max_new_tokens"] or (not r["ignore_eos"] and tok in eos):
                    break
            outputs.append({"tokens": tokens, "times": times})
            n, p = len(tokens), len(r["prompt"])
            steps += n - 1
            ctx += (n - 1) * p + n * (n - 1) // 2  # sum of p + k for k = 1 .. n-1
        return {"outputs": outputs, "stats": {"decode_steps": steps, "decode_ctx_tokens": ctx}}

    def logits(m: dict) -> dict:
        if not teacher:
            teacher.append(llama_cpp.Llama(**common, logits_all=True))
        seq = m["prompt"] + m["continuation"][:-1]
        teacher[0].reset()
        teacher[0].eval(seq)
        np.save(
            m["out"], np.asarray(teacher[0].scores[len(m["prompt"]) - 1 : len(seq)], np.float32)
        )
        return {}

    info = {"file": path, "bytes": os.path.getsize(path), "version": llama_cpp.__version__}
    return {"generate": generate, "logits": logits, "reset": lambda m: {}, "info": lambda m: info}


if __name__ == "__main__":
    serve(setup)
