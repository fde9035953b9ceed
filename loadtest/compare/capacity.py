"""The SLO capacity search: the highest open-loop arrival rate a server sustains with its p99 latency
within ``--slo-ms`` and at most ``SLO_ERROR_RATE`` of its requests failed.

Pure: the search runs over an injected ``probe(rate) -> ProbeResult`` (``loadtest.compare.capacity_phase``
gives it one that measures a Poisson open-loop step against a server), so it is tested without servers.

- ``search``: bracket, then bisect. From the start rate (the lower valid closed-loop peak, or
  ``--capacity-start``) the rate grows by ``Search.factor`` until a probe fails, or shrinks by it until one
  passes; then the geometric midpoint of the bracket is probed until the highest passing rate and the
  lowest failing one are within ``precision`` of each other (``high / low ≤ 1 + precision``). The found
  capacity is the highest rate measured to pass (``low``). A probe whose measurement is invalid
  (``loadtest.compare.plan.invalid_reasons``) is neither a pass nor a fail: it is run once more, and when
  that one is invalid too the search stops, inconclusive. A search that would need more than ``max_probes``
  probes stops too (``budget exhausted``); neither gives a capacity. The bracket never grows past
  ``Search.max_rate``, the most the load generator can offer validly; a server that passes there has a
  capacity beyond what this host can measure (``above the generator's ceiling``, no value).
- ``summarize``: the searches of one server over the repeats as results.json keeps them (``capacity``):
  the found rates' mean with its Student-t 95 % interval (``loadtest.stats.mean_interval``), each repeat's
  probes, and the search's settings.
- ``judged``: a probe with its judgement (also for the replays of a found rate, ``--capacity-replays``).
- ``capacity_reading``: the verdict's reading of it (one value per conclusive repeat).
- ``dithered_start``: each repeat starts a fraction of the search's ``resolution`` higher, so that the
  repeats do not agree by construction.
- ``expected_probes``, ``budget_text``: what a search costs, told before it starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtest.stats import mean_interval

#: How a search ended. Only ``FOUND`` and ``NONE_PASSES`` (capacity 0) give a value.
FOUND = "found"
NONE_PASSES = "no rate passes"
INCONCLUSIVE = "inconclusive"
BUDGET_EXHAUSTED = "budget exhausted"
ABOVE_CEILING = "above the generator's ceiling"


@dataclass(frozen=True)
class ProbeResult:
    """One measured open-loop step at ``rate``: its p99 latency (failures included), error rate, and
    whether the measurement can be trusted (``reasons``: why not)."""

    rate: float
    p99_ms: float | None
    error_rate: float | None
    valid: bool
    reasons: tuple[str, ...] = ()
    #: Other figures of the step worth keeping beside the probe (throughput, sent rate...).
    extra: dict[str, Any] = field(default_factory=dict)


Probe = Callable[[float], ProbeResult]


@dataclass(frozen=True)
class Search:
    """The search's settings: the objective, the precision it stops at, and its limits."""

    slo_ms: float
    error_limit: float
    precision: float = 0.1
    factor: float = 2.0
    max_probes: int = 12
    #: Below this rate (req/s) no rate is tried: the server meets the objective at none.
    min_rate: float = 1.0
    #: The highest rate the load generator can offer validly (req/s; None: no limit): the bracket grows up
    #: to it, never past it, and a server that passes there has a capacity this host cannot measure.
    max_rate: float | None = None

    def __post_init__(self) -> None:
        if self.precision <= 0 or self.factor <= 1 or self.max_probes < 1 or self.min_rate <= 0:
            raise ValueError("a search needs precision > 0, factor > 1, max_probes >= 1 and min_rate > 0")

    def passes(self, result: ProbeResult) -> bool:
        """Whether a valid probe meets the objective: p99 ≤ ``slo_ms`` and error rate ≤ ``error_limit``."""
        if result.p99_ms is None or result.error_rate is None:
            return False
        return result.p99_ms <= self.slo_ms and result.error_rate <= self.error_limit


def _probe_dict(result: ProbeResult, judged: bool | None) -> dict[str, Any]:
    return {
        "rate": result.rate,
        "p99_ms": result.p99_ms,
        "error_rate": result.error_rate,
        "valid": result.valid,
        "pass": judged,
        "invalid_reasons": list(result.reasons),
        **result.extra,
    }


@dataclass
class Outcome:
    """One search: the capacity found (None unless ``status`` is found, or 0 when no rate passes), the
    final bracket (highest passing, lowest failing rate; None where none was seen) and every probe run,
    with its judgement (None for an invalid one). ``replays``: steps at the found rate run after the
    search (``--capacity-replays``), judged alike."""

    status: str
    found: float | None
    low: float | None
    high: float | None
    probes: list[tuple[ProbeResult, bool | None]]
    reason: str | None = None
    replays: list[tuple[ProbeResult, bool | None]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "status": self.status,
            "reason": self.reason,
            "bracket": [self.low, self.high],
            "probes": [_probe_dict(result, judged) for result, judged in self.probes],
            "replays": [_probe_dict(result, judged) for result, judged in self.replays],
        }


def judged(result: ProbeResult, settings: Search) -> tuple[ProbeResult, bool | None]:
    """A probe with its judgement: pass or fail when valid, None when invalid."""
    return result, settings.passes(result) if result.valid else None


class _Stop(Exception):
    """The search cannot go on: ``status`` and ``reason`` say why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def search(probe: Probe, start: float, settings: Search) -> Outcome:
    """The highest rate meeting the objective, bracketed from ``start`` and bisected to ``settings.precision``
    (the module docstring tells the rules)."""
    if start <= 0:
        raise ValueError(f"the search starts at a positive rate, not {start}")
    probes: list[tuple[ProbeResult, bool | None]] = []

    def judge(rate: float) -> tuple[float, bool]:
        """The rate as probed (the probe may round it) and whether it passed."""
        for _ in range(2):  # an invalid probe is run once more, never judged
            if len(probes) >= settings.max_probes:
                raise _Stop(BUDGET_EXHAUSTED, f"{settings.max_probes} probes run before the bracket was narrow enough")
            result = probe(rate)
            if result.valid:
                passed = settings.passes(result)
                probes.append((result, passed))
                return result.rate, passed
            probes.append((result, None))
        reasons = "; ".join(result.reasons) or "invalid"
        raise _Stop(INCONCLUSIVE, f"the probe at {result.rate:g}/s was invalid twice ({reasons})")

    low: float | None = None
    high: float | None = None
    try:
        ceiling = settings.max_rate or math.inf
        rate, passed = judge(min(start, ceiling))
        if passed:
            low = rate
            while high is None:
                if rate >= ceiling:
                    reason = f"passes at {rate:g}/s, the most this load generator can offer validly"
                    return Outcome(ABOVE_CEILING, None, low, None, probes, reason)
                rate, passed = judge(min(rate * settings.factor, ceiling))
                low, high = (rate, high) if passed else (low, rate)
        else:
            high = rate
            while low is None:
                if rate / settings.factor < settings.min_rate:
                    reason = f"fails at every rate tried, down to {high:g}/s"
                    return Outcome(NONE_PASSES, 0.0, None, high, probes, reason)
                rate, passed = judge(rate / settings.factor)
                low, high = (rate, high) if passed else (low, rate)
        while high / low > 1 + settings.precision:
            rate, passed = judge(math.sqrt(low * high))
            low, high = (rate, high) if passed else (low, rate)
    except _Stop as stop:
        return Outcome(stop.status, None, low, high, probes, stop.reason)
    return Outcome(FOUND, low, low, high, probes)


def bisections(settings: Search) -> int:
    """Bisections that narrow a bracket of ``factor`` to ``1 + precision`` (each halves its log-width)."""
    return max(0, math.ceil(math.log2(math.log(settings.factor) / math.log1p(settings.precision))))


def resolution(settings: Search) -> float:
    """The ratio of the final bracket: every rate a search probes is ``start x factor^(m / 2^k)`` (k:
    ``bisections``), so the rates it can find are this ratio apart."""
    return float(settings.factor ** (1 / 2 ** bisections(settings)))


def dithered_start(start: float, repeat: int, repeats: int, settings: Search) -> float:
    """Where repeat ``repeat`` of ``repeats`` starts: ``start x resolution^(repeat / repeats)``.

    Searches from one start end on one lattice of rates, so repeats would find the same rate by
    construction whenever the noise is smaller than a lattice cell: an interval of zero width, and a
    "winner beyond noise" from one cell's difference. Shifting each repeat's lattice by a fraction of
    a cell (the same shift for every server in that repeat) spreads the found rates over the
    search's resolution: the interval then covers it, and the mean resolves finer than one search.
    """
    return start * resolution(settings) ** ((repeat % repeats) / repeats)


def expected_probes(settings: Search) -> int:
    """Probes of a search whose first bracket takes one step (the start and one rate ``factor`` away), no
    probe repeated: two, then ``bisections``."""
    return 2 + bisections(settings)


def budget_text(settings: Search, searches: int, probe_seconds: float, start_seconds: float) -> str:
    """What the capacity phase will cost: ``searches`` searches (servers x repeats) of about
    ``expected_probes`` probes of ``probe_seconds`` each, and a server start each (``start_seconds``)."""
    typical = expected_probes(settings)
    seconds = searches * (typical * probe_seconds + start_seconds)
    most = searches * (settings.max_probes * probe_seconds + start_seconds)
    return (
        f"{searches} searches of about {typical} probes (at most {settings.max_probes}) of ~{probe_seconds:.0f} s: "
        f"about {seconds / 60:.1f} min, at most {most / 60:.1f} min"
    )


def summarize(outcomes: Sequence[tuple[int, Outcome]], settings: Search, start: float) -> dict[str, Any]:
    """One server's ``capacity`` in results.json from its searches (``(repeat, outcome)``, in run order;
    ``start``: the rate the repeats' starts were dithered from)."""
    values = [outcome.found for _, outcome in outcomes if outcome.found is not None]
    interval = mean_interval(values)
    replays = [passed for _, outcome in outcomes for _, passed in outcome.replays]
    return {
        "mean": interval["mean"],
        "interval": interval["interval"],
        "half_width_pct": interval["half_width_pct"],
        "values": values,
        "repeats": [{"repeat": repeat, **outcome.as_dict()} for repeat, outcome in outcomes],
        # Replays of each repeat's found rate: how many met the objective, of the valid ones, of all run.
        "replays": {"passed": replays.count(True), "valid": len(replays) - replays.count(None), "run": len(replays)},
        "slo_ms": settings.slo_ms,
        "error_limit": settings.error_limit,
        "precision": settings.precision,
        "resolution_pct": 100.0 * (resolution(settings) - 1),
        "factor": settings.factor,
        "max_probes": settings.max_probes,
        "max_rps": settings.max_rate,
        "start_rps": start,
    }


def capacity_reading(server: dict[str, Any], settings: dict[str, Any]) -> tuple[list[float], str]:
    """The verdict's values: the capacity each conclusive repeat found (none when not searched)."""
    capacity = server.get("capacity") or {}
    values = list(capacity.get("values") or [])
    if not values:
        return [], ""
    searched = len(capacity.get("repeats") or [])
    return values, "" if searched == len(values) else f"{searched - len(values)} of {searched} searches inconclusive"
