"""Training: the step (``step.py``: the loss, its gradient, the update), the loop on ready
objects (``loop.py``), the run directory (``run_dir.py``: lock, resume, checkpoints, metrics),
fitting the batch to memory (``memory.py``), the progress display (``progress.py``), held-out
evaluation (``evaluation.py``) and a run built from a config (``run.py``, behind
``mlx_trm.train``)."""
