"""A REPL over the generation engine: ``mlx_trm.chat --model DIR``.

These are story models, not instruction-tuned assistants, so "chat" means writing a story
together: every line you type is appended to the running text and the model continues it until
end-of-story or ``--max-tokens``; its continuation joins the text too. An empty line lets the model
go on by itself (as the first line: it starts a story from nothing). The story itself is
``mlx_trm.generation.session.StorySession`` (with its sliding window past ``seq_len``).

Commands: /reset (start a new story), /temp T, /max-tokens N, /stats (statistics after each reply
on/off), /help, /quit. Reads standard input, so it also runs from a pipe or a script.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from ..config import ConfigError, cli_errors
from .arguments import (
    add_decoding_arguments,
    add_model_arguments,
    add_sampling_arguments,
)

if TYPE_CHECKING:
    from ..generation.session import StorySession

HELP = """\
Type text and the model continues the story; an empty line lets it go on (or begin).
  /reset          start a new story (forget the text so far)
  /temp T         sampling temperature (0 = greedy)
  /max-tokens N   new tokens per reply at most
  /stats          print statistics after each reply (toggle)
  /help           this help
  /quit           leave (so does end of input)"""


def print_session_stats(session: StorySession, file: TextIO) -> None:
    from ..generation.stats import decoding_lines, print_stats

    print_stats(session.last, file=file)
    for line in decoding_lines(session.halt_policy, session.speculation):
        print(line, file=file)


def run_command(session: StorySession, line: str, out: TextIO) -> bool:
    """Handle a /command; False means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            session.reset()
            print("[new story]", file=out)
        elif name == "/help":
            print(HELP, file=out)
        elif name == "/stats":
            session.stats = not session.stats
            print(f"[statistics {'on' if session.stats else 'off'}]", file=out)
            if session.stats and session.last is not None:
                print_session_stats(session, file=out)  # the last reply's, right away
        elif name == "/temp":
            session.set_temp(float(arg))
            print(f"[temperature {session.temp}]", file=out)
        elif name == "/max-tokens":
            session.set_max_tokens(int(arg))
            print(f"[max tokens {session.max_tokens}]", file=out)
        else:
            print(f"unknown command {name}; /help lists the commands", file=out)
    except ValueError as e:  # a bad number or a ConfigError (a ValueError too)
        detail = str(e) if isinstance(e, ConfigError) else f"{name} needs a number, got {arg!r}"
        print(f"error: {detail}", file=out)
    return True


def repl(session: StorySession, stdin: TextIO, out: TextIO) -> None:
    """Read lines until /quit or end of input; replies stream to ``out``."""
    interactive = stdin.isatty()
    if interactive:
        print("Write the start of a story; /help for commands.", file=out)
    while True:
        if interactive:
            print(">> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        line = line.rstrip("\n")
        if line.startswith("/"):
            if not run_command(session, line.strip(), out):
                break
            continue
        try:
            response = None
            for response in session.reply(line):
                print(response.text, end="", file=out, flush=True)
            print(file=out)
            if session.stats and response is not None:
                print_session_stats(session, file=out)
        except ConfigError as e:
            print(f"error: {e}", file=out)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``mlx_trm.chat`` (the docs' commands are checked against it)."""
    parser = argparse.ArgumentParser(
        prog="mlx_trm.chat",
        description="Write a story together with a TRM model (reads lines from standard input).")
    add_model_arguments(parser)
    parser.add_argument("--max-tokens", "-m", type=int, default=None,
                        help="new tokens per reply at most (default: 200, or half the model's "
                             "seq_len if that is less, so the story so far keeps room)")
    add_sampling_arguments(parser, temp=0.7, top_k=40)
    parser.add_argument("--stats", action="store_true", help="statistics after each reply")
    add_decoding_arguments(parser)
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # mlx, mlx-lm and the model only now: --help answers at once
    from ..generation.session import StorySession
    from .loading import load_for_decoding

    model, tokenizer, decoding, processors = load_for_decoding(args)
    max_tokens = args.max_tokens
    if max_tokens is None:  # 200, unless that leaves the story so far too little room
        max_tokens = max(1, min(200, model.args.seq_len // 2))
    session = StorySession(model, tokenizer, max_tokens=max_tokens, temp=args.temp,
                           top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           compile=not args.no_compile, logits_processors=processors,
                           **decoding)
    session.stats = args.stats
    repl(session, sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
