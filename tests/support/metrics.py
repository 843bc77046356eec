"""Scraping an app's /metrics (over HTTP, as Prometheus does) and reading samples from it."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cordum.server.app import App

from support.waiting import eventually


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample as (name, labels) -> value."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)


async def scrape(app: App) -> Scrape:
    async with httpx.AsyncClient(timeout=10.0) as client:
        reply = await client.get(f"http://127.0.0.1:{app.metrics_port}/metrics")
    reply.raise_for_status()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples)


async def wait_metric(
    app: App, name: str, expected: float, *, within: float = 30.0, **labels: str
) -> Scrape:
    """Scrape until `name{labels}` equals `expected`; the last scrape."""
    return await eventually(
        lambda: scrape(app),
        until=lambda s: s.value(name, **labels) == expected,
        within=within,
        interval=0.1,
        what=f"{name}{labels} == {expected} on {app.settings.roles}",
    )
