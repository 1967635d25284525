"""The paper's summary metric: the average rank over the clean column and the attack columns.

Per column, models are ranked by accuracy (1 = highest); tied models share the mean of the ranks
they span. A model's cell for the attack it was trained on is left out (the paper prints "–"
there), both from its own average and from that column's ranking; so is a missing value.
"""

from collections.abc import Mapping


def column_ranks(values: Mapping[str, float | None]) -> dict[str, float]:
    """Fractional ranks (1 = best) of the models that have a value in this column."""
    present = sorted(((v, k) for k, v in values.items() if v is not None), key=lambda p: -p[0])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(present):
        j = i
        while j + 1 < len(present) and present[j + 1][0] == present[i][0]:
            j += 1
        for _, name in present[i : j + 1]:
            ranks[name] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def average_rank(table: Mapping[str, Mapping[str, float | None]], trained_on: Mapping[str, str | None] | None = None
                 ) -> dict[str, float | None]:
    """table[model][column] = accuracy; returns each model's mean rank over its columns (None if it has none)."""
    trained_on = trained_on or {}
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    sums: dict[str, list[float]] = {m: [] for m in table}
    for column in columns:
        values = {m: row.get(column) for m, row in table.items() if trained_on.get(m) != column}
        for m, r in column_ranks(values).items():
            sums[m].append(r)
    return {m: sum(r) / len(r) if r else None for m, r in sums.items()}


def report_ranks(models: Mapping[str, dict], settings: list[str]) -> dict[str, dict[str, float | None]]:
    """average_rank per setting from a report's `models` section (clean column + that setting's attacks)."""
    out = {}
    for setting in settings:
        table = {name: {"clean": m["clean_accuracy"],
                        **{a: e["accuracy"] for a, e in m["attacks"].get(setting, {}).items()}}
                 for name, m in models.items()}
        out[setting] = average_rank(table, {name: m.get("trained_on") for name, m in models.items()})
    return out
