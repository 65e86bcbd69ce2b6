"""Runs `kaseg demo --compare` for several seeds and prints the mean and spread of each row.

    python scripts/evidence.py --seeds 0 1 2 --out runs/evidence [--markdown]

Each seed is a complete, independent demo (its own teacher, auto-encoder and students)
in ``OUT/seed<N>``; finished seeds are reused, so the script can be interrupted and
re-run. The table it prints is the one in the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run_seed(out: Path, seed: int) -> dict:
    folder = out / f"seed{seed}"
    subprocess.run(
        [sys.executable, "-m", "kaseg.cli", "demo", "--compare", "--seed", str(seed), "--out", str(folder)],
        check=True,
    )
    return json.loads((folder / "summary.json").read_text())


def aggregate(summaries: list[dict]) -> list[dict]:
    """Rows (matched by run name, in the order of the first summary) with mean/stdev of
    mIoU and the gain over the student alone of the same seed."""
    by_run = [{row["run"]: row for row in summary["rows"]} for summary in summaries]
    missing = set().union(*by_run) - set.intersection(*(set(rows) for rows in by_run))
    if missing:
        raise SystemExit(f"runs {sorted(missing)} are missing from some seeds; re-run those seeds")
    table = []
    for run, row in by_run[0].items():
        values = [rows[run]["miou"] for rows in by_run]
        gains = [rows[run]["miou"] - rows["student"]["miou"] for rows in by_run]
        table.append({
            "model": row["model"],
            "run": run,
            "miou_mean": statistics.mean(values),
            "miou_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "gain_mean": statistics.mean(gains),
            "gain_min": min(gains),
            "gain_max": max(gains),
            "per_seed": values,
        })
    return table


def markdown(table: list[dict], seeds: list[int]) -> str:
    lines = [
        f"| model | mIoU mean ± std ({len(seeds)} seeds) | gain vs student alone (mean, min..max) | per seed |",
        "|---|---|---|---|",
    ]
    for row in table:
        per_seed = ", ".join(f"{v:.1f}" for v in row["per_seed"])
        lines.append(
            f"| {row['model']} | {row['miou_mean']:.2f} ± {row['miou_std']:.2f} | "
            f"{row['gain_mean']:+.2f} ({row['gain_min']:+.1f}..{row['gain_max']:+.1f}) | {per_seed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/evidence"))
    args = parser.parse_args()
    summaries = [run_seed(args.out, seed) for seed in args.seeds]
    table = aggregate(summaries)
    (args.out / "evidence.json").write_text(json.dumps(table, indent=2))
    print(markdown(table, args.seeds))


if __name__ == "__main__":
    main()
