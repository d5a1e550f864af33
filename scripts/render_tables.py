"""Paste committed result tables into the READMEs, so no number in a README is typed by hand.

A README marks each table with
    <!-- table: results/llama65b/cpu/latency-flash_attn+int8.md -->
    ...replaced...
    <!-- /table -->
Usage: python scripts/render_tables.py [--check]   (--check: exit 1 if a README is stale)

A marker whose results file does not exist yet (its script has not been run) is left as it
is and reported; the other tables are still pasted, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (\S+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str, missing: list[str] | None = None) -> str:
    """`text` with every marked table replaced by its results file; the sources that do not
    exist are appended to `missing` and their blocks kept."""

    def fill(m: re.Match) -> str:
        source = ROOT / m.group(2)
        if not source.is_file():
            if missing is not None:
                missing.append(m.group(2))
            return m.group(0)
        body = source.read_text()
        body = re.sub(r"\A# .*\n\n", "", body)  # the README supplies its own heading
        return f"{m.group(1)}{body.rstrip()}\n{m.group(4)}"

    return BLOCK.sub(fill, text)


def documents() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted(ROOT.glob("recipes/*/README.md")),
        *sorted(ROOT.glob("docs/*.md")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale, missing = [], []
    for readme in documents():
        old = readme.read_text()
        absent: list[str] = []
        new = render(old, absent)
        missing += [(readme.relative_to(ROOT), source) for source in absent]
        if new != old:
            stale.append(readme.relative_to(ROOT))
            if not args.check:
                readme.write_text(new)
    for path in stale:
        print(f"{'stale' if args.check else 'updated'}: {path}")
    for path, source in missing:
        print(
            f"missing: {source} (referenced by {path}; run the command that writes it, see scripts/reproduce.sh)"
        )
    sys.exit(1 if (args.check and stale) or missing else 0)


if __name__ == "__main__":
    main()
