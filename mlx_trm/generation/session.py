"""A story written together (``mlx_trm.chat``): the running text as token ids, extended by what
the user types and by the model's continuations.

When the text outgrows the model's trained length (``seq_len``), the oldest tokens are dropped
so that text + new tokens fit (a sliding window).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.nn as nn

from ..config import ConfigError
from .generate import encode_prompt, stream_generate
from .sampling import make_sampler
from .stats import GenerationResponse


class StorySession:
    """The running story as token ids, and the settings of the next reply."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_tokens: int = 200,
                 temp: float = 0.7, top_k: int = 40, top_p: float = 0.0, min_p: float = 0.0,
                 compile: bool = True, halt_policy: Any = None, speculation: Any = None,
                 logits_processors: list[Any] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.halt_policy = halt_policy  # per-token halting (None: all steps)
        self.speculation = speculation  # speculative decoding (None: off)
        self.top_k, self.top_p, self.min_p = top_k, top_p, min_p
        self.compile = compile
        self.logits_processors = logits_processors  # mlx-lm's (--repetition-penalty)
        self.context: list[int] = []
        self.dropped = 0  # tokens slid out of the window so far
        self.stats = False  # print statistics after each reply
        self.last: GenerationResponse | None = None  # the last reply's final response
        self.set_temp(temp)
        self.set_max_tokens(max_tokens)

    def set_temp(self, temp: float) -> None:
        self.sampler = make_sampler(temp, self.top_p, self.min_p, self.top_k)
        self.temp = temp

    def set_max_tokens(self, n: int) -> None:
        seq_len = self.model.args.seq_len
        if not 1 <= n < seq_len:
            raise ConfigError(f"max tokens must be in [1, {seq_len - 1}] (the model's seq_len is "
                              f"{seq_len}; some room must be left for the story so far)")
        self.max_tokens = n

    def reset(self) -> None:
        self.context = []
        self.dropped = 0

    def reply(self, text: str) -> Iterator[GenerationResponse]:
        """Append ``text`` to the story and stream the model's continuation."""
        self.context += self.tokenizer.encode(text) if text else []
        if not self.context:  # an empty first line: a story from nothing (see encode_prompt)
            self.context = encode_prompt(self.tokenizer, "")
        window = self.model.args.seq_len - self.max_tokens
        if len(self.context) > window:  # slide: keep the most recent tokens
            self.dropped += len(self.context) - window
            self.context = self.context[-window:]
        if self.halt_policy is not None:  # steps per token of this reply
            self.halt_policy.tokens = self.halt_policy.act_steps = 0
        for response in stream_generate(self.model, self.tokenizer, self.context,
                                        self.max_tokens, sampler=self.sampler,
                                        compile=self.compile, halt_policy=self.halt_policy,
                                        speculation=self.speculation,
                                        logits_processors=self.logits_processors):
            if response.finish_reason != "stop":
                self.context.append(response.token)
            self.last = response
            yield response
