"""Errors of bad input that the command line reports in one line, kept where importing them costs nothing.

Their modules import torch, faiss or scikit-learn at the top; the command line catches these errors around
every command, and importing them from there put torch into the driver of every Ray run, which never needs it
(1.3 s of its start on 2 CPU cores, 3.9 s on the H100 node, before Ray was even started).
"""


class BackboneError(RuntimeError):
    """A backbone that cannot be loaded or run, naming the checkpoint."""


class BankError(RuntimeError):
    """A bank used before it was fitted, or given input it cannot take."""


class MetricError(ValueError):
    """Inputs the official metrics cannot be computed from."""
