"""No example in the docs rots.

Every ```python block of README.md, docs/*.md and the benchmark READMEs runs (in a subprocess,
from the repository root, on the shipped demo model). Every command line of a ```bash / ```sh
block (and every ``$ `` line of a ```console block) that calls one of our CLIs is parsed by that
CLI's own argparse parser without running the job, and its config overrides are applied to the
config they name; mlx-lm's commands are checked against their ``--help``. A block preceded by
``<!-- no-run -->`` is left out (for one that needs the network; keep them rare).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_trm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "results" / "README.md"]
NO_RUN = "<!-- no-run -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
WRAPPERS = {"sudo", "time", "nohup"}


def blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, line number, text) of each fenced block not marked ``<!-- no-run -->``."""
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() != NO_RUN:
            found.append((match.group(1), text.count("\n", 0, match.start()) + 1,
                          match.group(2)))
    return found


def command_lines(language: str, text: str) -> list[str]:
    """The shell lines of a block, continuation lines joined; a console block's ``$`` lines."""
    lines = text.replace("\\\n", " ").splitlines()
    if language == "console":
        return [line[2:] for line in lines if line.startswith("$ ")]
    return lines if language in ("bash", "sh", "shell") else []


def cli_invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """(CLI, its arguments) when a simple command calls one of ours or mlx-lm's, else None.

    The CLI is a module name (``mlx_trm.generate``, ``mlx_lm.server``) or a script path
    (``benchmarks/speculative.py``)."""
    while words and (re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]) or words[0] in WRAPPERS):
        words = words[1:]  # environment assignments: REF_REPO=... python ...
    if words[:1] == ["taskset"]:
        words = words[3:]
    if not words:
        return None
    if re.fullmatch(r"mlx_(trm|lm)\.\w+", words[0]):
        return words[0], words[1:]
    if "-m" in words[:-1] and words[0] in ("python", "python3", "mlx.launch"):
        at = words.index("-m")
        if re.fullmatch(r"mlx_(trm|lm)\.\w+", words[at + 1]):
            return words[at + 1], words[at + 2:]
        if re.fullmatch(r"mlx_trm\.cli\.\w+", words[at + 1]):  # python -m mlx_trm.cli.train
            return words[at + 1].replace(".cli.", "."), words[at + 2:]
        if words[at + 1] == "mlx_lm" and len(words) > at + 2:  # python -m mlx_lm generate
            return f"mlx_lm.{words[at + 2]}", words[at + 3:]
        return None
    if words[0] in ("python", "python3") and len(words) > 1 and re.fullmatch(
            r"(benchmarks|scripts)/\w+\.py", words[1]):
        return words[1], words[2:]
    return None


def invocations(text: str, language: str) -> list[tuple[str, list[str]]]:
    found = []
    for line in command_lines(language, text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = [*lexer, ";"]
        except ValueError as e:  # a block that is not shell: say which line
            raise ValueError(f"{e} in {line!r}") from None
        words: list[str] = []
        for token in tokens:
            if token in SEPARATORS:
                if (call := cli_invocation(words)) is not None:
                    found.append(call)
                words = []
            else:
                words.append(token)
    return found


def cases(kind: str) -> list:
    params = []
    for path in DOCS:
        for language, line, text in blocks(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if kind == "python" and language == "python":
                params.append(pytest.param(text, id=where))
            elif kind == "command":
                params += [pytest.param(cli, args, id=f"{where}:{cli}")
                           for cli, args in invocations(text, language)]
    return params


@pytest.mark.parametrize("code", cases("python"))
def test_python_block_runs(code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@functools.cache
def our_parser(cli: str) -> argparse.ArgumentParser:
    """The parser a CLI of ours builds, from its module's ``build_parser()`` (nothing runs)."""
    if cli.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"docs_cli_{Path(cli).stem}", ROOT / cli)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    else:  # a console script mlx_trm.X runs mlx_trm.cli.X
        module = importlib.import_module(cli.replace("mlx_trm.", "mlx_trm.cli.", 1))
    if not hasattr(module, "build_parser"):
        path = os.path.relpath(module.__file__, ROOT)
        named = path if cli.endswith(".py") else f"{path} (the docs' {cli})"
        pytest.fail(f"{named} needs build_parser() -> argparse.ArgumentParser, the parser its "
                    "main() uses, to check the docs' command lines against")
    parser = module.build_parser()
    parser.allow_abbrev = False  # the docs spell every flag out
    return parser


@functools.cache
def mlx_lm_flags(cli: str) -> frozenset[str]:
    """The option strings ``mlx_lm <command> --help`` lists."""
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", cli.split(".", 1)[1], "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", proc.stdout))


@pytest.mark.parametrize("cli,args", cases("command"))
def test_command_parses(cli, args, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' commands run from the repository root
    if cli.startswith("mlx_lm."):
        flags = [a.split("=", 1)[0] for a in args if re.match(r"--?[A-Za-z]", a)]
        unknown = [f for f in flags if f not in mlx_lm_flags(cli)]
        assert not unknown, f"{cli} has no {unknown} (see {cli} --help)"
        return
    parser = our_parser(cli)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            error = stderr.getvalue().strip().splitlines()[-1]  # the line after the usage
            pytest.fail(f"{cli} {shlex.join(args)}: {error}")
    if cli == "mlx_trm.train":  # the overrides, against the typed config they change
        try:
            load_config(parsed.config, parsed.overrides)
        except ConfigError as e:
            pytest.fail(f"{cli} {shlex.join(args)}: {e}")


def test_readme_setup_is_what_ci_runs():
    """The set-up block installs the extras .ci/run installs and runs its test command."""
    _, _, text = blocks(ROOT / "README.md")[0]
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    ci = (ROOT / ".ci" / "run").read_text()
    extras = re.compile(r'pip install(?: -q)? -e "(\.\[[\w,]+\])"')
    assert extras.findall(text) == extras.findall(ci) != []
    assert "python -m pytest" in lines and "\npython -m pytest\n" in ci


def test_the_checks_see_the_commands():
    """The parsing above finds the commands the docs show (a regex gone wrong checks nothing)."""
    calls = {cli for param in cases("command") for cli in param.values[:1]}
    assert {"mlx_trm.train", "mlx_trm.generate", "mlx_trm.chat", "mlx_trm.evaluate",
            "mlx_trm.convert", "mlx_lm.server", "mlx_lm.lora",
            "benchmarks/tokens_per_second.py"} <= calls
    assert cli_invocation(shlex.split("REF_REPO=x python -m mlx_trm.cli.train --config c")) == (
        "mlx_trm.train", ["--config", "c"])
    assert cli_invocation(["curl", "http://x"]) is None
