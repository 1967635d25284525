"""Compare two report.json files number by number: every leaf that differs, by its path, except wall times
(any key naming seconds) — what a refactor must leave unchanged (issue 17: "the report of a fixed-seed job is
identical before and after").

Run:  .venv/bin/python bench/compare_reports.py BEFORE/report.json AFTER/report.json
Exit status 0 when nothing but wall times differs, 1 otherwise (each difference printed).
"""

import json
import math
import sys
from pathlib import Path


def _timing(key: str) -> bool:
    return "seconds" in key


def differences(a, b, path: str = "") -> list[str]:
    """Every path where `a` and `b` differ (floats compared exactly: the runs are seeded on the same machine)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if _timing(k):
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'after' if k not in a else 'before'}")
            else:
                out += differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items before, {len(b)} after"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return [] if same else [f"{path}: {a!r} before, {b!r} after"]


def count_leaves(v) -> int:
    if isinstance(v, dict):
        return sum(count_leaves(x) for k, x in v.items() if not _timing(k))
    if isinstance(v, list):
        return sum(count_leaves(x) for x in v)
    return 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    before, after = (json.loads(Path(p).read_text()) for p in argv)
    diff = differences(before, after)
    for d in diff:
        print(d)
    print(f"{count_leaves(before)} values compared (wall times left out): {len(diff)} differ")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
