"""The training loop and what it runs: the Trainer, evaluation, checkpoints, metric logging and trackers, compute
accounting and sharding over processes. The loop is handed built objects and never looks a part up by name.

May import: ``align.core``, ``align.metrics``, ``samplers``. Docstring only: importing it does nothing.
"""
