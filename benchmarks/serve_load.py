"""mlx_lm.server on an mlx-trm model under load from the official ``openai`` client.

    pip install -e ".[serve]"
    python benchmarks/serve_load.py --model mlx_trm/assets/model --clients 32 --requests 5
    python benchmarks/serve_load.py --model mlx_trm/assets/model --probe

Starts ``mlx_lm.server --model DIR --trust-remote-code`` on a free 127.0.0.1 port
(serve_concurrency.py's ``start_server``) and stops it at the end; nothing else is contacted.

``--probe``: every kind of request below, bad and odd ones included (empty and whitespace prompts,
an empty message, no messages, max_tokens 0 / -1 / far past seq_len, temperature -1, malformed
JSON, a prompt past seq_len, a client that hangs up mid-stream), one at a time, each followed by a
normal greedy request: prints the status and message (or the text), and whether that greedy text
is still the first one's.

Load: first every greedy request of the mix once, one at a time (the sequential texts), then
``--clients`` threads with an ``openai.OpenAI`` client each send ``--requests`` requests in turn,
a mix of valid (greedy and sampled, streaming and not, completions and chat, a story from an empty
prompt, a prompt past seq_len) and invalid ones (max_tokens 0, temperature -1, malformed JSON) and
clients hanging up mid-stream. Prints requests/s, p50/p95 latency of the completions, how many
greedy requests got the sequential text and how many invalid ones a 4xx, and the server's RSS
after the sequential pass and at the end. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_concurrency import PROMPTS, free_port, start_server, stop_server

MODEL = "default_model"  # the server's --model (any other name would make it load a model)


@dataclass
class Outcome:
    kind: str
    status: int  # HTTP status; 0: the client hung up on purpose; -1: the connection dropped
    text: str  # the completion, or the error message
    seconds: float
    greedy: tuple[str, int] | None = None  # (prompt, max_tokens) whose sequential text is due


def client_for(base: str) -> Any:
    import openai  # the [serve] extra

    return openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0,
                         timeout=600)


def _text(response: Any, stream: bool, chat: bool) -> str:
    if not stream:
        choice = response.choices[0]
        return choice.message.content if chat else choice.text
    parts = [(c.choices[0].delta.content if chat else c.choices[0].text) or ""
             for c in response if c.choices]
    return "".join(parts)


def complete(client: Any, prompt: str, max_tokens: int, *, stream: bool = False,
             chat: bool = False, **kwargs: Any) -> str:
    """One request through the openai client; ``chat`` sends ``prompt`` as one user message
    (our chat template renders it as itself), ``messages=[]`` none."""
    if chat:
        messages = kwargs.pop("messages", [{"role": "user", "content": prompt}])
        response = client.chat.completions.create(model=MODEL, messages=messages,
                                                  max_tokens=max_tokens, stream=stream, **kwargs)
    else:
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                             stream=stream, **kwargs)
    return _text(response, stream, chat)


def hang_up(client: Any, prompt: str, max_tokens: int) -> str:
    """Start a streaming request, read one piece, close the connection."""
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True)
    first = next(iter(stream)).choices[0].text
    stream.close()
    return first


def post_raw(base: str, body: bytes) -> tuple[int, str]:
    """POST bytes that are not JSON (no client library sends those)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", "/v1/completions", body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def error_message(error: Exception) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
    return str(body if body is not None else error)


def long_prompt(seq_len: int) -> str:
    """A story prompt of more than ``seq_len`` tokens (each sentence is > 8 tokens)."""
    return " ".join([PROMPTS[0]] * (seq_len // 8 + 1))


# ----------------------------------------------------------------------------------------------
# The requests: name -> (client, base, prompt, max_tokens, seq_len) -> Outcome


Send = Callable[[Any, str, str, int, int], Outcome]


def _timed(kind: str, call: Callable[[], str], greedy: tuple[str, int] | None = None) -> Outcome:
    import openai

    start = time.perf_counter()
    try:
        text, status = call(), 200
    except openai.APIStatusError as e:
        text, status = error_message(e), e.status_code
    if kind == "hang up" and status == 200:
        status = 0
    return Outcome(kind, status, text, time.perf_counter() - start, greedy)


def _raw(kind: str, base: str, body: bytes) -> Outcome:
    start = time.perf_counter()
    status, text = post_raw(base, body)
    try:
        text = json.loads(text).get("error", text)
    except (json.JSONDecodeError, AttributeError):
        pass
    return Outcome(kind, status, text, time.perf_counter() - start)


SENDS: dict[str, Send] = {
    "completion": lambda c, b, p, n, L: _timed(
        "completion", lambda: complete(c, p, n, temperature=0), (p, n)),
    "completion stream": lambda c, b, p, n, L: _timed(
        "completion stream", lambda: complete(c, p, n, temperature=0, stream=True), (p, n)),
    "chat": lambda c, b, p, n, L: _timed(
        "chat", lambda: complete(c, p, n, temperature=0, chat=True), (p, n)),
    "chat stream": lambda c, b, p, n, L: _timed(
        "chat stream", lambda: complete(c, p, n, temperature=0, chat=True, stream=True), (p, n)),
    "empty prompt": lambda c, b, p, n, L: _timed(
        "empty prompt", lambda: complete(c, "", n, temperature=0), ("", n)),
    "whitespace prompt": lambda c, b, p, n, L: _timed(
        "whitespace prompt", lambda: complete(c, "   ", n, temperature=0), ("   ", n)),
    "empty message": lambda c, b, p, n, L: _timed(
        "empty message", lambda: complete(c, "", n, temperature=0, chat=True), ("", n)),
    "no messages": lambda c, b, p, n, L: _timed(
        "no messages", lambda: complete(c, "", n, temperature=0, chat=True, messages=[])),
    "sampled": lambda c, b, p, n, L: _timed(
        "sampled", lambda: complete(c, p, n, temperature=0.8, top_p=0.95, stream=True)),
    "prompt past seq_len": lambda c, b, p, n, L: _timed(
        "prompt past seq_len", lambda: complete(c, long_prompt(L), n, temperature=0),
        (long_prompt(L), n)),
    "max_tokens past seq_len": lambda c, b, p, n, L: _timed(
        "max_tokens past seq_len", lambda: complete(c, p, 2 * L, temperature=0), (p, 2 * L)),
    "hang up": lambda c, b, p, n, L: _timed("hang up", lambda: hang_up(c, p, n)),
    "max_tokens 0": lambda c, b, p, n, L: _timed(
        "max_tokens 0", lambda: complete(c, p, 0, temperature=0)),
    "max_tokens -1": lambda c, b, p, n, L: _timed(
        "max_tokens -1", lambda: complete(c, p, -1, temperature=0)),
    "temperature -1": lambda c, b, p, n, L: _timed(
        "temperature -1", lambda: complete(c, p, n, temperature=-1)),
    "malformed JSON": lambda c, b, p, n, L: _raw(
        "malformed JSON", b, b'{"prompt": "Once upon a time", "max_tokens": 8'),
}
INVALID = {"no messages", "max_tokens 0", "max_tokens -1", "temperature -1", "malformed JSON"}
# the load mix: every kind but max_tokens past seq_len (a whole story, or 2 x seq_len tokens)
MIX = [k for k in SENDS if k != "max_tokens past seq_len"]


def send(kind: str, client: Any, base: str, prompt: str, max_tokens: int,
         seq_len: int) -> Outcome:
    """``SENDS[kind]``, with a dropped connection recorded (status -1) instead of raised."""
    import openai

    try:
        return SENDS[kind](client, base, prompt, max_tokens, seq_len)
    except (openai.APIConnectionError, OSError) as e:
        return Outcome(kind, -1, f"{type(e).__name__}: {e}", 0.0)


def one_line(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def probe(base: str, seq_len: int, max_tokens: int) -> list[tuple[Outcome, bool]]:
    """Every request kind once, each followed by the same greedy request; returns the kinds'
    outcomes and whether that greedy text was still the first one's."""
    client = client_for(base)
    normal = complete(client, PROMPTS[0], max_tokens, temperature=0)
    rows = []
    for kind in SENDS:
        outcome = send(kind, client, base, PROMPTS[1], max_tokens, seq_len)
        after = send("completion", client, base, PROMPTS[0], max_tokens, seq_len)
        same = after.status == 200 and after.text == normal
        rows.append((outcome, same))
        then = "same" if same else f"CHANGED: {after.status} {one_line(after.text, 60)!r}"
        print(f"{kind:24s} {outcome.status:3d}  {one_line(outcome.text, 100)!r}; then greedy "
              f"{then}", flush=True)
    print(f"the greedy request ({PROMPTS[0]!r}, max_tokens {max_tokens}): {normal!r}")
    return rows


# ----------------------------------------------------------------------------------------------
# Load


def schedule(clients: int, requests: int) -> list[list[tuple[str, str]]]:
    """(kind, prompt) of each client's requests: the mix in turn, prompts shifted per client."""
    return [[(MIX[(c * requests + j) % len(MIX)], PROMPTS[(c + j) % len(PROMPTS)])
             for j in range(requests)] for c in range(clients)]


def rss_mb(pid: int) -> float:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) / 1024


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def sequential_texts(base: str, plan: list[list[tuple[str, str]]], max_tokens: int,
                     seq_len: int) -> tuple[dict[tuple[str, int], str], list[Outcome]]:
    """Each distinct request of the plan once, one at a time: the greedy texts the concurrent
    ones must reproduce (completions, chat and streaming of one prompt must agree already)."""
    client = client_for(base)
    texts: dict[tuple[str, int], str] = {}
    outcomes = []
    for kind, prompt in dict.fromkeys(item for items in plan for item in items):
        outcome = send(kind, client, base, prompt, max_tokens, seq_len)
        outcomes.append(outcome)
        if outcome.greedy is not None and outcome.status == 200:
            texts.setdefault(outcome.greedy, outcome.text)
    return texts, outcomes


def check(outcomes: list[Outcome], texts: dict[tuple[str, int], str]) -> dict[str, list[int]]:
    """[passed, total] per check."""
    greedy = [o for o in outcomes if o.greedy is not None]
    invalid = [o for o in outcomes if o.kind in INVALID]
    sampled = [o for o in outcomes if o.kind == "sampled"]
    return {
        "greedy_sequential_text": [sum(o.status == 200 and texts.get(o.greedy) == o.text
                                       for o in greedy), len(greedy)],
        "invalid_4xx": [sum(400 <= o.status < 500 and bool(o.text) for o in invalid),
                        len(invalid)],
        "sampled_answered": [sum(o.status == 200 and bool(o.text) for o in sampled),
                             len(sampled)],
        "hung_up": [sum(o.status == 0 for o in outcomes if o.kind == "hang up"),
                    sum(o.kind == "hang up" for o in outcomes)],
    }


def load(base: str, pid: int, clients: int, requests: int, max_tokens: int,
         seq_len: int, rounds: int = 1) -> dict[str, Any]:
    """The sequential pass, then ``clients`` x ``requests`` at once, ``rounds`` times (the
    figures are the last round's; the RSS is taken after each); the summary."""
    plan = schedule(clients, requests)
    tic = time.perf_counter()
    texts, first = sequential_texts(base, plan, max_tokens, seq_len)
    sequential_s = time.perf_counter() - tic
    rss_warm = rss_mb(pid)

    def run_client(items: list[tuple[str, str]]) -> list[Outcome]:
        client = client_for(base)
        return [send(kind, client, base, prompt, max_tokens, seq_len) for kind, prompt in items]

    rss_rounds, every = [], []
    for _ in range(rounds):
        tic = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            outcomes = [o for result in pool.map(run_client, plan) for o in result]
        wall = time.perf_counter() - tic
        every += outcomes
        rss_rounds.append(rss_mb(pid))
    answered = [o.seconds for o in outcomes if o.status == 200]
    after = send("completion", client_for(base), base, PROMPTS[0], max_tokens, seq_len)
    return {
        "clients": clients, "requests_per_client": requests, "max_tokens": max_tokens,
        "requests": len(outcomes), "wall_s": wall, "requests_per_s": len(outcomes) / wall,
        "completion_p50_s": percentile(answered, 50), "completion_p95_s": percentile(answered, 95),
        "sequential_requests": len(first), "sequential_s": sequential_s,
        "sequential_checks": check(first, texts), "checks": check(every + [after], texts),
        "statuses": sorted({o.status for o in every}), "rounds": rounds,
        "rss_mb_after_warmup": rss_warm, "rss_mb_rounds": rss_rounds, "rss_mb_end": rss_mb(pid),
    }


def print_summary(s: dict[str, Any], model: str) -> bool:
    """Print the load summary; True if every check passed."""
    checks = {**{f"sequential {k}": v for k, v in s["sequential_checks"].items()}, **s["checks"]}
    print(f"{model}: {s['clients']} clients x {s['requests_per_client']} requests "
          f"({s['requests']}), max_tokens {s['max_tokens']}, openai client, 127.0.0.1")
    print(f"sequential pass: {s['sequential_requests']} distinct requests in "
          f"{s['sequential_s']:.1f} s")
    print(f"load ({'last of ' + str(s['rounds']) + ' rounds' if s['rounds'] > 1 else 'one round'}"
          f"): {s['requests']} requests in {s['wall_s']:.1f} s = {s['requests_per_s']:.2f} "
          f"requests/s; completions p50 {s['completion_p50_s']:.2f} s, p95 "
          f"{s['completion_p95_s']:.2f} s; statuses {s['statuses']}")
    for name, (passed, total) in checks.items():
        print(f"  {name:34s} {passed}/{total}{'' if passed == total else '  FAILED'}")
    after = ", ".join(f"{r:.0f}" for r in s["rss_mb_rounds"])
    print(f"server RSS: {s['rss_mb_after_warmup']:.0f} MB after the sequential pass, {after} MB "
          f"after each load round, {s['rss_mb_end']:.0f} MB at the end")
    return all(p == t for p, t in checks.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlx_trm/assets/model")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=5, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the load this many times (RSS after each)")
    parser.add_argument("--probe", action="store_true", help="the bad requests, one at a time")
    parser.add_argument("--log", default="/tmp/serve_load.log", help="the server's output")
    parser.add_argument("--server-args", default="",
                        help='more mlx_lm.server flags, e.g. "--prompt-cache-size 2"')
    parser.add_argument("--json", default=None, help="write the load summary here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seq_len = json.loads((Path(args.model) / "config.json").read_text())["seq_len"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(args.model, port, args.log, extra=shlex.split(args.server_args))
    try:
        if args.probe:
            rows = probe(base, seq_len, args.max_tokens)
            return 0 if all(same for _, same in rows) else 1
        summary = load(base, server.pid, args.clients, args.requests, args.max_tokens, seq_len,
                       args.rounds)
    finally:
        stop_server(server)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if print_summary(summary, args.model) else 1


if __name__ == "__main__":
    sys.exit(main())
