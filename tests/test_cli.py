"""The commands' start-up: ``--help`` without mlx, mlx-lm or transformers, and Ctrl-C at any
instant (here: in the imports of the first second) is one line on stderr and exit code 130."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.conftest import ROOT

COMMANDS = ("train", "evaluate", "generate", "chat", "convert", "interop")
HEAVY = ("mlx", "mlx_lm", "transformers", "torch", "datasets", "numpy", "sentencepiece")


def test_help_imports_no_heavy_library():
    """Every command's --help answers from argparse alone (the heavy imports come after parsing)."""
    code = f"""
import contextlib, importlib, io, sys
for cmd in {COMMANDS!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            importlib.import_module("mlx_trm.cli." + cmd).main(["--help"])
        except SystemExit as e:
            assert e.code == 0, (cmd, e.code)
    assert "usage:" in out.getvalue(), cmd
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _default_sigint() -> None:
    # a child of a background job inherits SIGINT ignored; the drill needs Python's own handling
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_the_first_second_is_one_line_and_exit_130():
    """The drill: Ctrl-C one second after start, while mlx, mlx-lm and transformers are still
    being imported (or, on a fast machine, while chat waits for its first line: the same one
    line either way), never a traceback from inside some library's import."""
    proc = subprocess.Popen([sys.executable, "-m", "mlx_trm.cli.chat", "--max-tokens", "4"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)  # stdin stays open until here: chat never ends alone
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.splitlines() == ["interrupted"], err
    assert out == ""
