"""The contract every detector keeps (``Detector``), each capability declared with its default. No ray here.

A detector is fitted on one machine's normal train features and scores any clips (higher: more anomalous).
Callers never ask what a detector is (no ``isinstance``, ``hasattr``/``getattr`` or name checks): what one can
do is declared here, and the registry (``asd_ray/detectors/registry.py``) builds, loads and describes them by
their config name. The class methods that take a ``config`` are the registry's: ``entry`` is the detector's
registry entry (its name, config section, fixed keywords and words), ``registry`` builds nested detectors.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

from asd_ray.errors import BankError

if TYPE_CHECKING:
    from asd_ray.config import RunConfig
    from asd_ray.detectors.registry import Registry


@dataclass(frozen=True)
class DetectorEntry:
    """One ``detector`` value of the config: its class (by saved kind), its config section, the constructor
    keywords the name fixes (``ae-mse``: ``score_kind="mse"``) and what it is in words (report.md)."""

    name: str
    kind: str
    section: str
    words: str
    options: dict[str, Any] = field(default_factory=dict)


class Detector(abc.ABC):
    """What every detector offers. Subclasses set ``kind`` and implement the abstract methods; the rest has a
    default that says "this detector does not do that"."""

    kind: ClassVar[str] = ""  # its name in a saved ``bank.json``
    features: str = "clip"  # what it eats: "clip" (n x dim embeddings) or "frames" (n T_i x n_mels log-mel matrices)
    reads: ClassVar[tuple[str, ...]] = ()  # config sections / keys it reads besides its own section
    uses_noise: ClassVar[bool] = False  # whether ``fit`` takes the machine's noise-only clips (``noise=``)
    takes_normals: ClassVar[bool] = False  # whether ``add_normals`` appends clips after fitting (the service's /normals)
    score_keys: ClassVar[dict[str, str]] = {}  # config key -> ``configure`` keyword: settings it takes at score time
    losses: Sequence[float] = ()  # its training curve (a trained model's loss per epoch), if it has one

    # --- built from the config (by the registry) -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: "RunConfig", entry: DetectorEntry, registry: "Registry", *,
                    device: str = "cpu") -> "Detector":
        """An unfitted detector of ``entry``: by default the class built from its section's keywords and the
        entry's fixed ones."""
        return cls(**dataclasses.asdict(getattr(config, entry.section)), **entry.options)

    @classmethod
    def settings_read(cls, config: "RunConfig", entry: DetectorEntry, registry: "Registry") -> set[str]:
        """The config sections and keys this detector reads under ``config``."""
        return {entry.section, *cls.reads}

    @classmethod
    def features_for(cls, config: "RunConfig", entry: DetectorEntry, registry: "Registry") -> str:
        """What the detector built from ``config`` eats, without building it."""
        return cls.features

    @classmethod
    def frames_needed(cls, config: "RunConfig", entry: DetectorEntry, registry: "Registry") -> int:
        """How many log-mel frames a clip must have at least (the frames it stacks into one vector)."""
        return 1

    @classmethod
    def trains_a_model(cls, config: "RunConfig", entry: DetectorEntry, registry: "Registry") -> bool:
        """Whether fitting trains a torch model (and so gains from a GPU)."""
        return False

    @classmethod
    def needs_log_mel(cls, config: "RunConfig", entry: DetectorEntry, registry: "Registry") -> bool:
        """Whether its frames must be log-mel bands in dB (what it computes means nothing over a backbone's)."""
        return False

    @classmethod
    def describe(cls, config: "RunConfig", entry: DetectorEntry, registry: "Registry") -> str:
        """What the detector is, in a few words (report.md's header)."""
        return entry.words

    # --- what it is ------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Members of its bank(s), or train clips of a model."""

    @property
    def dim(self) -> int | None:
        """What a query row must have (clip: the embedding size; frames: n_mels); None before it is fitted."""
        return None

    def eats(self) -> str:
        """Its features in words ("128-band log-mel frames", "768-d clip embeddings")."""
        return f"{self.dim}-band log-mel frames" if self.features == "frames" else f"{self.dim}-d clip embeddings"

    @property
    def memory_bytes(self) -> int:
        """Bytes of the stored vectors a bank actor holds for it (float32): its parts' (a model stores none)."""
        return sum(part.memory_bytes for _, part in self.parts())

    def parts(self) -> list[tuple[str, "Detector"]]:
        """The detectors inside this one, each with the prefix its settings are reported under (a fusion's
        members: ``member_<i>.``; a wrapper's inner detector: no prefix)."""
        return []

    # --- fit and score ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def fit(self, features: Any, ids: Sequence[str] | None = None, *,
            domains: Sequence[str] | None = None) -> "Detector":
        """Fit on one machine's normal train clips (``ids`` name them, ``domains`` "source" / "target" each)."""

    @abc.abstractmethod
    def score(self, features: Any) -> np.ndarray:
        """(m,) float64 raw scores of m clips (higher: more anomalous)."""

    @abc.abstractmethod
    def loo_scores(self) -> np.ndarray:
        """Scores of train clips with each clip left out of its own score where the detector can (thresholds)."""

    @abc.abstractmethod
    def loo_ids(self) -> list[str]:
        """The train clips ``loo_scores`` are given for, in its order."""

    def fit_key(self) -> tuple | None:
        """What its fit depends on besides the train features: two detectors with equal keys fitted on the same
        features hold the same model, so ``compare`` fits it once and the other ``adopt``s it (``ae-mse`` and
        ``ae-maha``: one AE, two scores; ``local`` and a fusion's local member). None (the default): nothing
        shared."""
        return None

    def adopt(self, fitted: "Detector") -> "Detector":
        """Take the fit of ``fitted`` (a fitted detector with this one's ``fit_key``, on the same train features)
        instead of fitting: the same state ``fit`` would give."""
        raise BankError(f"a {self.kind} shares no fit (its fit_key is None)")

    def shared_fits(self) -> dict[tuple, "Detector"]:
        """{fit_key: fitted detector} of this fitted detector and of the parts it fitted that later detectors on
        the same train features can take (``adopt_from``): itself, when it has a ``fit_key``."""
        key = self.fit_key()
        return {} if key is None else {key: self}

    def can_adopt(self, shared: dict[tuple, "Detector"]) -> bool:
        """Whether ``shared`` (``shared_fits`` of detectors fitted on the same train features) holds all of this
        detector's fit."""
        key = self.fit_key()
        return key is not None and key in shared

    def adopt_from(self, shared: dict[tuple, "Detector"]) -> "Detector":
        """Take this detector's fit from ``shared`` (``can_adopt`` must hold) instead of fitting."""
        return self.adopt(shared[self.fit_key()])

    def configure(self, **settings: Any) -> "Detector":
        """Change score-time settings (the ``score_keys`` keywords) of a fitted detector without refitting."""
        if settings:
            raise BankError(f"a {self.kind} takes no score-time settings (got {sorted(settings)})")
        return self

    def score_settings(self) -> dict:
        """The settings ``configure`` can change, as they are now (keywords of ``score_keys``)."""
        return {}

    def add_normals(self, embeddings: np.ndarray, ids: Sequence[str], domain: str = "target") -> int:
        """Append normal clips after fitting (first-shot calibration); ids it has already are skipped. Returns
        how many were new."""
        raise BankError(f"a {self.kind} takes no added normals: refit it with asd-ray run")

    def clip_members(self) -> np.ndarray:
        """The clip embeddings it stores (size x dim float32)."""
        raise BankError(f"a {self.kind} keeps no clip embeddings (it eats {self.eats()})")

    # --- storage ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write it into ``directory`` (``bank.json`` names its ``kind``); no pickle."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: str | Path, *, faiss_threads: int = 1, device: str = "cpu",
             registry: "Registry | None" = None) -> "Detector":
        """The detector saved in ``directory``, checked (a fault is a ``BankFolderError`` naming the file);
        ``registry`` loads the detectors saved inside it."""
