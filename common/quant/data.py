"""Text for calibration and held-out evaluation, through the `datasets` library.

A local file (`.txt`: one document per line; `.jsonl`/`.json`: a "text" field; `.parquet`:
a "text" column), a named hub dataset (needs the network; asked for explicitly), or, with
neither, a default built from what ships with Python: the docstrings of the standard
library's modules, classes and functions (English prose about code, deterministic for a
Python version). The default is split by file: every DEFAULT_EVAL_EVERY-th stdlib file (in
sorted order) is evaluation text and never calibration text.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from common.core.errors import RecipeError

DEFAULT_EVAL_EVERY = 5
_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef)))]
    return [d for n in nodes if (d := ast.get_docstring(n)) and len(d) >= 80]


def default_texts(split: str) -> Iterator[str]:
    """split "calib" or "eval": docstrings of disjoint sets of stdlib files, lazily (parsing
    the whole stdlib takes seconds; a calibration set needs a few files)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))
    held_out = split == "eval"
    for i, p in enumerate(files):
        if (i % DEFAULT_EVAL_EVERY == 0) == held_out:
            yield from _docstrings(p)


def load_texts(path: str | None, dataset: str | None, split: str, which: str) -> Iterable[str]:
    """Texts from a local file, a hub dataset (name or name:config), or the default split
    `which` ("calib" / "eval")."""
    if path:
        p = Path(path)
        if p.suffix not in _FORMATS or not p.is_file():
            raise RecipeError(f"text file {path!r} must exist and end in {', '.join(_FORMATS)}")
        return _column(_FORMATS[p.suffix], {"data_files": str(p), "split": "train"}, path)
    if dataset:
        name, _, config = dataset.partition(":")
        return _column(name, {"name": config or None, "split": split}, dataset)
    return default_texts(which)


def _column(builder: str, kwargs: dict, what: str) -> list[str]:
    import datasets

    try:
        data = datasets.load_dataset(builder, **kwargs)
    except Exception as e:  # datasets raises many kinds (offline, missing, bad format)
        raise RecipeError(f"could not load text from {what!r}: {str(e).splitlines()[0]}") from e
    if "text" not in data.column_names:
        raise RecipeError(f"{what!r} has no 'text' field; its fields: {data.column_names}")
    return [t for t in data["text"] if t and t.strip()]


def byte_encoder(vocab_size: int) -> Callable[[str], list[int]]:
    """Token ids for a model without a tokenizer (seeded presets): UTF-8 bytes mapped into
    the vocabulary above ids 0-2 (pad/bos/eos), deterministic."""
    return lambda text: [3 + b % (vocab_size - 3) for b in text.encode()]


def token_blocks(
    texts: Iterable[str], encode: Callable[[str], list[int]], num: int, seq_len: int
) -> Tensor:
    """Up to `num` consecutive, non-overlapping blocks [n, seq_len] of the texts' tokens
    (joined by blank lines); an error when not even one block fits."""
    ids: list[int] = []
    for text in texts:
        ids += encode(text + "\n\n")
        if len(ids) >= num * seq_len:
            break
    n = min(num, len(ids) // seq_len)
    if n == 0:
        raise RecipeError(
            f"the text has {len(ids)} tokens, fewer than one block of {seq_len}; "
            "give more text or a shorter seq_len"
        )
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)
