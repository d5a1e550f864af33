"""Train the LLaMA recipe's `small` preset briefly, offline, to measure fidelity on a trained model.

    python scripts/train_small_lm.py [--steps 200] [--out ~/.cache/llm-recipes/llama-small-stdlib]

Seeded random weights give near-uniform next-token distributions, where rounding alone flips
~8% of greedy tokens (scripts/fidelity_floor.py); trained models are far more peaked. No
weights or datasets can be downloaded here, so this trains one from what every Python has:
the standard library's source (tests excluded), with a byte-level BPE tokenizer trained on it
at the preset's vocabulary size. Every 20th file is held out for the evaluation loss and for
the prompts. transformers' LlamaForCausalLM is the trainer (our model matches it on the same
weights); the result is an ordinary HF checkpoint for `model.path=`.

Writes OUT/{config.json, model.safetensors, tokenizer files, prompts.jsonl} and
results/llama65b/cpu/train_small_lm.{json,md}. Seeded: the same Python version, torch and
step count give the same weights up to kernel nondeterminism.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.bench.report import command_line, write_table  # noqa: E402
from common.io.presets import preset_args  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402

SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the preset's unk, bos and eos
HOLD_OUT_EVERY = 20


def stdlib_files() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the stdlib's .py files, tests excluded, sorted."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages"}
    files = sorted(p for p in lib.rglob("*.py") if not skip & set(p.relative_to(lib).parts))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    held = [t for i, t in enumerate(texts) if i % HOLD_OUT_EVERY == 0]
    return [t for i, t in enumerate(texts) if i % HOLD_OUT_EVERY], held


def train_tokenizer(texts: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids = [tok for ids in tokenizer(texts)["input_ids"] for tok in [*ids, eos]]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length - 1, (n,), generator=gen)
    return torch.stack([stream[s : s + length + 1] for s in starts.tolist()])


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10% of steps, then cosine down to 10% of the peak."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def loss_of(model, batch: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=batch, labels=batch).loss  # the model shifts labels itself


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="small")
    p.add_argument("--vocab", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument(
        "--out", type=Path, default=Path.home() / ".cache/llm-recipes/llama-small-stdlib"
    )
    p.add_argument("--results", type=Path, default=ROOT / "results/llama65b/cpu/train_small_lm")
    args = p.parse_args()

    mcfg = OmegaConf.load(ROOT / "configs/model/llama65b.yaml")
    mcfg.scale = args.scale
    margs = preset_args(mcfg, LlamaForCausalLM)
    vocab = args.vocab or margs.vocab_size
    train_texts, held_texts = stdlib_files()
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, vocab)
    train, held = token_stream(train_texts, tokenizer), token_stream(held_texts, tokenizer)
    print(
        f"tokenizer: {len(tokenizer)} tokens; train {len(train):,} tokens, held out {len(held):,}"
    )

    hf_config = {**margs.to_hf_config(), "vocab_size": len(tokenizer)}
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(**hf_config)
    model = transformers.LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss = loss_of(model, windows(train, args.batch, args.seq, gen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    with torch.inference_mode():
        eval_gen = torch.Generator().manual_seed(args.seed + 1)
        held_loss = (
            sum(
                loss_of(model, windows(held, args.batch, args.seq, eval_gen)).item()
                for _ in range(4)
            )
            / 4
        )
    minutes = (time.perf_counter() - t0) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    # Held-out prompts: each held-out file's first prompt-tokens tokens, as text.
    prompts = [
        tokenizer.decode(ids[: args.prompt_tokens])
        for ids in tokenizer(held_texts)["input_ids"]
        if len(ids) >= args.prompt_tokens
    ][:3]
    (args.out / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": t}) + "\n" for t in prompts)
    )

    tail = losses[-10:]
    result = {
        "command": command_line(),
        "corpus": f"Python {sys.version.split()[0]} stdlib .py files (tests excluded)",
        "vocab_size": len(tokenizer),
        "train_tokens": len(train),
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch * args.seq,
        "batch": args.batch,
        "seq": args.seq,
        "peak_lr": args.lr,
        "first_loss": losses[0],
        "final_train_loss": sum(tail) / len(tail),
        "held_out_loss": held_loss,
        "uniform_loss": math.log(len(tokenizer)),
        "minutes": minutes,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    lines = [
        "| corpus | params | steps × batch × seq | tokens seen | first loss | final train loss | held-out loss | uniform | minutes |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        f"| {result['corpus']} | {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M | "
        f"{args.steps} × {args.batch} × {args.seq} | {result['tokens_seen']:,} | "
        f"{result['first_loss']:.2f} | {result['final_train_loss']:.2f} | {held_loss:.2f} | "
        f"{result['uniform_loss']:.2f} | {minutes:.1f} |",
        "",
    ]
    print("\n".join(lines))
    write_table(args.results, result, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
