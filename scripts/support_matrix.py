"""Which opt has been measured on which device and dtype, read from the committed results.

    python scripts/support_matrix.py [--recipe llama65b ...] [--results results]

For each recipe, every <recipe>/<hardware>/*.json benchmark table under results/ is read
(results/<recipe>/ and the runs given a bench.results_dir of their own, such as
results/quant/smollm2/<recipe>/); a cell
is "measured" when some table has a row with that opt on that device type and dtype (the
number of tables in brackets). Where nothing is measured: "unverified" on an accelerator
(the code calls the real APIs, but no such device ran it), "not measured" on CPU, and "no"
where the opt's configs/opt/NAME.yaml does not list the device. Writes
results/<recipe>/support_matrix.{md,json}: no number here is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from common.bench.report import atomic_write  # noqa: E402

DEVICES = ("cpu", "cuda", "npu")
DTYPES = ("bfloat16", "float32")


def opt_devices(config_dir: Path) -> dict[str, list[str]]:
    """Each opt's devices, as its configs/opt/NAME.yaml declares them."""
    return {
        p.stem: list(OmegaConf.load(p).opts[p.stem].devices)
        for p in sorted((config_dir / "opt").glob("*.yaml"))
    }


def measured(results: Path, recipe: str) -> dict[tuple[str, str, str], set[str]]:
    """(opt or "baseline", device type, dtype) -> the tables with such a row."""
    found: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for path in sorted(results.glob(f"**/{recipe}/*/*.json")):
        result = json.loads(path.read_text())
        if "variants" not in result:  # a script's table, not a recipe run
            continue
        device = result["hardware"].split("-")[0]
        dtype = result["model"].rsplit(", ", 1)[-1]
        for variant in result["variants"]:
            if variant.get("peer"):
                continue
            for opt in variant["opts"] or ["baseline"]:
                found[(opt, device, dtype)].add(str(path.relative_to(results).with_suffix("")))
    return found


def cell(opt: str, device: str, dtype: str, devices: list[str], found: dict) -> str:
    if device not in devices:
        return "no"
    if tables := found.get((opt, device, dtype)):
        return f"measured ({len(tables)})"
    return "not measured" if device == "cpu" else "unverified"


def matrix(recipe: str, results: Path, config_dir: Path) -> tuple[str, dict]:
    found = measured(results, recipe)
    specs = {"baseline": list(DEVICES), **opt_devices(config_dir)}
    columns = [(d, t) for d in DEVICES for t in DTYPES]
    rows = {
        opt: {f"{d} {t}": cell(opt, d, t, devices, found) for d, t in columns}
        for opt, devices in specs.items()
    }
    lines = [
        f"# {recipe}: what has been measured where",
        "",
        "- command: `python scripts/support_matrix.py`",
        f"- read from the committed tables in results/**/{recipe}/; measured (N): a row with "
        "this opt on this device and dtype in N tables; unverified: the code calls the real "
        "APIs but no such device ran it; not measured: runs on CPU, no committed table; no: "
        "the opt does not support the device",
        "",
        "| opt | " + " | ".join(f"{d} {t}" for d, t in columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| `{opt}` | " + " | ".join(cells.values()) + " |" for opt, cells in rows.items()),
        "",
    ]
    tables = {f"{o} {d} {t}": sorted(v) for (o, d, t), v in found.items()}
    return "\n".join(lines), {"recipe": recipe, "rows": rows, "tables": tables}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", nargs="+", default=None, help="default: every recipe")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--configs", type=Path, default=ROOT / "configs")
    args = p.parse_args()
    recipes = args.recipe or sorted(d.name for d in (ROOT / "recipes").iterdir() if d.is_dir())
    for recipe in recipes:
        text, data = matrix(recipe, args.results, args.configs)
        stem = args.results / recipe / "support_matrix"
        for suffix, body in ((".json", json.dumps(data, indent=1) + "\n"), (".md", text)):
            path = stem.with_suffix(suffix)
            atomic_write(path, lambda tmp, body=body: tmp.write_text(body))
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
