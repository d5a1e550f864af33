"""Paste committed result tables into the READMEs, so no number in a README is typed by hand.

A README marks each table with
    <!-- table: results/llama65b/cpu/latency-flash_attn+int8.md -->
    ...replaced...
    <!-- /table -->
Usage: python scripts/render_tables.py [--check]   (--check: exit 1 if a README is stale)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (\S+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        source = ROOT / m.group(2)
        if not source.is_file():
            sys.exit(f"error: {m.group(2)} is referenced by a README but does not exist")
        body = source.read_text()
        body = re.sub(r"\A# .*\n\n", "", body)  # the README supplies its own heading
        return f"{m.group(1)}{body.rstrip()}\n{m.group(4)}"

    return BLOCK.sub(fill, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for readme in [ROOT / "README.md", *ROOT.glob("recipes/*/README.md"), *ROOT.glob("docs/*.md")]:
        old = readme.read_text()
        new = render(old)
        if new != old:
            stale.append(readme.relative_to(ROOT))
            if not args.check:
                readme.write_text(new)
    for path in stale:
        print(f"{'stale' if args.check else 'updated'}: {path}")
    sys.exit(1 if args.check and stale else 0)


if __name__ == "__main__":
    main()
