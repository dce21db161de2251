"""Fit the sizing model's constants from the committed sweep, and regenerate the README's capacity table.

    python scripts/fit_sizing_model.py            # print the constants for components/sizing.py
    python scripts/fit_sizing_model.py --readme   # rewrite the capacity table in README.md

The sweep (data/chroma_memory_sweep.json) holds the runs of scripts/measure_memory.py. Each fit
is a least-squares line over the runs measured for the sweep (rows marked as reference are
only compared against, never fitted):

- steady bytes = N x (a x dims + b) + c: per embedding a x dims + b, and c once per collection
  (what a small collection costs beyond its embeddings), fitted over the runs' totals;
- ingest headroom (peak RSS while loading minus steady RSS, in bytes) = h x the floats in one
  request (batch x dims) + h0, with h0 raised until the line covers every run, so that no measured
  load goes over it;
- disk bytes = N x (factor x 4 x dims + e) + f, the same way;
- the kept write log per embedding = l x dims + l0, from the earlier figures in the sweep file's
  `reference` (higher than this sweep's own `write_log` points, which a test compares with them).

tests/test_sizing_model.py refits from the file and checks components/sizing.py against it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from components import sizing  # noqa: E402

SWEEP_FILE = ROOT / "data" / "chroma_memory_sweep.json"
README = ROOT / "README.md"
TABLE_START = "<!-- capacity-table:start (scripts/fit_sizing_model.py --readme) -->"
TABLE_END = "<!-- capacity-table:end -->"
TABLE_DIMENSIONS = (384, 768, 1024, 1536)
# Common sizes, one per memory step, and Chroma's published figure at 1024 dimensions for that RAM.
TABLE_SIZES = (
    ("Standard_B2s", 700_000),
    ("Standard_D2s_v5", 1_700_000),
    ("Standard_E2s_v5", 3_600_000),
    ("Standard_E4s_v5", 7_500_000),
    ("Standard_E8s_v5", 15_000_000),
    ("Standard_E16s_v5", None),
    ("Standard_E32s_v5", None),
    ("Standard_E64s_v5", None),
)


def load_sweep(path: Path = SWEEP_FILE) -> dict[str, Any]:
    """The sweep file as data."""
    return json.loads(path.read_text(encoding="utf-8"))


def line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope and intercept of ys over xs."""
    count = len(xs)
    mean_x, mean_y = sum(xs) / count, sum(ys) / count
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return slope, mean_y - slope * mean_x


def plane(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Least-squares p, q, r of z = p x + q y + r over (x, y, z) rows (normal equations, Cramer's rule)."""
    sums = [[0.0] * 4 for _ in range(3)]
    for x, y, z in rows:
        basis = (x, y, 1.0)
        for i in range(3):
            for j in range(3):
                sums[i][j] += basis[i] * basis[j]
            sums[i][3] += basis[i] * z

    def det(m: list[list[float]]) -> float:
        return (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )

    matrix = [row[:3] for row in sums]
    whole = det(matrix)
    solution = []
    for column in range(3):
        swapped = [[sums[i][3] if j == column else matrix[i][j] for j in range(3)] for i in range(3)]
        solution.append(det(swapped) / whole)
    return solution[0], solution[1], solution[2]


def fit(sweep: dict[str, Any]) -> dict[str, Any]:
    """The model's constants, named as in components/sizing.py."""
    runs = sweep["runs"]
    steady_a, steady_b, steady_c = plane(
        [(run["embeddings"] * run["dimensions"], run["embeddings"], run["steady_rss_bytes"]) for run in runs]
    )
    floats = [run["batch"] * run["dimensions"] for run in runs]
    extra = [run["ingest_peak_rss_bytes"] - run["steady_rss_bytes"] for run in runs]
    headroom_h, _ = line(floats, extra)
    headroom_h0 = max(value - headroom_h * count for count, value in zip(floats, extra, strict=True))
    disk_slope, disk_e, disk_f = plane(
        [(run["embeddings"] * run["dimensions"], run["embeddings"], run["disk_bytes"]) for run in runs]
    )
    log_points = sweep["reference"]["write_log_points"]
    log_l, log_l0 = line([p["dimensions"] for p in log_points], [p["bytes_per_write"] for p in log_points])
    return {
        "MEASURED_CHROMA_VERSION": sweep["chroma_version"],
        "SERVER_BASELINE_BYTES": max(run["baseline_rss_bytes"] for run in runs),
        "STEADY_BYTES_PER_DIMENSION": round(steady_a, 3),
        "STEADY_BYTES_PER_EMBEDDING": round(steady_b, 1),
        "STEADY_BYTES_PER_COLLECTION": round(steady_c),
        "INGEST_HEADROOM_BYTES_PER_FLOAT": round(headroom_h, 3),
        "INGEST_HEADROOM_BYTES": round(headroom_h0),
        "DISK_FACTOR": round(disk_slope / sizing.FLOAT32_BYTES, 4),
        "DISK_BYTES_PER_EMBEDDING": round(disk_e, 1),
        "DISK_BYTES_PER_COLLECTION": round(disk_f),
        "WRITE_LOG_BYTES_PER_DIMENSION": round(log_l, 3),
        "WRITE_LOG_BYTES_PER_EMBEDDING": round(log_l0, 1),
    }


def sweep_table(sweep: dict[str, Any]) -> str:
    """The sweep's runs as a Markdown table."""
    lines = [
        "| dims | N | steady B/embedding | peak while loading B/embedding | disk B/embedding | disk / raw |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in sorted(sweep["runs"], key=lambda run: (run["dimensions"], run["embeddings"])):
        lines.append(
            f"| {run['dimensions']} | {run['embeddings']:,} | {run['steady_bytes_per_embedding']:,.0f} | "
            f"{run['ingest_peak_bytes_per_embedding']:,.0f} | {run['disk_bytes_per_embedding']:,.0f} | "
            f"{run['disk_factor']:.2f}x |"
        )
    return "\n".join(lines)


def _count(embeddings: int) -> str:
    if embeddings >= 1_000_000:
        return f"{embeddings / 1_000_000:.1f}M"
    return f"{embeddings / 1000:.0f}k"


def capacity_table() -> str:
    """Embeddings each common size holds under the model, beside Chroma's published figure."""
    header = "| size | RAM | " + " | ".join(f"{dims} dims" for dims in TABLE_DIMENSIONS)
    under = ", ".join(
        f"{1 - sizing.PUBLISHED_BYTES_PER_DIMENSION * dims / sizing.steady_bytes_per_embedding(dims):.0%} at {dims}"
        for dims in (128, 384, 1024, 3072)
    )
    model = (
        f"Measured model (Chroma {sizing.MEASURED_CHROMA_VERSION}): at rest, N x "
        f"({sizing.STEADY_BYTES_PER_DIMENSION:.2f} B x D + {sizing.STEADY_BYTES_PER_EMBEDDING:.0f} B) "
        f"+ {sizing.STEADY_BYTES_PER_COLLECTION / 1e6:.0f} MB per collection, over an empty server of "
        f"{sizing.SERVER_BASELINE_BYTES / 1e6:.0f} MB; while loading, up to "
        f"{sizing.ingest_headroom_bytes(4096) / 1e6:.0f} MB more; on disk, {sizing.DISK_FACTOR:.2f}x the raw "
        f"vectors + {sizing.DISK_BYTES_PER_EMBEDDING:.0f} B per embedding, and the kept write log "
        f"{sizing.WRITE_LOG_BYTES_PER_DIMENSION:.2f} B x D + {sizing.WRITE_LOG_BYTES_PER_EMBEDDING:.0f} B per write. "
        f"4 B x D is {under} dims short of the "
        "measured steady state."
    )
    lines = [
        model,
        "",
        header + " | Chroma's table, 1024 dims |",
        "| --- | ---: |" + " ---: |" * len(TABLE_DIMENSIONS) + " ---: |",
    ]
    for name, published in TABLE_SIZES:
        memory = sizing.VM_MEMORY_GIB[name]
        counts = " | ".join(_count(sizing.max_embeddings(memory, dims)) for dims in TABLE_DIMENSIONS)
        lines.append(f"| {name} | {memory:g} GiB | {counts} | {_count(published) if published else '-'} |")
    return "\n".join(lines)


def readme_with_table(text: str) -> str:
    """README text with the block between the table markers replaced by the current table."""
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[:start] + "\n" + capacity_table() + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's capacity table")
    parser.add_argument("--sweep", type=Path, default=SWEEP_FILE, help="the sweep file")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.readme:
        README.write_text(readme_with_table(README.read_text(encoding="utf-8")), encoding="utf-8")
        print("README.md capacity table rewritten")
        return 0
    print(sweep_table(sweep))
    print()
    for name, value in fit(sweep).items():
        print(f"{name} = {json.dumps(value) if isinstance(value, str) else repr(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
