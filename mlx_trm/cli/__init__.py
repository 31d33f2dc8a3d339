"""The commands: ``mlx_trm.train``, ``mlx_trm.evaluate``, ``mlx_trm.generate``, ``mlx_trm.chat``,
``mlx_trm.convert`` (console scripts) or ``python -m mlx_trm.cli.<command>``.

Each parses its arguments with the standard library alone (arguments.py) and only then imports
mlx, mlx-lm and the model, so ``--help`` and a bad argument answer at once. ``config.cli_errors``
wraps every ``main``: a bad setting is one line and exit 2, Ctrl-C one line and exit 130.
"""
