"""The command blocks of README.md and docs/*.md tell the truth.

- Every command line in a ```bash / ```sh / ```console block that calls one of our entry
  points (``python -m loadtest|torch_server|tf_server|client|gpucheck|scripts...|serving...``,
  ``python examples/....py``, ``scripts/gpu_check.sh``, ``locust -f loadtest/locustfile.py``,
  ``make <target>``) names a command that exists, and every flag it uses appears in that
  command's ``--help``; a make target must be in the Makefile, and ``VAR="--flags"`` passed to
  make are checked against the command the Makefile passes them to.
- A block marked with ``<!-- test: run -->`` on the line before its fence is run, line by
  line, and each line must exit 0. Mark only cheap commands (``--help``, a report re-render).
- Every relative link leads to a file, and a ``#fragment`` into a page to one of its headings.

Every help text and every run comes from a child process: the load tools load Locust, whose
gevent monkey-patching must not reach the pytest process (it breaks every later gRPC test).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
RUN_MARKER = "<!-- test: run -->"
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")

#: How the pages call Python; replaced by this interpreter when a command runs.
PYTHONS = {"python", "python3", ".venv/bin/python", "$(PY)"}
#: Modules run with ``python -m`` that are not ours: not checked.
OTHER_MODULES = {"pytest", "pip", "venv"}
#: Our entry points that take a subcommand (``python -m loadtest compare ...``).
WITH_SUBCOMMANDS = {"loadtest", "torch_server", "tf_server", "client", "gpucheck"}
LOCUSTFILE = "loadtest/locustfile.py"
#: One of our options on Locust's parser: absent from a help text that lacks them all.
OUR_LOCUST_OPTION = "--load-shape"
#: Locust with our options registered first (``python -m loadtest locust``): its ``--help`` lists
#: them, which ``locust -f ... --help`` cannot (Locust prints it before loading the locustfile).
LOCUST_PARSER = (sys.executable, "-m", "loadtest", "locust")
#: Placeholders a runnable block may use, and the fixture that fills each.
RUN_PLACEHOLDERS = {"reports/<timestamp>": "report_folder"}
FLAG = re.compile(r"^(--[A-Za-z0-9][\w-]*|-[A-Za-z])$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
HELP_TIMEOUT_S = 60


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    lines: tuple[str, ...]
    run: bool


@dataclass(frozen=True)
class Command:
    """One logical command line (continuations joined) of a block."""

    page: Path
    line: int
    text: str
    run: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Entry:
    """A call of one of our entry points: how to run it, and the words after it."""

    kind: str  # python, script, locust, make, gpu_check
    argv: tuple[str, ...]
    rest: tuple[str, ...]
    module: str = ""


# ---------------------------------------------------------------- reading the pages


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page; ``run`` when the RUN_MARKER is the last non-blank line before it."""
    found: list[Block] = []
    opened: tuple[int, str, str, bool] | None = None  # fence line, fence, language, run
    body: list[str] = []
    previous = ""
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if opened is None:
            match = FENCE.match(line)
            if match:
                opened, body = (number, match.group(1), match.group(2).lower(), previous == RUN_MARKER), []
            elif line.strip():
                previous = line.strip()
        elif re.fullmatch(rf"\s*{re.escape(opened[1][0])}{{{len(opened[1])},}}\s*", line):
            found.append(Block(page, opened[0], opened[2], tuple(body), opened[3]))
            opened, previous = None, ""
        else:
            body.append(line)
    return found


def commands(block: Block) -> list[Command]:
    """The block's command lines: continuations joined; in a console block only ``$ `` lines."""
    found: list[Command] = []
    pending: list[str] = []
    start = 0
    for offset, raw in enumerate(block.lines, 1):
        line = raw.rstrip()
        if not pending:
            if block.language == "console":
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = block.line + offset
        pending.append(line[:-1] if line.endswith("\\") else line)
        if not line.endswith("\\"):
            found.append(Command(block.page, start, " ".join(part.strip() for part in pending), block.run))
            pending = []
    return found


def all_commands() -> list[Command]:
    return [
        command
        for page in PAGES
        for block in blocks(page)
        if block.language in SHELL_LANGUAGES
        for command in commands(block)
    ]


def simple_commands(text: str) -> list[list[str]]:
    """The words of each simple command of a line (split at ``;``, ``&``, ``&&``, ``|``, ``||``)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    found: list[list[str]] = [[]]
    for word in lexer:
        if word and set(word) <= set(";&|"):
            found.append([])
        else:
            found[-1].append(word)
    return [words for words in found if words]


def entry_of(words: Sequence[str]) -> Entry | None:
    """Our entry point called by a simple command, or None (docker, kill, grpcurl...)."""
    words = list(words)
    while words and ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    if words[:1] == ["taskset"]:
        words = words[3:]  # taskset -c CPUS
    if not words:
        return None
    head = words[0]
    if head in PYTHONS and len(words) > 2 and words[1] == "-m":
        module = words[2]
        if module.split(".")[0] in OTHER_MODULES:
            return None
        return Entry("python", (sys.executable, "-m", module), tuple(words[3:]), module)
    if head in PYTHONS and len(words) > 1 and words[1].endswith(".py"):
        return Entry("script", (sys.executable, words[1]), tuple(words[2:]))
    if Path(head).name == "locust":
        return Entry("locust", (locust_executable(), "-f", LOCUSTFILE), tuple(words[1:]))
    if head == "make":
        return Entry("make", ("make",), tuple(words[1:]))
    if head.endswith("scripts/gpu_check.sh"):
        return Entry("gpu_check", (sys.executable, "-m", "gpucheck", "run"), tuple(words[1:]), "gpucheck")
    return None


def locust_executable() -> str:
    beside = Path(sys.executable).parent / "locust"
    return str(beside) if beside.exists() else shutil.which("locust") or "locust"


def flags(words: Iterable[str]) -> list[str]:
    """The flags among ``words`` (``--name`` or ``-x``), without their ``=value``."""
    return [word.split("=", 1)[0] for word in words if FLAG.match(word.split("=", 1)[0])]


def mentions(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


# ---------------------------------------------------------------- help texts, from child processes


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


class Helps:
    """``argv --help`` of each command, each run once in a child process; several at a time."""

    def __init__(self) -> None:
        self._texts: dict[tuple[str, ...], tuple[int, str]] = {}

    def prefetch(self, argvs: Iterable[tuple[str, ...]]) -> None:
        wanted = sorted(set(argvs) - set(self._texts))
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            for argv, result in zip(wanted, pool.map(self._run, wanted), strict=True):
                self._texts[argv] = result

    def get(self, argv: tuple[str, ...]) -> tuple[int, str]:
        if argv not in self._texts:
            self._texts[argv] = self._run(argv)
        return self._texts[argv]

    @staticmethod
    def _run(argv: tuple[str, ...]) -> tuple[int, str]:
        command = [*argv, "--help"]
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=HELP_TIMEOUT_S, check=False
        )
        return done.returncode, done.stdout + done.stderr


def subcommands_in(help_text: str) -> set[str]:
    """The subcommands a top-level help lists: ``{a,b}`` in its usage, or indented under its positionals."""
    names = {name for group in re.findall(r"\{([\w,-]+)\}", help_text) for name in group.split(",")}
    return names | set(re.findall(r"^ {4}([a-z][\w-]*)(?= {2,}|$)", help_text, re.MULTILINE))


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {name for name in re.findall(r"^([\w.-]+):(?!=)", text, re.MULTILINE) if not name.startswith(".")}


def make_recipe_for(variable: str) -> list[str] | None:
    """The words of the Makefile recipe line that passes ``$(variable)`` on, if any."""
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t") and f"$({variable})" in line:
            return shlex.split(line.strip())
    return None


def problems_of(entry: Entry, helps: Helps) -> list[str]:
    """What is wrong with one call of our entry points: a missing command, target or flag."""
    if entry.kind == "make":
        return make_problems(entry, helps)
    if entry.kind == "locust":
        return locust_problems(entry, helps)
    name = shown(entry.argv)
    code, text = helps.get(entry.argv)
    if code != 0:
        return [f"`{name} --help` exits {code}: {text.strip()[-300:]}"]
    rest = entry.rest
    if entry.kind == "gpu_check":
        text += (ROOT / "scripts" / "gpu_check.sh").read_text()  # its own --prepare and --cpu
    elif entry.module in WITH_SUBCOMMANDS and [word for word in rest if word not in ("-h", "--help")]:
        known = subcommands_in(text)
        chosen = next((word for word in rest if word in known), None)
        if chosen is None:
            return [f"{name}: no subcommand of {sorted(known)} in {list(rest)}"]
        name = f"{name} {chosen}"
        code, sub_text = helps.get((*entry.argv, chosen))
        if code != 0:
            return [f"`{name} --help` exits {code}: {sub_text.strip()[-300:]}"]
        text += sub_text
    return [f"{flag}: not in the help of {name}" for flag in flags(rest) if not mentions(text, flag)]


def shown(argv: Sequence[str]) -> str:
    """A command as the pages write it: ``python -m loadtest``, not this interpreter's path."""
    return " ".join(["python", *argv[1:]] if argv[0] == sys.executable else argv)


def locust_problems(entry: Entry, helps: Helps) -> list[str]:
    problems: list[str] = []
    words = list(entry.rest)
    if "-f" in words and words[words.index("-f") + 1 :][:1] != [LOCUSTFILE]:
        problems.append(f"-f: our locustfile is {LOCUSTFILE}")
    code, text = helps.get(entry.argv)
    if code != 0:
        return [*problems, f"`locust -f {LOCUSTFILE} --help` exits {code}: {text.strip()[-300:]}"]
    if not mentions(text, OUR_LOCUST_OPTION):
        code, ours = helps.get(LOCUST_PARSER)
        if code != 0:
            return [*problems, f"Locust's parser with our options: exit {code}: {ours.strip()[-300:]}"]
        text += ours
    return problems + [
        f"{flag}: not an option of locust -f {LOCUSTFILE}" for flag in flags(words) if not mentions(text, flag)
    ]


def passed_on(entry: Entry) -> Iterator[tuple[str, Entry]]:
    """``make ... VAR="words"``: (VAR, the call of our entry point the Makefile passes the words to)."""
    for word in entry.rest:
        if not ENV_ASSIGNMENT.match(word):
            continue
        variable, _, value = word.partition("=")
        recipe = make_recipe_for(variable)
        if recipe is None:
            continue  # a variable of make itself (PYTHON=...)
        placeholder = f"$({variable})"
        called = entry_of([part for word in recipe for part in (shlex.split(value) if word == placeholder else [word])])
        if called is not None:
            yield variable, called


def make_problems(entry: Entry, helps: Helps) -> list[str]:
    targets = make_targets()
    problems = [
        f"make {word}: no such target in the Makefile"
        for word in entry.rest
        if not word.startswith("-") and not ENV_ASSIGNMENT.match(word) and word not in targets
    ]
    for variable, called in passed_on(entry):
        problems += [f"{variable}: {problem}" for problem in problems_of(called, helps)]
    return problems


def help_argvs(entry: Entry) -> Iterator[tuple[str, ...]]:
    """The top-level help texts an entry will need (prefetched together)."""
    if entry.kind == "make":
        for _, called in passed_on(entry):
            yield from help_argvs(called)
        return
    yield entry.argv
    if entry.kind == "locust":
        yield LOCUST_PARSER


ENTRIES = [
    (command, entry)
    for command in all_commands()
    for words in simple_commands(command.text)
    if (entry := entry_of(words)) is not None
]


@pytest.fixture(scope="module")
def helps() -> Helps:
    cache = Helps()
    cache.prefetch(argv for _, entry in ENTRIES for argv in help_argvs(entry))
    subcommands = []
    for _, entry in ENTRIES:
        if entry.module in WITH_SUBCOMMANDS and entry.kind == "python":
            code, text = cache.get(entry.argv)
            known = subcommands_in(text) if code == 0 else set()
            chosen = next((word for word in entry.rest if word in known), None)
            if chosen is not None:
                subcommands.append((*entry.argv, chosen))
    cache.prefetch(subcommands)
    return cache


# ---------------------------------------------------------------- (a) commands and flags exist


def test_the_pages_have_commands_to_check() -> None:
    """A parser that finds nothing would make every check below pass vacuously."""
    pages = {command.page for command, _ in ENTRIES}
    assert ROOT / "README.md" in pages
    kinds = {entry.kind for _, entry in ENTRIES}
    assert {"python", "locust", "make"} <= kinds
    assert any(command.run for command in all_commands())


def test_every_run_marker_opens_a_block() -> None:
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if line.strip() == RUN_MARKER:
                following = next((later for later in lines[number:] if later.strip()), "")
                assert FENCE.match(following), f"{page.relative_to(ROOT)}:{number}: {RUN_MARKER} not before a fence"


@pytest.mark.parametrize(("command", "entry"), ENTRIES, ids=[f"{c.where}-{e.kind}" for c, e in ENTRIES])
def test_our_commands_and_their_flags_exist(command: Command, entry: Entry, helps: Helps) -> None:
    problems = problems_of(entry, helps)
    assert not problems, f"{command.where}: {command.text}\n" + "\n".join(problems)


# ---------------------------------------------------------------- (b) the marked blocks run


def results_document() -> dict[str, Any]:
    from tests.helpers.synthetic import synthetic_results

    document: dict[str, Any] = synthetic_results()
    return document


@pytest.fixture(scope="module")
def report_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a results.json shaped like the comparison's, for ``loadtest report``."""
    folder = tmp_path_factory.mktemp("report")
    (folder / "results.json").write_text(json.dumps(results_document(), default=_plain))
    return folder


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


RUNNABLE = [command for command in all_commands() if command.run]


@pytest.mark.parametrize("command", RUNNABLE, ids=[command.where for command in RUNNABLE])
def test_marked_blocks_run(command: Command, request: pytest.FixtureRequest) -> None:
    parts = simple_commands(command.text)
    assert len(parts) == 1, f"{command.where}: one simple command per line in a runnable block (no shell here)"
    words = [sys.executable if word in PYTHONS else word for word in parts[0]]
    if Path(words[0]).name == "locust":
        words[0] = locust_executable()
    for placeholder, fixture in RUN_PLACEHOLDERS.items():
        if any(placeholder in word for word in words):
            folder = str(request.getfixturevalue(fixture))
            words = [word.replace(placeholder, folder) for word in words]
    assert not [word for word in words if re.search(r"<\w+>", word)], f"{command.where}: a placeholder without a value"
    done = subprocess.run(words, capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=120, check=False)
    assert done.returncode == 0, f"{command.where}: {command.text}\n{(done.stdout + done.stderr)[-2000:]}"


# ---------------------------------------------------------------- (c) relative links lead somewhere


def prose(page: Path) -> str:
    """The page without its fenced blocks (a link in a code block is code)."""
    kept, inside = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            kept.append(line)
    return "\n".join(kept)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings (duplicates get -1, -2...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(page).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        found.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return found


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_relative_links_lead_to_files(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page)):
        if SCHEME.match(target):
            continue
        path, _, fragment = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target}: no heading #{fragment} in {destination.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)
