"""Text generation, mlx-lm's shape: ``generate_step``, ``stream_generate``, ``generate``,
``batch_generate`` (``mlx_trm.generate`` is this module's :func:`generate`).

The decoders (decoders.py, adaptive.py, speculative.py) turn prompts into next-token logits
through the recursion-aware KV cache; this module samples from them (sampling.py), streams text
(data.tokenizer.StreamingDetokenizer), batches prompts and reports (stats.py).

Prompts are never given a BOS (the reference has none); an empty prompt starts a story from
end-of-story (:func:`encode_prompt`), the context a packed training row shows before every story
but the first, as GPT-2-style models start a text from their end-of-text token. Several
prompts run as one batch, left-padded: each row has its own RoPE positions and never attends to
padding, so every row gets exactly what it would get alone. Positions past the trained ``seq_len``
work (RoPE has no table) but were never trained: the CLI refuses prompts longer than ``seq_len``
and warns when prompt + new tokens go past it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..blas import blas_threads
from ..config import ConfigError
from ..data.tokenizer import StreamingDetokenizer, decode_continuation
from .adaptive import AdaptiveDecoder
from .decoders import CachedDecoder, Decoder, FullForwardDecoder
from .sampling import LogitsProcessor, Sampler, greedy
from .speculative import Speculation, SpeculativeDecoder
from .stats import BatchStats, GenerationResponse, print_stats


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


# ----------------------------------------------------------------------------------------------
# Batches of prompts


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
