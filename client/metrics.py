"""Our servers' Prometheus metrics, read as a client: ``scrape`` one model's series from the
metrics endpoint (``--metrics-port``), ``parse_metrics`` the text it serves.

The one reader of that endpoint for every measuring tool: the load suite's sampler and
tools, and the GPU check (which runs where only the servers' own packages are installed:
this needs the standard library and prometheus-client, nothing of the load suite's).
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

#: Seconds a scrape waits for the endpoint unless told otherwise.
SCRAPE_TIMEOUT_S = 2.0


def parse_metrics(text: str, model: str) -> dict[str, float]:
    """Prometheus text -> ``{'name{label="v"}': value}`` for ``model``'s series and unlabelled ones.

    The ``model`` label is dropped, histogram buckets and ``_created`` stamps are skipped.
    """
    flat: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if "le" in labels or sample.name.endswith("_created") or labels.pop("model", model) != model:
                continue
            rendered = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
            key = f"{sample.name}{{{rendered}}}" if rendered else sample.name
            flat[key] = flat.get(key, 0.0) + sample.value
    return flat


def scrape(url: str | None, model: str, timeout: float = SCRAPE_TIMEOUT_S) -> dict[str, float]:
    """The server's metrics at ``url`` for ``model`` (``parse_metrics``); empty when there is no
    endpoint. OSError (URLError, TimeoutError) when it does not answer within ``timeout``."""
    if url is None:
        return {}
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return parse_metrics(reply.read().decode(), model)
