"""Distill a tiny LLaMA drafter from SmolLM2 for speculative decoding (spec.method=draft).

    python scripts/train_draft.py --teacher ~/.cache/llm-recipes/SmolLM2-135M-Instruct \
        --out ~/.cache/llm-recipes/SmolLM2-draft [--steps 200]

A drafter must share the target's tokenizer and predict what the target predicts. This one
is a 2-layer, hidden-256 LLaMA with SmolLM2's vocabulary (tied embeddings, initialized
from the top principal directions of SmolLM2's own embedding matrix), trained offline on
the CPU in minutes to match SmolLM2's next-token distributions (KL divergence, teacher to
student) on built-in text: the passages of scripts/spec_workloads.py in SmolLM2's chat
format, each followed by SmolLM2's own greedy answer (what it will be asked to draft), and
the standard library's docstrings-heavy source. Writes an ordinary HF checkpoint (config,
safetensors, tokenizer) for spec.draft.path, and prints the held-out top-1 agreement with
the teacher (an upper bound's proxy for greedy acceptance).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from spec_workloads import PASSAGES, TOPICS, chat_ids  # noqa: E402
from tqdm import tqdm  # noqa: E402


def teacher_answers(teacher, tok, new_tokens: int) -> list[list[int]]:
    """Chat prompts (copy and free) with the teacher's greedy answers appended."""
    prompts = [f"Repeat the following passage word for word:\n\n{p}" for p in PASSAGES]
    prompts += [f"Write a short story about {t}." for t in TOPICS]
    out = []
    for text in tqdm(prompts, desc="teacher answers"):
        ids = torch.tensor([chat_ids(tok, text)])
        gen = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=tok.eos_token_id)  # fmt: skip
        out.append(gen[0].tolist())
    return out


def stdlib_stream(tok, max_tokens: int) -> list[int]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for path in sorted(lib.glob("*.py")):
        ids += tok(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def student_from(teacher, hidden: int, layers: int) -> transformers.LlamaForCausalLM:
    # the teacher's config (vocabulary, rotary, special tokens) with the student's dims
    fields = {k: v for k, v in teacher.config.to_dict().items() if not k.startswith("_")}
    fields.update(
        hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=2, head_dim=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    config = transformers.LlamaConfig(**fields)
    student = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # the teacher's embedding, projected on its top principal directions
        emb = teacher.get_input_embeddings().weight.float()
        _, _, v = torch.pca_lowrank(emb, q=hidden, center=False)
        student.get_input_embeddings().weight.copy_(emb @ v[:, :hidden])
    return student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--answer-tokens", type=int, default=160)
    p.add_argument("--stdlib-tokens", type=int, default=400_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    tok = transformers.AutoTokenizer.from_pretrained(args.teacher, trust_remote_code=False)
    teacher = transformers.LlamaForCausalLM.from_pretrained(
        args.teacher, dtype=torch.float32
    ).eval()
    chats = teacher_answers(teacher, tok, args.answer_tokens)
    held, chats = chats[::4], [c for i, c in enumerate(chats) if i % 4]
    streams = [
        torch.tensor([t for c in chats for t in c]),
        torch.tensor(stdlib_stream(tok, args.stdlib_tokens)),
    ]
    student = student_from(teacher, args.hidden, args.layers)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    bar = tqdm(range(args.steps), desc="distill")
    for _ in bar:
        # half the batch from the chat answers, half from the stdlib source
        batch = torch.stack([
            st[o : o + args.seq]
            for st in streams
            for o in torch.randint(0, len(st) - args.seq, (args.batch // 2,), generator=gen).tolist()
        ])  # fmt: skip
        with torch.no_grad():
            target = F.log_softmax(teacher(batch).logits.float(), -1)
        logp = F.log_softmax(student(batch).logits.float(), -1)
        loss = F.kl_div(logp, target, log_target=True, reduction="batchmean") / args.seq
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(kl=f"{loss.item():.3f}")
    student.eval()
    with torch.no_grad():
        agree = total = 0
        for ids in held:
            x = torch.tensor([ids])
            a, b = teacher(x).logits.argmax(-1), student(x).logits.argmax(-1)
            agree, total = agree + int((a == b).sum()), total + a.numel()
    args.out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params, "
          f"{time.time() - start:.0f} s, held-out top-1 agreement with the teacher {agree / total:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
