"""The tokenizer class mlx-lm builds for our model directories (``--trust-remote-code``).

Our tokenizer adds no start token, so an empty prompt is zero tokens, and mlx-lm's batch generator
refuses a sequence without tokens by raising inside the server's generation thread: the thread
dies and every later request to ``mlx_lm.server`` fails. ``StoryTokenizer`` is the converted BPE
(same ids, same text) with one difference: a text (or a chat) that encodes to nothing encodes to
end-of-story instead, the context that a packed training row shows the model before every story
but the first. So an empty prompt starts a story from nothing, as ``mlx_trm.generate`` does, and
no request reaches the batch generator without tokens.

tokenizer_config.json names it in ``auto_map``; transformers imports it from the directory's
``mlx_lm_model.py`` only when the caller trusts remote code (mlx-lm passes its flag on).
Without that flag AutoTokenizer builds the plain ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerFast


class StoryTokenizer(PreTrainedTokenizerFast):
    """``PreTrainedTokenizerFast`` whose empty texts and chats encode to ``[eos_token_id]``
    (mlx-lm's own ``NewlineTokenizer`` overrides ``encode`` the same way)."""

    def _start_of_story(self, ids: Any) -> Any:
        # only plain id lists (what mlx-lm asks for); tensors and batches are left as they are
        if isinstance(ids, list) and not ids:
            return [self.eos_token_id]
        return ids

    def encode(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        return self._start_of_story(super().encode(text, *args, **kwargs))

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        # messages whose text is empty; no messages at all stay transformers' one-line error
        out = super().apply_chat_template(conversation, *args, **kwargs)
        return self._start_of_story(out) if kwargs.get("tokenize", True) else out
