"""Prompt files for the speculative decoding table: one copy-heavy, one free generation.

    python scripts/spec_workloads.py --out DIR --tokenizer MODEL_DIR   # text, chat template
    python scripts/spec_workloads.py --out DIR --vocab 32000            # token ids (presets)

copy.jsonl asks to repeat a passage word for word (the output is mostly in the prompt, where
prompt lookup finds it); free.jsonl asks for open-ended text (little to look up). With a
tokenizer the prompts are chat-formatted token ids, so an instruct model answers them; without
one (seeded presets, which follow no instruction) copy prompts are a passage of random ids
followed by its first tokens again, free prompts random ids. Every line is
{"prompt_ids": [...], "max_new_tokens": N} (workload=file).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the "
    "wick, polished the great lens, and wrote the weather in a leather book: wind from the "
    "north-east, a heavy swell, two fishing boats returning late. In forty years he had "
    "missed the lamp only once, the night his daughter was born.",
    "To bake bread, mix flour, water, salt and a little yeast until no dry flour remains. "
    "Let the dough rest for half an hour, then fold it several times over the next two "
    "hours. Shape it into a round loaf, let it rise until it is puffy, and bake it in a very "
    "hot oven for about forty minutes, until the crust is deep brown.",
    "A hash table stores values in an array of buckets. A hash function turns each key into "
    "an index; when two keys land in the same bucket, the table either chains them in a list "
    "or probes for the next free slot. Lookups take constant time on average, as long as the "
    "table grows before it becomes too full.",
    "The river rises in the mountains as a cold, narrow stream. It gathers water from "
    "hundreds of smaller creeks, slows as it reaches the plain, and winds through farmland "
    "and three old market towns before it spreads into a wide, muddy delta and meets the sea.",
    "Our meeting is moved to Thursday at ten in the small conference room. Please bring the "
    "quarterly figures, the draft of the customer survey, and any questions about the new "
    "travel policy. Lunch will be provided, and the session should end by half past twelve.",
    "Photosynthesis takes place in the chloroplasts of plant cells. Light energy splits "
    "water molecules, releasing oxygen, and the energy captured is used to turn carbon "
    "dioxide into sugars. These sugars feed the plant and, through it, almost every other "
    "living thing on land.",
]
TOPICS = [
    "a robot that learns to paint",
    "the history of a small coastal town",
    "why people enjoy long walks",
    "a day in the life of a beekeeper",
    "how cities might change in a hundred years",
    "a friendship between a cat and a crow",
]


def chat_ids(tokenizer, text: str) -> list[int]:
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", help="a checkpoint dir with tokenizer files")
    src.add_argument("--vocab", type=int, help="token-id prompts for seeded presets")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--passage-tokens", type=int, default=160, help="random-id passages")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    copy, free = [], []
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
        for passage in PASSAGES:
            copy.append(chat_ids(tok, f"Repeat the following passage word for word:\n\n{passage}"))
        for topic in TOPICS:
            free.append(chat_ids(tok, f"Write a short story about {topic}."))
    else:
        for _ in PASSAGES:
            passage = [rng.randrange(3, args.vocab) for _ in range(args.passage_tokens)]
            copy.append(passage + passage[:16])
        for _ in TOPICS:
            free.append([rng.randrange(3, args.vocab) for _ in range(64)])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, prompts in (("copy", copy), ("free", free)):
        lines = [
            json.dumps({"prompt_ids": ids, "max_new_tokens": args.max_new_tokens})
            for ids in prompts
        ]
        (args.out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out / name}.jsonl ({len(prompts)} prompts)")


if __name__ == "__main__":
    main()
