"""Counters per account and model, served at ``GET /_emulator/stats`` so tests can prove what was paid for."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any


class Stats:
    """Counts by (account, model) and by name: submissions, queries, 429s, errors, bytes served."""

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)

    def add(self, account: str, model: str, name: str, amount: int = 1) -> None:
        self.counts[(account, model)][name] += amount

    def clear(self) -> None:
        self.counts.clear()

    def snapshot(self, tasks_by_status: dict[tuple[str, str], Counter[str]]) -> dict[str, Any]:
        accounts: dict[str, dict[str, Any]] = {}
        keys = set(self.counts) | set(tasks_by_status)
        for account, model in sorted(keys):
            entry: dict[str, Any] = dict(self.counts.get((account, model), Counter()))
            statuses = tasks_by_status.get((account, model))
            if statuses:
                entry["tasks"] = dict(statuses)
            accounts.setdefault(account, {})[model] = entry
        totals: Counter[str] = Counter()
        for counter in self.counts.values():
            totals.update(counter)
        return {"accounts": accounts, "totals": dict(totals)}
