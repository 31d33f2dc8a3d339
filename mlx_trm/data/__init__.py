"""Data: stories from files, directories or the hub (``sources.py``), the tokenizers
(``tokenizer.py``: SentencePiece BPE, gpt-neo-10k) and the token batches of training and
evaluation (``batches.py``: tokenize, cache, pack, iterate)."""
