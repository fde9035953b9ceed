"""Each server at its best (``--sweep``): which configuration of a server gives the highest SLO capacity.

Pure: the candidates, the successive-halving schedule, the ranking and the commands that reproduce a
configuration; ``loadtest.compare.sweep_phase`` measures them (one capacity search per candidate and rung).

- ``space``: the values each setting may take, per server: ``--sweep-space KEY=V1,V2 ...``, else
  ``default_space``: max batch size (a quarter, the comparison's, twice), queue delay (0, 1 ms), model
  instances (1, 2), worker processes (1, 2: only when the server has two cores or more), and precision
  (fp32, bf16) and compile (off, on) on a GPU only (on a CPU neither is swept: ``not_swept`` says why).
- ``candidates``: coarse to fine, not the full grid: the comparison's own configuration (the *base*) and
  every configuration that changes one setting of it. Rung 0 searches each with a coarse precision
  (``COARSE_PRECISION``); the better half (``survivors``: ranked by capacity, the base first among equals)
  goes on to rung 1, joined by the ``combined`` configuration (every setting whose change beat the base,
  together), searched at the comparison's ``--capacity-precision`` from where rung 0 found it. The best
  of rung 1 is the server's best; ``sweep_phase`` then measures it in every repeat (ABBA) for the
  "each at its best" verdict.
- ``score``: what a rung's search says of a candidate: its capacity, the generator's ceiling for one that
  passes there (it ties every other such one: the base wins the tie), nothing for an inconclusive one.
- ``budget``: the searches the sweep will run and about how long they take, told before it starts.
- ``serve_command``: the one command that serves a configuration (what an operator deploys).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtest.compare.capacity import ABOVE_CEILING, Outcome
from loadtest.compare.plan import parse_axes

#: Settings the sweep may vary (results.json and ``--sweep-space`` use these names).
SWEEP_KEYS = ("max_batch_size", "max_queue_delay_us", "instances", "workers", "precision", "compile")
#: Their server flags.
FLAGS = {
    "max_batch_size": "--max-batch-size",
    "max_queue_delay_us": "--max-queue-delay-us",
    "instances": "--instances",
    "workers": "--workers",
    "precision": "--precision",
    "compile": "--compile",
}
#: Rung 0's search precision: the capacity phase's bracket (x1.5) narrowed twice (rates about 11 % apart).
COARSE_PRECISION = 0.15
#: Rung 1's bracket factor: its search starts where rung 0 found the candidate, so it need not reach far.
FINE_FACTOR = 1.25
SERVER_MODULES = {"torch": "torch_server", "tensorflow": "tf_server"}

Config = dict[str, str]


def parse_space(items: Sequence[str]) -> dict[str, list[str]]:
    """``["max_batch_size=8,32,64", "instances=1,2"]`` -> ``{"max_batch_size": ["8", "32", "64"], ...}``."""
    return parse_axes(items, SWEEP_KEYS, "--sweep-space")


def default_space(base: Config, device: str, server_cores: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The values each setting takes by default, and the settings not swept with the reason why."""
    batch = int(base["max_batch_size"])
    axes = {
        "max_batch_size": [str(v) for v in sorted({max(1, batch // 4), batch, batch * 2})],
        "max_queue_delay_us": sorted({"0", "1000", base["max_queue_delay_us"]}, key=int),
        "instances": sorted({"1", "2", base["instances"]}, key=int),
    }
    not_swept = {}
    if server_cores >= 2:
        axes["workers"] = sorted({"1", "2", base["workers"]}, key=int)
    else:
        not_swept["workers"] = f"the server has {server_cores} core here: a second worker process would share it"
    if device.startswith("cuda"):
        axes["precision"] = list(dict.fromkeys([base["precision"], "fp32", "bf16"]))
        axes["compile"] = list(dict.fromkeys([base["compile"], "off", "on"]))
    else:
        reason = f"device {device}: reduced precision and compilation are swept on a GPU only"
        not_swept |= {"precision": reason, "compile": reason}
    return axes, not_swept


def label(config: Mapping[str, str], base: Mapping[str, str]) -> str:
    """A configuration named by what it changes: ``base``, or ``max_batch_size=64, instances=2``."""
    changes = [f"{key}={value}" for key, value in config.items() if base.get(key) != value]
    return ", ".join(changes) or "base"


def candidates(base: Config, axes: Mapping[str, Sequence[str]]) -> list[Config]:
    """The base, then every configuration that changes one of its settings to another value of its axis."""
    found = [dict(base)]
    for key, values in axes.items():
        found += [{**base, key: value} for value in values if value != base[key]]
    return found


def score(outcome: Outcome | None, ceiling: float | None) -> float | None:
    """A rung's reading of a candidate: the capacity found (0 when no rate passes), the ceiling when it
    passes at the generator's ceiling, None when the search said nothing (inconclusive, out of budget)."""
    if outcome is None:
        return None
    if outcome.found is not None:
        return outcome.found
    if outcome.status == ABOVE_CEILING:
        return outcome.low if outcome.low is not None else ceiling
    return None


@dataclass
class Candidate:
    """One configuration of one server and what each rung of the sweep measured of it."""

    config: Config
    name: str
    #: Per rung: the search's outcome as results.json keeps it, and its score.
    rungs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> float | None:
        """The latest rung's score."""
        return self.rungs[-1]["score"] if self.rungs else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config, "rungs": self.rungs}


def ranked(found: Sequence[Candidate]) -> list[Candidate]:
    """Best first: by score (None last); among equal scores the base first, then the run order."""
    order = {id(c): i for i, c in enumerate(found)}
    return sorted(found, key=lambda c: (-(c.score if c.score is not None else -math.inf), c.name != "base",
                                        order[id(c)]))  # fmt: skip


def survivors(found: Sequence[Candidate]) -> list[Candidate]:
    """The better half (rounded up) of a rung, by ``ranked``; candidates without a score never go on."""
    scored = [c for c in ranked(found) if c.score is not None]
    return scored[: math.ceil(len(found) / 2)]


def combined(found: Sequence[Candidate], base: Config) -> Config | None:
    """Every setting whose one change beat the base in rung 0, at its best value, together; None when fewer
    than two settings did (the result would be a candidate already run) or the base has no score."""
    base_score = next((c.score for c in found if c.name == "base"), None)
    if base_score is None:
        return None
    best: dict[str, tuple[float, str]] = {}
    for candidate in found:
        changed = [key for key, value in candidate.config.items() if base.get(key) != value]
        if len(changed) == 1 and candidate.score is not None and candidate.score > base_score:
            key = changed[0]
            if key not in best or candidate.score > best[key][0]:
                best[key] = (candidate.score, candidate.config[key])
    if len(best) < 2:
        return None
    return {**base, **{key: value for key, (_, value) in best.items()}}


def budget(count: int, servers: int, probes: tuple[int, int], probe_s: float, start_s: float, repeats: int) -> str:
    """What the sweep will cost: ``count`` candidates per server in rung 0 (``probes[0]`` probes each), about
    half of them plus the combined one in rung 1 (``probes[1]`` each), then the best measured ``repeats``
    times at the comparison's precision (``probes[1] + 1`` probes each)."""
    rung1 = math.ceil(count / 2) + 1
    searches = servers * (count + rung1 + repeats)
    seconds = servers * (count * (probes[0] * probe_s + start_s) + rung1 * (probes[1] * probe_s + start_s)
                         + repeats * ((probes[1] + 1) * probe_s + start_s))  # fmt: skip
    return (
        f"{servers} servers x ({count} candidates in rung 0, at most {rung1} in rung 1, the best x {repeats} repeats): "
        f"{searches} searches, about {seconds / 60:.1f} min"
    )


def config_args(server_args: Sequence[str], config: Mapping[str, str]) -> list[str]:
    """Server flags with the swept settings of ``config`` set (replaced where given, added where not)."""
    flags = {FLAGS[key] for key in config}
    args = [arg for arg in server_args if arg.partition("=")[0] not in flags or "=" not in arg]
    for key, value in config.items():
        flag = FLAGS[key]
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def serve_command(framework: str, model: str, server_args: Sequence[str], config: Mapping[str, str]) -> str:
    """The command that serves ``model`` in ``config``: the comparison's server flags with the swept ones set."""
    command = ["python", "-m", SERVER_MODULES[framework], "serve", "--model", model, *config_args(server_args, config)]
    return shlex.join(command)
