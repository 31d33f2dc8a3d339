"""Text generation: ``generate_step`` / ``stream_generate``, the ``mlx_trm.generate`` CLI.

    mlx_trm.generate --model DIR --prompt "Once upon a time" --max-tokens 200 --temp 0.8 --top-k 40
    mlx_trm.generate --model DIR --prompts-file prompts.txt --output stories.jsonl

The shape is mlx-lm's. The decoders (mlx_trm.generation) turn prompts into next-token logits
through the recursion-aware KV cache; this module samples from them, streams text
(tokenizer.StreamingDetokenizer) and batches prompts; cli.py holds the shared CLI helpers.

Prompts are never given a BOS (the reference has none); an empty prompt starts a story from
end-of-story (:func:`encode_prompt`), the context a packed training row shows before every story
but the first, as GPT-2-style models start a text from their end-of-text token. Several
prompts run as one batch, left-padded: each row has its own RoPE positions and never attends to
padding, so every row gets exactly what it would get alone. Positions past the trained ``seq_len``
work (RoPE has no table) but were never trained: the CLI refuses prompts longer than ``seq_len``
and warns when prompt + new tokens go past it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import make_sampler as _mlx_lm_make_sampler

from .adaptive import add_adaptive_arguments, policy_from_args, steps_line
from .blas import blas_threads, loaded_blas, prepare_cpu_backend
from .cli import (
    add_model_arguments,
    add_sampling_arguments,
    add_speculative_arguments,
    load_for_generation,
    logits_processors_from_args,
    read_prompts,
    speculation_from_args,
)
from .config import ConfigError, cli_errors
from .generation.adaptive import AdaptiveDecoder
from .generation.decoders import CachedDecoder, Decoder, FullForwardDecoder
from .generation.speculative import Speculation, SpeculativeDecoder
from .tokenizer import StreamingDetokenizer, decode_continuation

Sampler = Callable[[mx.array], mx.array]  # log-probabilities [B, V] -> token ids [B]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (token history, logits) -> logits


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def make_sampler(temp: float = 0.0, top_p: float = 0.0, min_p: float = 0.0,
                 top_k: int = 0) -> Sampler:
    """mlx-lm's ``make_sampler`` (top-p, then min-p, then top-k, then temperature), with bad
    settings refused as one-line errors up front rather than mid-generation."""
    if temp < 0:
        raise ConfigError(f"temperature must be >= 0 (got {temp})")
    if top_k < 0 or not 0.0 <= top_p <= 1.0 or not 0.0 <= min_p <= 1.0:
        raise ConfigError(f"need top_k >= 0 and top_p, min_p in [0, 1] (got top_k={top_k}, "
                          f"top_p={top_p}, min_p={min_p})")
    if temp == 0:
        return greedy
    return _mlx_lm_make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)


def make_decoder(model: nn.Module, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                 use_cache: bool = True, compile: bool = True, prefill_step_size: int = 512,
                 halt_policy: Any = None, speculation: Speculation | None = None) -> Decoder:
    """The decoder the options ask for: fixed depth (cached, or the full re-forward without a
    cache), adaptive halting, or speculative recursion."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt is empty (no tokens); start it from the end-of-story token "
                          "(tokenizer.eos_id) to write a story from nothing")
    if not use_cache and (halt_policy is not None or speculation is not None):
        raise ConfigError("--adaptive-halt and speculative decoding run on the cache; "
                          "drop --no-cache")
    if halt_policy is not None and speculation is not None:
        raise ConfigError("--adaptive-halt and speculative decoding do not combine (the draft "
                          "would need a halting rule of its own); drop one of them")
    kwargs = dict(compile=compile, prefill_step_size=prefill_step_size)
    if not use_cache:
        return FullForwardDecoder(model, prompts, max_tokens)
    if halt_policy is not None:
        return AdaptiveDecoder(model, prompts, max_tokens, policy=halt_policy, **kwargs)
    if speculation is not None:
        return SpeculativeDecoder(model, prompts, max_tokens, speculation=speculation, **kwargs)
    return CachedDecoder(model, prompts, max_tokens, **kwargs)


def generate_tokens(prompts: Sequence[Sequence[int]], model: nn.Module, *, max_tokens: int = 256,
                    sampler: Sampler | None = None, use_cache: bool = True, compile: bool = True,
                    prefill_step_size: int = 512, halt_policy: Any = None,
                    speculation: Speculation | None = None,
                    logits_processors: Sequence[LogitsProcessor] | None = None
                    ) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield ``(tokens [B], logprobs [B, V])`` for a batch of prompts, one step at a time.

    ``max_tokens < 0`` is unbounded. The next step is queued before the current token is
    handed out (mlx-lm's pipelining), so Python overhead overlaps the computation.
    ``halt_policy`` (mlx_trm.generation.adaptive) halts each token's ACT steps on its own;
    ``speculation`` (mlx_trm.generation.speculative) drafts and verifies several tokens a step.
    ``logits_processors`` (mlx-lm's, e.g. ``make_logits_processors(repetition_penalty=1.3)``)
    see each row alone, with that row's prompt and generated tokens as its history.
    """
    if speculation is not None and logits_processors:
        raise ConfigError("--repetition-penalty and speculative decoding do not combine (the "
                          "verifier would need each draft's history); drop one of them")
    decode = make_decoder(model, prompts, max_tokens, use_cache=use_cache, compile=compile,
                          prefill_step_size=prefill_step_size, halt_policy=halt_policy,
                          speculation=speculation)
    sampler = sampler or greedy
    history = [mx.array(p, dtype=mx.int32) for p in prompts]

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        if logits_processors:  # one row at a time: mlx-lm's processors index logits[:, history]
            rows = []
            for i, h in enumerate(history):
                row = logits[i:i + 1]
                for processor in logits_processors:
                    row = processor(h, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    if max_tokens == 0:
        return
    # Only the tokens are queued: the log-probabilities (a logsumexp over the vocabulary per
    # position, which the caller may never read) are computed when read.
    pending = [sample(decode.prefill())]
    mx.async_eval([y for y, _ in pending])
    # A cached step multiplies one row per prompt: on a CPU, BLAS threads only get in its way.
    with blas_threads(1) if use_cache else nullcontext():
        n = 0
        while True:
            y, logprobs = pending.pop(0)
            if logits_processors:
                history = [mx.concatenate([h, y[i:i + 1].astype(mx.int32)])
                           for i, h in enumerate(history)]
            if not pending and n + 1 != max_tokens:
                pending = decode.step(y, sample)
                mx.async_eval([y for y, _ in pending])
            yield y, logprobs
            n += 1
            if n == max_tokens:
                return


def generate_step(prompt: mx.array | Sequence[int], model: nn.Module, *, max_tokens: int = 256,
                  sampler: Sampler | None = None, **kwargs: Any) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token_id, logprobs [V])`` one token at a time, as ``mlx_lm.generate_step``.

    Greedy without a sampler; never stops by itself before ``max_tokens`` (callers stop at
    end-of-story). ``use_cache=False`` is the reference's full re-forward; ``compile=False`` runs
    the cached decode step eagerly.
    """
    ids = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
    for y, logprobs in generate_tokens([ids], model, max_tokens=max_tokens, sampler=sampler,
                                       **kwargs):
        yield y.item(), logprobs[0]


# ----------------------------------------------------------------------------------------------
# Text


@dataclass
class GenerationResponse:
    """One streamed piece, with mlx-lm's statistics."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop" (end-of-story) or "length" on the last response


def fit_max_tokens(model: nn.Module, prompt_tokens: int, max_tokens: int | None) -> int:
    """``max_tokens`` as asked, or by default what the trained length leaves after the prompt
    (at least 1: a prompt of exactly ``seq_len`` tokens still gets one, with the warning)."""
    return max_tokens if max_tokens is not None else max(1, model.args.seq_len - prompt_tokens)


def check_length(model: nn.Module, prompt_tokens: int, max_tokens: int) -> str | None:
    """Refuse a prompt longer than the trained length; return a warning if generation runs past
    it (RoPE extrapolates, but no position beyond ``seq_len`` was ever trained)."""
    seq_len = model.args.seq_len
    if prompt_tokens > seq_len:
        raise ConfigError(f"the prompt has {prompt_tokens} tokens but the model takes at most "
                          f"{seq_len} (seq_len); shorten the prompt")
    if max_tokens < 0 or prompt_tokens + max_tokens > seq_len:
        return (f"warning: prompt ({prompt_tokens}) + max tokens ({max_tokens}) go past the "
                f"trained length {seq_len}; later positions are extrapolated")
    return None


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """The prompt's ids; an empty prompt is end-of-story alone, a story from nothing. (A model
    trained on one story per row, ``packing: false``, was never trained on what follows
    end-of-story nor on a story's first token, so its story from nothing is untrained: give such a
    model a first word.)"""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    return ids or [getattr(tokenizer, "eos_id", 0)]


def stream_generate(model: nn.Module, tokenizer: Any, prompt: str | Sequence[int],
                    max_tokens: int = 256, *, ignore_eos: bool = False,
                    **kwargs: Any) -> Iterator[GenerationResponse]:
    """Yield the continuation of ``prompt`` piece by piece until end-of-story or ``max_tokens``.

    ``kwargs`` go to :func:`generate_tokens` (``sampler``, ``use_cache``, ``compile``).
    ``ignore_eos`` keeps going past end-of-story (benchmarks).
    """
    ids = encode_prompt(tokenizer, prompt)
    eos = getattr(tokenizer, "eos_id", 0)
    detokenizer = StreamingDetokenizer(tokenizer, ids)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    n, token = 0, -1
    for n, (y, _) in enumerate(generate_tokens([ids], model, max_tokens=max_tokens, **kwargs)):
        token = y.item()
        if n == 0:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        stop = token == eos and not ignore_eos
        last = stop or n + 1 == max_tokens
        if not stop:
            detokenizer.add_token(token)
        yield GenerationResponse(
            text=detokenizer.segment(final=last), token=token, prompt_tokens=len(ids),
            prompt_tps=prompt_tps, generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=("stop" if stop else "length") if last else None)
        if stop:
            return


def generate(model: nn.Module, tokenizer: Any, prompt: str | Sequence[int],
             verbose: bool = False, **kwargs: Any) -> str:
    """The whole continuation as one string; ``verbose`` streams it and prints the statistics."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print_stats(response)
    return text


def print_stats(r: GenerationResponse | BatchStats, file: Any = None) -> None:
    """mlx-lm's statistics block."""
    file = file or sys.stdout
    print("=" * 10, file=file)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec",
          file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


# ----------------------------------------------------------------------------------------------
# Batches of prompts


@dataclass
class BatchStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    prompt_time: float = 0.0
    generation_time: float = 0.0


@dataclass
class BatchResult:
    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: BatchStats


def batch_generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str | Sequence[int]],
                   max_tokens: int = 256, *, batch_size: int = 16, ignore_eos: bool = False,
                   **kwargs: Any) -> BatchResult:
    """Continue several prompts, ``batch_size`` at a time (left-padded, exact per row).

    A row stops at end-of-story (not included in its tokens); a batch stops when all its rows
    have. Statistics sum over rows: generation tokens-per-sec is the batch's throughput.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1 (got {batch_size})")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    eos = getattr(tokenizer, "eos_id", 0)
    stats = BatchStats()
    out_tokens: list[list[int]] = []
    reasons: list[str] = []
    mx.reset_peak_memory()
    for start in range(0, len(encoded), batch_size):
        group = encoded[start:start + batch_size]
        rows: list[list[int]] = [[] for _ in group]
        done = [False] * len(group)
        tic = time.perf_counter()
        for n, (y, _) in enumerate(generate_tokens(group, model, max_tokens=max_tokens,
                                                   **kwargs)):
            if n == 0:
                stats.prompt_time += time.perf_counter() - tic
                tic = time.perf_counter()
            for i, t in enumerate(y.tolist()):
                if done[i]:
                    continue
                if t == eos and not ignore_eos:
                    done[i] = True
                else:
                    rows[i].append(t)
            if all(done):
                break
        stats.generation_time += time.perf_counter() - tic
        stats.prompt_tokens += sum(len(p) for p in group)
        stats.generation_tokens += sum(len(r) for r in rows)
        out_tokens += rows
        reasons += ["stop" if d else "length" for d in done]
    stats.prompt_tps = stats.prompt_tokens / max(stats.prompt_time, 1e-9)
    stats.generation_tps = stats.generation_tokens / max(stats.generation_time, 1e-9)
    stats.peak_memory = mx.get_peak_memory() / 1e9
    texts = [decode_continuation(tokenizer, p, r) for p, r in zip(encoded, out_tokens)]
    return BatchResult(texts, out_tokens, reasons, stats)


def decoding_lines(halt_policy: Any = None, speculation: Speculation | None = None) -> list[str]:
    """The statistics lines of adaptive halting and speculative decoding, after mlx-lm's."""
    lines = [steps_line(halt_policy)] if halt_policy is not None else []
    return lines + ([speculation.line()] if speculation is not None else [])


def _batch_main(args: argparse.Namespace, model: nn.Module, tokenizer: Any,
                sampler: Sampler, decoding: dict) -> None:
    prompts = read_prompts(args.prompts_file)
    longest = max(len(encode_prompt(tokenizer, p)) for p in prompts)
    args.max_tokens = fit_max_tokens(model, longest, args.max_tokens)
    warning = check_length(model, longest, args.max_tokens)
    if warning:
        print(warning, file=sys.stderr)
    result = batch_generate(model, tokenizer, prompts, args.max_tokens, batch_size=args.batch_size,
                            ignore_eos=args.ignore_eos, sampler=sampler,
                            use_cache=not args.no_cache, compile=not args.no_compile,
                            logits_processors=logits_processors_from_args(args), **decoding)
    settings = {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p,
                "min_p": args.min_p, "seed": args.seed,
                "repetition_penalty": args.repetition_penalty,
                "halt_max_steps": model.args.halt_max_steps, "L_cycles": model.args.L_cycles}
    lines = [json.dumps({"id": i, "prompt": p, "completion": text.rstrip(),
                         "generation_tokens": len(ids), "finish_reason": reason, **settings})
             for i, (p, text, ids, reason) in enumerate(
                 zip(prompts, result.texts, result.tokens, result.finish_reasons))]
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"wrote {len(lines)} stories to {out}")
        print_stats(result.stats)
        for line in decoding_lines(**decoding):
            print(line)
    else:  # JSON lines on stdout, statistics on stderr
        for line in lines:
            print(line)
        print_stats(result.stats, file=sys.stderr)
        for line in decoding_lines(**decoding):
            print(line, file=sys.stderr)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mlx_trm.generate",
        description="Continue a story with a (recursive) TRM model, mlx-lm style.")
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="",
                        help="text to continue (default: none, a story from nothing)")
    parser.add_argument("--max-tokens", "-m", type=int, default=None,
                        help="new tokens at most (stops earlier at end-of-story; default: what "
                             "the model's seq_len leaves after the prompt)")
    add_sampling_arguments(parser)
    parser.add_argument("--no-cache", action="store_true",
                        help="re-run the whole sequence per token, as the reference (slow)")
    parser.add_argument("--no-compile", action="store_true", help="run the decode step eagerly")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="do not stop at end-of-story (benchmarking)")
    parser.add_argument("--prompts-file", default=None,
                        help="batch mode: prompts, one per line (or .jsonl with 'prompt')")
    parser.add_argument("--output", default=None,
                        help="batch mode: write JSON lines here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch mode: prompts at once")
    parser.add_argument("--verbose", action="store_true",
                        help="print the model, its cache slots and the BLAS first")
    add_adaptive_arguments(parser)
    add_speculative_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_tokens is not None and (args.max_tokens == 0 or args.max_tokens < -1):
        raise ConfigError("--max-tokens must be positive (or -1 for no limit)")

    prepare_cpu_backend()
    model, tokenizer = load_for_generation(args)
    decoding = dict(halt_policy=policy_from_args(model, args),
                    speculation=speculation_from_args(model, tokenizer, args))
    sampler = make_sampler(args.temp, args.top_p, args.min_p, args.top_k)
    if args.seed is not None:
        mx.random.seed(args.seed)
    if args.verbose:
        a = model.args
        print(f"model: {a.name} ({a.kind}), halt_max_steps={a.halt_max_steps}, "
              f"H_cycles={a.H_cycles}, L_cycles={a.L_cycles}, L_layers={a.L_layers}, "
              f"cache slots: {model.num_cache_slots if not args.no_cache else 'off'}, "
              f"compiled: {not args.no_cache and not args.no_compile}, BLAS: {loaded_blas()}")
    if args.prompts_file:
        return _batch_main(args, model, tokenizer, sampler, decoding)

    ids = encode_prompt(tokenizer, args.prompt)
    args.max_tokens = fit_max_tokens(model, len(ids), args.max_tokens)
    warning = check_length(model, len(ids), args.max_tokens)
    if warning:
        print(warning, file=sys.stderr)
    print("=" * 10)
    print(args.prompt, end="", flush=True)
    response = None
    for response in stream_generate(model, tokenizer, ids, args.max_tokens, sampler=sampler,
                                    ignore_eos=args.ignore_eos, use_cache=not args.no_cache,
                                    compile=not args.no_compile, **decoding,
                                    logits_processors=logits_processors_from_args(args)):
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        print_stats(response)
        for line in decoding_lines(**decoding):
            print(line)


if __name__ == "__main__":
    main()
