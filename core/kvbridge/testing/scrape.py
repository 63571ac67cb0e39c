"""Read a Prometheus text endpoint into ``{key: value}`` for assertions (engine harnesses).

Parsed with ``prometheus_client``'s own parser (the ``metrics`` extra), so the exposition
format's escaping and comments are handled the way the exporter wrote them.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Collection


def parse_metrics(
    text: str, *, labels: bool = True, ignore_labels: Collection[str] = ()
) -> dict[str, float]:
    """``name{label="value",...}`` -> value, summed over the labels left out of the key.

    ``labels`` False keys every sample by its name alone; ``ignore_labels`` names labels
    left out of the key (an engine's ``engine`` or ``model_name``)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            kept = (
                [f'{k}="{v}"' for k, v in sample.labels.items() if k not in ignore_labels]
                if labels
                else []
            )
            key = sample.name + (f"{{{','.join(kept)}}}" if kept else "")
            out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def scrape(
    url: str, *, labels: bool = True, ignore_labels: Collection[str] = (), timeout: float = 10
) -> dict[str, float]:
    """:func:`parse_metrics` of what ``url`` (a ``/metrics`` endpoint) serves now."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read().decode()
    return parse_metrics(text, labels=labels, ignore_labels=ignore_labels)
