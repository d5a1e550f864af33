"""Our loaded weights in the formats other engines read, written once and cached.

Peer engines (common/bench/peers.py) run the exact weights our rows run: a seeded preset or
a checkpoint as loaded (cast to the run's dtype). Each export is keyed by a hash of those
weights and the hyper-parameters, so a changed checkpoint, seed, scale or dtype never reuses
a stale file; files appear atomically (written under a temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from common.core.errors import RecipeError
from common.io.checkpoint import save_weights
from common.io.gguf import write_gguf
from common.nn.causal_lm import CausalLM
from common.ops.build import cache_dir

EXPORT_VERSION = "1"  # part of every key: bump when an exporter's output changes


def weights_hash(model: CausalLM) -> str:
    """A short content hash of the weights as loaded (names, dtypes, shapes, bytes) and the
    hyper-parameters."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{EXPORT_VERSION} {type(model).__name__} {model.args}".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


def exports_dir() -> Path:
    return cache_dir() / "exports"


def gguf_file(model: CausalLM, key: str | None = None) -> Path:
    """The float32 GGUF of these weights (llama.cpp quantizes it further, next to it)."""
    path = exports_dir() / f"{key or weights_hash(model)}-f32.gguf"
    return path if path.exists() else write_gguf(model, path)


def hf_checkpoint(model: CausalLM, key: str | None = None) -> Path:
    """These weights as a Hugging Face checkpoint dir (config.json + model.safetensors, in
    the weights' dtype) that transformers-compatible engines load."""
    import transformers

    path = exports_dir() / f"hf-{key or weights_hash(model)}"
    if (path / "config.json").exists():
        return path
    cls = getattr(transformers, model.hf_class_name, None)
    if cls is None:
        raise RecipeError(f"transformers {transformers.__version__} has no {model.hf_class_name}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_weights(model, tmp)
        config = cls.config_class(**model.args.to_hf_config())
        config.architectures = [model.hf_class_name]
        config.dtype = next(model.parameters()).dtype
        config.save_pretrained(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
