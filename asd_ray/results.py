"""What a run produces: per-machine results, the run report, and the record of a clip left out. No ray here.

These types are shared by the run flow (``detect``), the report writer (``report``) and the Ray layer;
they import nothing of either, so neither imports the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Reject:
    """A clip that is not scored or not used, and why: ``path``, its ``machine`` (may be empty), ``reason``."""

    path: str
    machine: str
    reason: str

    @classmethod
    def of(cls, item: "Reject | dict") -> "Reject":
        """A ``Reject`` from itself or from a ``{path, machine, reason}`` dict (the Ray pipeline's rows)."""
        if isinstance(item, Reject):
            return item
        return cls(path=str(item["path"]), machine=str(item.get("machine", "")), reason=str(item["reason"]))


@dataclass
class MachineResult:
    """One machine's test scores in stream order (sorted file names) and its decisions."""

    machine: str
    section: str
    filenames: list[str]
    raw_scores: np.ndarray
    scores: np.ndarray
    decisions: np.ndarray
    threshold: float
    bank_size: int  # members of the detector's bank (clip or local-feature), or train clips of the AE
    detector: str = ""  # the fitted detector's kind (``bank.json``'s "kind")
    train_losses: list[float] = field(default_factory=list)  # the AE's loss per epoch


@dataclass
class RunReport:
    """What a run did: per-machine results, metrics where ground truth exists, rejects, timings."""

    results: dict[str, MachineResult]
    metrics: dict | None
    rejects: list[Reject]
    unused: list[Reject]
    clips_in: int
    clips_embedded: int
    timings: dict[str, float] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)
    truth: dict = field(default_factory=dict)  # {machine: {filename: (label, domain)}} where known
    unscored: list[Reject] = field(default_factory=list)  # embedded clips (any split) of machines without a bank
    roots: list[str] = field(default_factory=list)  # the data roots the run read
    clips: dict = field(default_factory=dict)  # {machine: {"split", "train", "test"}}: embedded clips (report.clip_counts)
