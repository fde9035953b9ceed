"""The comparison's plan: which servers, with which flags, in which order, at which loads, and
whether a measured step or a pair of servers may be compared at all.

Pure: no server is started and nothing is measured here (``loadtest.compare.run`` does that).

- ``Options``: the comparison's settings (its command line); ``server_args_for_all`` is
  every server flag, explicit, the same for both servers.
- ``plan_arms``: the servers to measure (each framework per ``--matrix`` combination, and
  ``--target`` references) and the pairs the verdict compares; ``abba`` their order.
- ``rate_grid``: one grid of absolute open-loop rates for every server;
  ``locust_processes``: how many Locust processes a step needs.
- ``pinning``: which cores the servers and the generator get (``cpu_split``), with the
  servers' ``--workers`` (``server_workers``) taken into account.
- ``invalid_reasons``: why a measured step cannot be trusted; ``check_settings``: why two
  servers cannot be compared (their ModelConfig differs).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.settings import AUTO_WORKERS_MAX

FRAMEWORKS = ("torch", "tensorflow")
SERVER_LABELS = {"torch": "torch_server", "tensorflow": "tf_server"}
GENERATOR_CPU_LIMIT = 0.90
#: Most failed requests a step may have and still meet the latency objective (``--slo-ms``).
SLO_ERROR_RATE = 0.01
SEND_LAG_LIMIT_MS = 10.0
OTHER_CPU_LIMIT = 0.25
MIN_WINDOW_FRACTION = 0.8
#: Most of a core one Locust process is planned to use; above it a step gets more processes.
PROCESS_CPU_BUDGET = 0.6
#: Server settings the comparison passes explicitly (Options field -> server flag).
SERVER_FLAGS = {
    "device": "--device",
    "threads": "--threads",
    "precision": "--precision",
    "compile": "--compile",
    "max_batch_size": "--max-batch-size",
    "max_queue_delay_us": "--max-queue-delay-us",
    "max_queue_size": "--max-queue-size",
    "instances": "--instances",
    "grpc_threads": "--grpc-threads",
}
#: What ``--matrix`` may vary.
MATRIX_KEYS = ("precision", "compile", "device", "threads", "max_batch_size", "max_queue_delay_us", "instances")

Step = dict[str, Any]


# ---------------------------------------------------------------- options


@dataclass
class Options:
    """The comparison's settings (the CLI flags)."""

    model: str = "mlp"
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    rates: list[float] = field(default_factory=list)
    rate_fractions: list[float] = field(default_factory=lambda: [0.5, 0.9])
    overload: float = 1.1
    arrival: str = "poisson"
    arrival_users: int = 4
    deadline_ms: float = 1000.0
    step_seconds: float = 3.0
    warmup_seconds: float = 0.5
    repeats: int = 3
    slo_ms: float = 50.0
    batch_size: int = 1
    encoding: str = "raw"
    device: str = "cpu"
    threads: int = 1
    precision: str = "fp32"
    compile: str = "off"
    max_batch_size: int = 32
    dynamic_batching: bool = True
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    instances: int = 1
    grpc_threads: int = 0
    server_args: list[str] = field(default_factory=list)
    torch_target: str | None = None
    tf_target: str | None = None
    torch_metrics: str | None = None
    tf_metrics: str | None = None
    targets: list[str] = field(default_factory=list)
    matrix: list[str] = field(default_factory=list)
    locust_processes: str = "auto"
    connections: str = "auto"
    out: Path | None = None
    out_root: Path | None = None
    torch_repository: Path | None = None
    tf_repository: Path | None = None
    parity_atol: float | None = None
    parity_rtol: float | None = None
    #: Go on when the servers' outputs differ beyond tolerance (``loadtest.compare.fidelity``).
    allow_mismatch: bool = False
    #: ``on``: the drain scenario after the open loop (``loadtest.compare.drain``); ``off``: none.
    drain: str = "on"
    cpu_split: str = "auto"
    #: The SLO capacity search (``loadtest.compare.capacity``): on or off, and its settings.
    capacity: str = "on"
    capacity_precision: float = 0.05
    capacity_step_seconds: float = 2.0
    capacity_warmup_seconds: float = 0.5
    capacity_start: float | None = None
    capacity_max_probes: int = 10
    capacity_replays: int = 0
    #: Each server at its best (``loadtest.compare.sweep``): on or off, and the values each setting may take.
    sweep: bool = False
    sweep_space: list[str] = field(default_factory=list)

    @property
    def remote(self) -> bool:
        return bool(self.torch_target or self.tf_target)

    @property
    def reference_concurrency(self) -> int:
        """The sweep's middle concurrency: where single-step figures (p50/p99, CPU/request, CDF) are compared."""
        ordered = sorted(self.concurrency)
        return ordered[len(ordered) // 2]

    def server_args_for_all(self, variant: dict[str, str] | None = None) -> list[str]:
        """Every server flag, explicit and the same for both servers (``variant`` overrides matrix keys)."""
        values = {name: getattr(self, name) for name in SERVER_FLAGS} | (variant or {})
        args = [part for name, flag in SERVER_FLAGS.items() for part in (flag, str(values[name]))]
        args.append("--dynamic-batching" if self.dynamic_batching else "--no-dynamic-batching")
        return [*args, "--warmup", *self.server_args]


def parse_list(text: str, kind: Callable[[str], Any]) -> list[Any]:
    """``"1, 4,16"`` -> ``[1, 4, 16]`` (with ``kind`` applied)."""
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def parse_axes(items: Sequence[str], keys: Sequence[str], flag: str) -> dict[str, list[str]]:
    """``["precision=fp32,bf16", "compile=off,on"]`` -> ``{"precision": ["fp32", "bf16"], ...}`` (each value
    once), every key one of ``keys``; ``ValueError`` naming ``flag`` otherwise."""
    axes: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in keys or not parse_list(values, str):
            raise ValueError(f"{flag} {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(keys)}")
        if key in axes:
            raise ValueError(f"{flag} names {key} twice")
        axes[key] = list(dict.fromkeys(parse_list(values, str)))
    return axes


def parse_matrix(items: Sequence[str]) -> list[dict[str, str]]:
    """``["precision=fp32,bf16", "compile=off,on"]`` -> every combination, as ``{key: value}`` dicts."""
    axes = parse_axes(items, MATRIX_KEYS, "--matrix")
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def cpu_split(
    mode: str, available: Sequence[int], server_cores: int | None = None
) -> tuple[list[int] | None, list[int] | None]:
    """(server cpus, generator cpus): ``auto`` gives the server the first ``server_cores`` (default: half,
    at most all but one), Locust the rest; ``none``, or a single cpu: no pinning."""
    cpus = sorted(available)
    if mode == "none" or len(cpus) < 2:
        return None, None
    cores = len(cpus) // 2 if server_cores is None else max(1, min(server_cores, len(cpus) - 1))
    return cpus[:cores], cpus[cores:]


def server_workers(args: Sequence[str]) -> int | str | None:
    """The ``--workers`` among server flags (``--workers=N`` or ``--workers N``, the last one counts): a count,
    ``"auto"``, or None when not given; ``ValueError`` when it is neither."""
    value = None
    for i, arg in enumerate(args):
        if arg == "--workers":
            value = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith("--workers="):
            value = arg.partition("=")[2]
    if value is None:
        return None
    if value.strip().lower() == "auto":
        return "auto"
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"--server-arg --workers {value!r}: must be auto or a count >= 1")
    return int(value)


#: Connections per Locust process for each server worker (``--connections auto``): the kernel hashes
#: connections onto the workers' sockets, so with 4 each a worker gets none with probability ~(1-1/W)^(4W).
CONNECTIONS_PER_WORKER = 4


def connections(asked: str, workers: int) -> int:
    """gRPC connections per Locust process: ``asked`` as a count, or auto: one for a lone server
    (every user on one HTTP/2 connection, as a client would), ``CONNECTIONS_PER_WORKER`` per worker
    with several, so that the kernel spreads them over the workers."""
    if asked != "auto":
        if not asked.isdigit() or int(asked) < 1:
            raise ValueError(f"--connections {asked!r}: must be auto or a count >= 1")
        return int(asked)
    return 1 if workers <= 1 else CONNECTIONS_PER_WORKER * workers


def pinning(mode: str, available: Sequence[int], server_args: Sequence[str] = ()) -> dict[str, Any]:
    """Which cores the server and the generator get (``cpu_split``), as results.json records it.

    A server with ``--workers N`` (N > 1) gets N cores, the generator the rest, as long as one core is left
    for the generator; otherwise the server gets all but one and ``warning`` says that its workers share
    cores. ``--workers auto`` (one worker per core the server may use, at most ``AUTO_WORKERS_MAX``) gets
    all but the generator's core, at most that many. One worker, or none named: the halves as before.
    ``server_workers``: the workers the server will run (auto: as it will count them).
    """
    cpus = sorted(available)
    asked = server_workers(server_args)
    wanted = asked if isinstance(asked, int) else None
    if asked == "auto":
        wanted = min(max(len(cpus) - 1, 1), AUTO_WORKERS_MAX)
    server, generator = cpu_split(mode, cpus, wanted if wanted is not None and wanted > 1 else None)
    workers = wanted or 1
    if asked == "auto":
        workers = min(len(server or cpus), AUTO_WORKERS_MAX)
    warning = None
    if mode != "none" and workers > 1:
        if server is None:
            warning = f"one CPU only: nothing pinned, the server's {workers} workers share it with the generator"
        elif len(server) < workers:
            warning = (
                f"--workers {workers} needs {workers} server cores, but {len(cpus)} are available and the "
                f"generator keeps one: the server gets {server}, so its {workers} workers share "
                f"{len(server)} core{'s' if len(server) > 1 else ''}"
            )
    return {
        "mode": mode,
        "server_cpus": server,
        "generator_cpus": generator,
        "server_workers": workers,
        "workers_flag": None if asked is None else str(asked),
        "warning": warning,
    }


# ---------------------------------------------------------------- what is measured, in which order


@dataclass
class Arm:
    """One server of the comparison: a framework server in one settings variant, or a reference.

    ``target`` is set for servers that already run (``--torch-target``, ``--target``);
    the others are started by the runner with ``server_args``.
    """

    name: str
    label: str
    framework: str | None
    variant: dict[str, str]
    server_args: list[str] = field(default_factory=list)
    target: str | None = None
    metrics_url: str | None = None

    @property
    def kind(self) -> str:
        if self.framework is None:
            return "reference"
        return "remote" if self.target else "local"


def variant_name(variant: dict[str, str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in variant.items())


def parse_target(text: str) -> tuple[str, str, str | None]:
    """``NAME=HOST:PORT[,METRICS_URL]`` -> (name, target, metrics url)."""
    name, sep, rest = text.partition("=")
    target, _, metrics = rest.partition(",")
    if not sep or not name.strip() or ":" not in target:
        raise ValueError(f"--target {text!r}: expected NAME=HOST:PORT (optionally ,METRICS_URL)")
    return name.strip(), target.strip(), metrics.strip() or None


def plan_arms(opts: Options) -> tuple[list[Arm], list[dict[str, Any]]]:
    """The servers to measure and the variants (each: its torch and tf arm, compared in the verdict)."""
    variants = parse_matrix(opts.matrix) if opts.matrix else [{}]
    arms: list[Arm] = []
    groups: list[dict[str, Any]] = []
    for variant in variants:
        suffix = f"[{','.join(f'{k}={v}' for k, v in variant.items())}]" if variant else ""
        members = {}
        for framework in FRAMEWORKS:
            label = SERVER_LABELS[framework] + (f" ({variant_name(variant)})" if variant else "")
            arm = Arm(f"{framework}{suffix}", label, framework, variant, opts.server_args_for_all(variant))
            if opts.remote:
                torch = framework == "torch"
                arm.target = opts.torch_target if torch else opts.tf_target
                arm.metrics_url = opts.torch_metrics if torch else opts.tf_metrics
            arms.append(arm)
            members[framework] = arm.name
        groups.append({"name": variant_name(variant) or "as set", "values": variant, "arms": members})
    for text in opts.targets:
        name, target, metrics = parse_target(text)
        if any(arm.name == name for arm in arms):
            raise ValueError(f"--target name {name!r} is taken")
        arms.append(Arm(name, f"{name} (reference)", None, {}, target=target, metrics_url=metrics))
    return arms, groups


def abba(items: Sequence[Any], repeat: int) -> list[Any]:
    """The run order of one repeat: forward on even repeats, reversed on odd ones (ABBA...)."""
    return list(items) if repeat % 2 == 0 else list(reversed(items))


@dataclass
class Scenario:
    """One step's load: ``closed`` with ``value`` users, or ``open`` at ``value`` requests/s."""

    mode: str
    value: float

    @property
    def label(self) -> str:
        return f"c={self.value:g}" if self.mode == "closed" else f"rate={self.value:g}/s"


def peak(steps: Sequence[dict[str, Any]], *, valid: bool = True) -> float | None:
    """Best mean throughput over one server's closed-loop steps, by concurrency: over its valid ones
    (``valid``; None if none is), or over all of them."""
    groups: dict[int, list[float]] = {}
    for step in steps:
        if step["mode"] == "closed" and (step["valid"] or not valid):
            groups.setdefault(step["concurrency"], []).append(step["throughput_rps"])
    return max((statistics.fmean(values) for values in groups.values()), default=None)


def rate_grid(
    steps: Mapping[str, Sequence[dict[str, Any]]], fractions: Sequence[float], overload: float
) -> dict[str, Any]:
    """One grid of absolute rates for every server: ``fractions`` of the lower peak, ``overload`` x the higher.

    Peaks come from valid closed-loop steps; a server without one falls back to its invalid
    steps, and the grid says so (``invalid_peaks``).
    """
    peaks = {name: peak(server_steps) for name, server_steps in steps.items()}
    invalid = [name for name, value in peaks.items() if value is None]
    for name in invalid:
        peaks[name] = peak(steps[name], valid=False)
    known = [value for value in peaks.values() if value]
    grid: dict[str, Any] = {"rates": [], "lower_peak_rps": None, "higher_peak_rps": None, "peaks": peaks,
                            "invalid_peaks": invalid}  # fmt: skip
    if not known:
        return grid
    lower, higher = min(known), max(known)
    rates = {round(max(fraction * lower, 1.0), 1) for fraction in fractions}
    if overload > 0:
        rates.add(round(overload * higher, 1))
    return grid | {"rates": sorted(rates), "lower_peak_rps": lower, "higher_peak_rps": higher}


def locust_processes(
    scenario: Scenario, requested: str, generator_cores: int, us_per_request: float, rate_hint: float
) -> int:
    """Locust processes for a step: ``requested`` when a number; ``auto``: enough that none needs more than
    ``PROCESS_CPU_BUDGET`` of a core for the expected rate (open: the offered rate; closed: ``rate_hint``),
    at most one per generator core (and per user)."""
    if requested != "auto":
        return max(1, int(requested))
    rate = scenario.value if scenario.mode == "open" else rate_hint
    needed = math.ceil(rate * us_per_request / 1e6 / PROCESS_CPU_BUDGET) if rate > 0 else 1
    most = generator_cores if scenario.mode == "open" else min(generator_cores, int(scenario.value))
    return max(1, min(needed, most))


def invalid_reasons(step: dict[str, Any], *, local: bool = True, generator_cores: int = 1) -> list[str]:
    """Why a measured step cannot be trusted (empty: valid).

    ``local``: server, generator and runner share this host, so any other busy CPU is a
    neighbour's (with a remote server it may be the server itself, and is not judged).
    ``generator_cores``: cores the step's Locust processes could use (one per process at most).
    """
    reasons = []
    generator = step["generator_cpu_pct"]["mean"]
    limit = GENERATOR_CPU_LIMIT * 100 * max(1, min(generator_cores, step.get("generator_processes", 1)))
    if generator is not None and generator > limit:
        reasons.append(f"generator CPU {generator:.0f}% > {limit:.0f}%")
    other = step["other_cpu_pct"]["mean"]
    if local and other is not None and other > OTHER_CPU_LIMIT * 100:
        reasons.append(f"other processes used {other:.0f}% CPU (> {OTHER_CPU_LIMIT * 100:.0f}%)")
    # Failed requests are the server's result (counted in latency, in the error rate, against the SLO),
    # not a fault of the measurement; only a window without a single success says nothing.
    if step["error_rate"] is None or step["successes"] == 0:
        reasons.append("no successful request in the window")
    if step["generator_exit_code"] < 0 and not step.get("generator_results_complete", False):
        reasons.append("Locust did not stop in time and was killed before writing all its results")
    if step["window_s"] < MIN_WINDOW_FRACTION * step["window_target_s"]:
        reasons.append(f"window cut to {step['window_s']:.1f} s")
    if step.get("resource_window_s", step["window_s"]) < 0.5 * step["window_s"]:
        reasons.append(f"resource samples cover only {step['resource_window_s']:.1f} s of the window")
    if step["mode"] == "open":
        expected = step["offered_rps"] * step["window_s"]
        sent = step["sent_rps"] * step["window_s"]
        if sent < 0.9 * expected - 3 * math.sqrt(expected):
            reasons.append(f"generator behind schedule: sent {step['sent_rps']:.0f}/s of {step['offered_rps']:.0f}/s")
        if step.get("unsent"):
            reasons.append(f"generator dropped {step['unsent']} arrivals (client backlog)")
        lag = step["send_lag_ms"]["p99"]
        if lag is not None and lag > SEND_LAG_LIMIT_MS:
            reasons.append(f"generator send lag p99 {lag:.0f} ms > {SEND_LAG_LIMIT_MS:g} ms")
    return reasons


# ---------------------------------------------------------------- fairness


def settings_view(config: dict[str, Any]) -> dict[str, Any]:
    """What must be equal between compared servers, as their ModelConfig reports it."""
    params = config.get("parameters", {})
    return {
        "device": params.get("device"),
        "threads": params.get("threads"),
        "precision": params.get("precision"),
        "compile": params.get("compile"),
        "max_batch_size": config.get("max_batch_size"),
        "instances": config.get("instances"),
        "dynamic_batching": config.get("dynamic_batching"),
    }


#: Settings a server may report below what was asked (as long as every server reports the same).
AT_MOST = frozenset({"max_batch_size"})


def check_settings(configs: dict[str, dict[str, Any]], expected: dict[str, Any] | None = None) -> list[str]:
    """Differences that forbid comparing these servers (empty: fair).

    ``configs``: ModelConfig descriptions by server label; every field of ``settings_view``
    must be equal across them, and equal to ``expected`` where it names one.
    """
    views = {label: settings_view(config) for label, config in configs.items()}
    problems = []
    for key in settings_view({}):
        seen = {label: view[key] for label, view in views.items()}
        if len({repr(value) for value in seen.values()}) > 1:
            problems.append(f"{key}: " + ", ".join(f"{label} {value}" for label, value in seen.items()))
        elif expected and key in expected and (value := next(iter(seen.values()))) != expected[key]:
            # A model may cap its own batch size (a config.json of the user's): below the flag, both alike, is fair.
            if key in AT_MOST and isinstance(value, int) and value <= expected[key]:
                continue
            problems.append(f"{key}: asked for {expected[key]}, the servers report {value}")
    return problems


def expected_settings(opts: Options, variant: dict[str, str]) -> dict[str, Any]:
    """The ModelConfig fields the requested flags determine (in the form ``settings_view`` gives)."""
    values = {name: str(getattr(opts, name)) for name in SERVER_FLAGS} | variant
    expected: dict[str, Any] = {
        "threads": values["threads"],
        "precision": values["precision"],
        "compile": values["compile"],
        "max_batch_size": int(values["max_batch_size"]),
        "instances": int(values["instances"]),
    }
    if values["device"] not in ("auto", "cuda"):
        expected["device"] = values["device"]
    return expected
