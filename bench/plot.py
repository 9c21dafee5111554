"""Plot a kernel benchmark's achieved bandwidth against its measured ceiling.

Reads the last run (latest date and device) of a results .jsonl file, keeps the
rows matching every `--where key=value`, and draws `--y` (GB/s) against `--x`,
one line per `--group` combination, with the run's copy bandwidth (the mean of
the rows' `--ceiling` column) as a dashed line. Needs matplotlib (optional).

    python -m bench.plot bench/results/attention.jsonl --x context --group cache,batch --where kind=decode
    python -m bench.plot bench/results/int4_matmul.jsonl --x M --group shape
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.harness import plot_bandwidth, read_results


def _matches(row: dict, where: list[tuple[str, str]]) -> bool:
    return all(str(row.get(k)) == v for k, v in where)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a bench/results/<name>.jsonl file")
    p.add_argument("--x", required=True, help="column on the x axis (e.g. M, context)")
    p.add_argument("--y", default="GBps", help="achieved GB/s column (default GBps)")
    p.add_argument("--group", default="", help="comma-separated columns: one line per combination")
    p.add_argument("--where", action="append", default=[], help="key=value filter, repeatable")
    p.add_argument("--ceiling", default="copy_GBps", help="column holding the measured ceiling in GB/s")
    p.add_argument("-o", "--output", type=Path, default=None, help="image path (default: beside the results)")
    args = p.parse_args(argv)
    where = []
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--where {item!r} is not key=value")
        where.append((key, value))
    rows = [r for r in read_results(args.results) if _matches(r, where)]
    if not rows:
        p.error(f"no row of the last run in {args.results} matches {args.where}")
    ceilings = [r[args.ceiling] for r in rows if isinstance(r.get(args.ceiling), (int, float))]
    out = args.output or args.results.with_suffix(".png")
    group = [g for g in args.group.split(",") if g]
    title = f"{args.results.stem} on {rows[0].get('device')} ({rows[0].get('date')})"
    path = plot_bandwidth(rows, out, args.x, args.y, group, statistics.mean(ceilings) if ceilings else None, title)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
