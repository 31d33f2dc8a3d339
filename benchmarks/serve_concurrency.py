"""mlx_lm.server's continuous batching on an mlx-trm model: concurrent vs sequential requests.

    python benchmarks/serve_concurrency.py --model mlx_trm/assets/model

Starts ``mlx_lm.server --model DIR --trust-remote-code`` on a free localhost port, sends
``--requests`` chat/completions requests of ``--max-tokens`` tokens each one after another, then
all at once (one thread each), and prints both wall times and their ratio. Then it starts one
request for ``--long-tokens`` tokens (far more than the model's seq_len) and measures the latency
of the same short requests while it runs: with batching they are answered next to it instead of
queueing behind it. Only localhost is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["Once upon a time, there was a little girl named Lily.", "Tom had a red ball.",
           "The sun was hot and the dog was sleepy.", "Sue went to the park with her mom.",
           "A little bird sat on a tree.", "Ben wanted a big cake for his birthday."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(base: str, prompt: str, max_tokens: int, timeout: float = 600) -> float:
    """Seconds one non-streaming greedy chat/completions request takes."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    request = urllib.request.Request(f"{base}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        json.loads(response.read())
    return time.perf_counter() - start


def start_server(model: str, port: int, log_path: str, env: dict[str, str] | None = None,
                 extra: list[str] | None = None) -> subprocess.Popen:
    """``mlx_lm.server --model MODEL --trust-remote-code`` (+ ``extra`` flags) on 127.0.0.1."""
    log = open(log_path, "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--trust-remote-code",
         "--host", "127.0.0.1", "--port", str(port), *(extra or [])],
        stdout=log, stderr=subprocess.STDOUT, env=env or os.environ.copy())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlx_lm.server exited; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.25)
    server.kill()
    raise SystemExit(f"mlx_lm.server did not start within 120 s; see {log_path}")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def concurrent(base: str, prompts: list[str], max_tokens: int) -> list[float]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: chat(base, p, max_tokens), prompts))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlx_trm/assets/model")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=2000)
    parser.add_argument("--log", default="/tmp/serve_concurrency.log")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(args.model, port, args.log)
    try:
        chat(base, prompts[0], 8)  # warm-up
        start = time.perf_counter()
        for p in prompts:
            chat(base, p, args.max_tokens)
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        concurrent(base, prompts, args.max_tokens)
        together = time.perf_counter() - start
        print(f"{args.requests} x {args.max_tokens} tokens: sequential {sequential:.2f} s, "
              f"concurrent {together:.2f} s, ratio {together / sequential:.2f}")

        long_time: list[float] = []
        long = threading.Thread(target=lambda: long_time.append(
            chat(base, PROMPTS[0], args.long_tokens)))
        long.start()
        time.sleep(1.0)  # let the long request start decoding
        latencies = concurrent(base, prompts, args.max_tokens)
        short_done = time.perf_counter()
        long.join()
        print(f"while one {args.long_tokens}-token request runs: the {args.requests} short "
              f"requests took {min(latencies):.2f}-{max(latencies):.2f} s each; the long one "
              f"{long_time[0]:.2f} s, finishing {time.perf_counter() - short_done:.2f} s after "
              "them")
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
