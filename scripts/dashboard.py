"""The Grafana dashboard's PromQL queries (docker/grafana/dashboards/serving.json) as Prometheus runs them.

Grafana fills in its variables before a query reaches Prometheus; ``Query.promql`` does the same
with fixed values (``GRAFANA_VARIABLES``), so the deploy check can run every panel's query against
the real Prometheus and the tests can name the metrics each one reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

#: Grafana's variables as the queries are checked: a 1-minute rate window, every model.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".+"}
#: Words of PromQL that are neither functions nor metrics.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
#: Metrics that only a server on a GPU exports (NVML).
GPU_PREFIX = "gpu_"


@dataclass(frozen=True)
class Query:
    """One target of one dashboard panel."""

    title: str
    ref: str
    expr: str

    def promql(self) -> str:
        text = self.expr
        for variable, value in GRAFANA_VARIABLES.items():
            text = text.replace(variable, value)
        return " ".join(text.split())

    @property
    def metrics(self) -> set[str]:
        return metric_names(self.promql())

    @property
    def gpu_only(self) -> bool:
        return any(name.startswith(GPU_PREFIX) for name in self.metrics)


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers, ranges,
    grouping clauses, functions, keywords and numbers are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", promql)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b[A-Za-z_][A-Za-z0-9_]*\s*\(", "(", text)  # functions and aggregations
    words = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b", text)
    return {word for word in words if word not in KEYWORDS and not re.fullmatch(r"[eE]|[Ii]nf|NaN", word)}


def dashboard_queries(path: Path) -> list[Query]:
    """Every panel target's query, in panel order (rows' nested panels included)."""
    dashboard = json.loads(path.read_text())
    panels = list(dashboard.get("panels", []))
    queries = []
    while panels:
        panel = panels.pop(0)
        panels[:0] = panel.get("panels", [])
        queries += [Query(panel["title"], target["refId"], target["expr"]) for target in panel.get("targets", [])]
    return queries
