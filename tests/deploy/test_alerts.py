"""The shipped Prometheus alert rules are well formed and only name metrics the exporter serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from workers.adapters.redis.metrics import METRICS

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_rule_is_complete() -> None:
    for rule in rules():
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("page", "ticket")
        assert rule["annotations"]["summary"]


def test_rules_name_only_metrics_the_exporter_serves() -> None:
    served = set().union(*(m.sample_names for m in METRICS.values()))
    for rule in rules():
        for name in re.findall(r"animate_queue_[a-z_]+", rule["expr"]):
            assert name in served, (rule["alert"], name)


def test_the_issues_alarms_are_there() -> None:
    """A routed queue with no consumer and a queue whose oldest message ages both page."""
    by_name = {rule["alert"]: rule for rule in rules()}
    assert "animate_queue_broker_queue_consumers" in by_name["AnimateQueueNoConsumer"]["expr"]
    assert "oldest_seconds" in by_name["AnimateQueueBacklogAging"]["expr"]
    assert "animate_queue_copies_at_risk" in by_name["AnimateQueueVideoAtRisk"]["expr"]
    for name in ("AnimateQueueNoConsumer", "AnimateQueueBacklogAging", "AnimateQueueVideoAtRisk"):
        assert by_name[name]["labels"]["severity"] == "page"
