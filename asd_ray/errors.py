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


class BankFolderError(BankError):
    """A saved bank that cannot be loaded as it is: ``folder`` (the machine's bank folder), ``file`` in it (a path
    relative to the folder; "" when no one file is at fault) and ``what`` is wrong, said in one line."""

    def __init__(self, folder, file: str, what: str):
        self.folder, self.file, self.what = str(folder), str(file), what
        super().__init__(f"saved bank {self.folder}: {self.file + ': ' if self.file else ''}{what}")

    def under(self, root) -> "BankFolderError":
        """The same fault named from ``root``, a folder above this one (a fusion's member_0/ ...)."""
        import os

        path = os.path.relpath(os.path.join(self.folder, self.file or "."), str(root))
        return BankFolderError(root, "" if path == "." else path, self.what)


class CheckpointError(BackboneError):
    """A checkpoint or training state that cannot be loaded safely or at all, naming the file."""
