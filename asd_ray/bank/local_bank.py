"""Local-feature bank: windows of stacked log-mel frames of a machine's normals in FAISS banks. No ray here.

A clip's short events (impulses, clicks, modulation) are what its mean and std per band wash out, so this
bank keeps the normals' local features, as anomalib's PatchCore keeps image patches:
- every train clip (T x n_mels log-mel matrix) gives windows of ``context`` stacked frames; each window
  dimension is z-scored by the train windows' mean and std (``standardise``), then projected on the
  train windows' first ``pca_dim`` principal axes (``whiten``: each axis scaled to unit variance, which
  makes the Euclidean distance a Mahalanobis distance in that subspace), which also cuts the search cost;
- the windows, one bank per domain (``domain_norm``) or one for all, are subsampled to at most
  ``bank_size`` members by a greedy k-centre coreset (or FAISS k-means, or at random), drawn from at most
  ``candidates`` windows;
- a test window's distance is the mean Euclidean distance to its ``k`` nearest members; a clip's score
  is the max, the mean of the top ``top_q`` share, or the mean of its window distances; with domain
  banks each bank's clip score is divided by that bank's scale (the median leave-one-out score of its
  own clips). With ``domain_pick="nearest"`` the clip is scored by the bank nearest the bulk of its windows
  (the smaller median window distance, which finds a clip's domain), in units of that bank's own clips: its
  scaled score less 1, over the spread of its clips' scaled scores (IQR / 1.349), so a domain whose normals vary
  more (a noisy target room, 10 clips) does not put its normals above the other domain's. With ``"min"`` (the
  earlier rule) it is the smaller of the two scaled scores: a bank whose own clips carry sounds of
  their own, such as a target room's clanks, has a large scale, and every clip of the other domain then scores
  low against it, that domain's anomalies as well.
Leave-one-out scores of train clips leave out every member that came from the clip itself.
Every product runs on one BLAS thread (``asd_ray/threads.py``), so a clip's score is the same in every process;
``faiss_threads`` clips are scored at once, each on its own thread.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from asd_ray.bank.base import Detector
from asd_ray.bank.coreset import kcenter_coreset, kmeans_centroids, random_subset
from asd_ray.bank.memory_bank import BankError, MemoryBank
from asd_ray.bank.saved import finite, read_meta, read_npz, write_meta
from asd_ray.errors import BankFolderError
from asd_ray.models.frames import stack_frames
from asd_ray.threads import one_thread, spread

CORESETS = ("kcenter", "kmeans", "random")
CLIP_SCORES = ("max", "topq", "mean")
DOMAIN_PICKS = ("nearest", "min")


def clip_score(window_distances: np.ndarray, how: str = "topq", top_q: float = 0.1) -> float:
    """One clip's score from its windows' distances: ``max``; ``topq`` (mean of the ceil-free
    ``max(1, round(top_q * W))`` largest); ``mean``."""
    d = np.asarray(window_distances, dtype=np.float64)
    if d.size == 0:
        raise BankError("a clip without windows has no score")
    if how == "max":
        return float(d.max())
    if how == "mean":
        return float(d.mean())
    if how == "topq":
        n = max(1, int(round(top_q * d.size)))
        return float(np.partition(d, d.size - n)[d.size - n:].mean())
    raise BankError(f"clip score {how!r}: use one of {CLIP_SCORES}")


class LocalFeatureBank(Detector):
    """One machine's local-feature bank (see the module docstring); ``fit`` on clips' log-mel matrices
    (each T x n_mels), then ``score`` clips. Keywords are ``LocalConfig``'s."""

    kind = "LocalFeatureBank"
    features = "frames"
    reads = ("frames", "embed.batch_size")

    @classmethod
    def frames_needed(cls, config, entry, registry) -> int:
        return config.local.context

    def __init__(self, *, context: int = 5, stride: int = 1, standardise: bool = True, bank_size: int = 4096,
                 coreset: str = "kcenter", candidates: int = 32768, projection_dim: int = 128, k: int = 1,
                 clip_score: str = "topq", top_q: float = 0.1, domain_norm: bool = True,
                 domain_pick: str = "nearest", pca_dim: int = 128, whiten: bool = True,
                 calibration_clips: int = 200, seed: int = 0, faiss_threads: int = 1):
        if coreset not in CORESETS:
            raise BankError(f"coreset {coreset!r}: use one of {CORESETS}")
        if clip_score not in CLIP_SCORES:
            raise BankError(f"clip score {clip_score!r}: use one of {CLIP_SCORES}")
        if domain_pick not in DOMAIN_PICKS:
            raise BankError(f"domain pick {domain_pick!r}: use one of {DOMAIN_PICKS}")
        if bank_size < 1 or k < 1 or context < 1 or stride < 1 or not 0 < top_q <= 1:
            raise BankError("bank_size, k, context and stride must be at least 1 and top_q in (0, 1]")
        self.params = {"context": context, "stride": stride, "standardise": standardise, "bank_size": bank_size,
                       "coreset": coreset, "candidates": candidates, "projection_dim": projection_dim, "k": k,
                       "clip_score": clip_score, "top_q": top_q, "domain_norm": domain_norm,
                       "domain_pick": domain_pick, "pca_dim": pca_dim,
                       "whiten": whiten,
                       "calibration_clips": calibration_clips, "seed": seed}
        self.faiss_threads = faiss_threads
        self._centred: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # see _centred_members
        self.banks: dict[str, MemoryBank] = {}
        self.owners: dict[str, np.ndarray] = {}  # per bank: the train clip (index) each member came from; -1: none
        self.scales: dict[str, float] = {}
        self.spreads: dict[str, float] = {}  # per bank: the spread of its own clips' scaled scores (``nearest``)
        self.mean = np.zeros(0, np.float32)
        self.std = np.ones(0, np.float32)
        self.projection = np.zeros((0, 0), np.float32)  # (window dim x pca_dim); empty: none
        self.n_mels = 0
        self.train_scores = np.zeros(0)
        self.calibration_ids: list[str] = []

    @property
    def size(self) -> int:
        return sum(b.size for b in self.banks.values())

    @property
    def dim(self) -> int | None:
        """What a query row must have: n_mels (a query is one clip's T x n_mels log-mel matrix)."""
        return self.n_mels or None

    @property
    def memory_bytes(self) -> int:
        """Bytes a bank actor holds: the stored members (float32) and, once it has scored, their centred copies
        (``_centred_members``)."""
        return sum(b.size * b.dim * 4 for b in self.banks.values()) + sum(m.nbytes for m, _ in self._centred.values())

    def windows(self, clip: np.ndarray, stride: int | None = None) -> np.ndarray:
        """(T x n_mels) -> (W x context*n_mels) float32 windows, standardised as fitted."""
        c = np.asarray(clip, dtype=np.float32)
        if c.ndim != 2 or (self.n_mels and c.shape[1] != self.n_mels):
            raise BankError(f"a clip is a (frames x {self.n_mels or 'n_mels'}) matrix, got shape {c.shape}")
        w = stack_frames(c, self.params["context"], stride or 1)
        if self.mean.size:
            w = (w - self.mean) / self.std
        if self.projection.size:
            w = w @ self.projection
        return np.ascontiguousarray(w, dtype=np.float32)

    def fit(self, clips: Sequence[np.ndarray], ids: Sequence[str] | None = None, *,
            domains: Sequence[str] | None = None) -> "LocalFeatureBank":
        """Build the bank(s) from normal train clips (each T x n_mels); ``domains`` "source"/"target" per clip."""
        with one_thread():  # the PCA, the coreset and the leave-one-out scores: the same bank in every process
            return self._fit(clips, ids, domains)

    def _fit(self, clips: Sequence[np.ndarray], ids: Sequence[str] | None,
             domains: Sequence[str] | None) -> "LocalFeatureBank":
        p = self.params
        if len(clips) < 2:
            raise BankError(f"fit: a local-feature bank needs at least 2 train clips, got {len(clips)}")
        domains = np.asarray(list(domains) if domains is not None else ["source"] * len(clips))
        if len(domains) != len(clips):
            raise BankError(f"fit: {len(clips)} clips but {len(domains)} domains")
        self.n_mels = int(np.asarray(clips[0]).shape[1])
        self.mean, self.std = np.zeros(0, np.float32), np.ones(0, np.float32)
        self.projection = np.zeros((0, 0), np.float32)
        # Statistics clip by clip, windows made again for each pass: memory holds the projected windows of
        # the machine (pca_dim wide), never all of its raw context*n_mels-wide windows at once.
        if p["standardise"]:
            n, s1, s2 = 0, 0, 0
            for c in clips:
                w = self.windows(c, p["stride"])
                n, s1, s2 = n + len(w), s1 + w.sum(axis=0, dtype=np.float64), s2 + np.einsum("ij,ij->j", w, w, dtype=np.float64)
            self.mean = (s1 / n).astype(np.float32)
            self.std = (np.sqrt(np.maximum(s2 / n - (s1 / n) ** 2, 0.0)) + 1e-6).astype(np.float32)
        if 0 < p["pca_dim"] < p["context"] * self.n_mels:
            self.projection = self._pca(clips, np.random.default_rng(p["seed"]))
        per_clip = [self.windows(c, p["stride"]) for c in clips]
        groups = {"all": np.arange(len(clips))}
        if p["domain_norm"]:
            groups = {d: np.flatnonzero(domains == d) for d in ("source", "target") if (domains == d).sum() >= 2}
            if not groups:
                raise BankError("fit: domain_norm needs at least 2 train clips in the source or the target domain")
        rng = np.random.default_rng(p["seed"])
        self.banks, self.owners, self.scales, self.spreads, self._centred = {}, {}, {}, {}, {}
        for g, idx in groups.items():
            owner = np.concatenate([np.full(len(per_clip[i]), i) for i in idx])
            pos = np.concatenate([np.arange(len(per_clip[i])) for i in idx])
            if p["candidates"] and len(owner) > p["candidates"]:
                keep = random_subset(owner, p["candidates"], seed=int(rng.integers(2**31)))
                owner, pos = owner[keep], pos[keep]
            w = np.stack([per_clip[o][t] for o, t in zip(owner, pos)])
            if p["coreset"] == "kmeans" and len(w) > p["bank_size"]:
                members, owner = kmeans_centroids(w, p["bank_size"], seed=p["seed"]), np.full(p["bank_size"], -1)
            else:
                pick = (kcenter_coreset(w, p["bank_size"], projection_dim=p["projection_dim"], seed=p["seed"])
                        if p["coreset"] == "kcenter" else random_subset(w, p["bank_size"], seed=p["seed"]))
                members, owner = w[pick], owner[pick]
            self.banks[g] = MemoryBank(k=p["k"], faiss_threads=self.faiss_threads).fit(members)
            self.owners[g] = owner.astype(np.int64)
        # calibration clips: every clip of a small domain, an even draw of the rest, at most calibration_clips (a
        # draw over all clips left ~5 of 10 target clips to set the target bank's scale)
        cal = np.arange(len(clips))
        if p["calibration_clips"] and len(cal) > p["calibration_clips"]:
            by_size = sorted((np.flatnonzero(domains == d) for d in np.unique(domains)), key=len)
            budget, drawn = p["calibration_clips"], []
            for j, idx in enumerate(by_size):
                share = budget // (len(by_size) - j)
                drawn.append(idx if len(idx) <= share else rng.choice(idx, share, replace=False))
                budget -= len(drawn[-1])
            cal = np.sort(np.concatenate(drawn))
        # leave-one-out raw scores by (bank, clip): a clip's score in its own domain's bank (the costly search:
        # its own members are searched past) serves both its bank's scale and its calibration score
        own = {g: np.intersect1d(idx, cal) if len(np.intersect1d(idx, cal)) >= 2 else idx for g, idx in groups.items()}
        for g in groups:
            self._centred_members(g)  # made once, before threads share them
        pairs = sorted({(g, int(i)) for g in groups for i in own[g]} | {(g, int(i)) for g in groups for i in cal})
        loo = dict(zip(pairs, spread(lambda gi: self._bank_score(gi[0], per_clip[gi[1]], leave_out=gi[1]), pairs,
                                     self.faiss_threads)))
        for g in groups:
            s = np.array([loo[g, int(i)][0] for i in own[g]])
            self.scales[g] = float(np.median(s)) if np.median(s) > 0 else 1.0
            q1, q3 = np.percentile(s / self.scales[g], [25, 75])
            self.spreads[g] = float(q3 - q1) / 1.349 if q3 > q1 else 1.0
        ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(clips))]
        self.calibration_ids = [ids[i] for i in cal]
        self.train_scores = np.array([self._pick({g: loo[g, int(i)] for g in self.banks}) for i in cal])
        return self

    def fit_key(self) -> tuple:
        """Its fit depends on its parameters (``faiss_threads`` changes no score)."""
        return self.kind, tuple(sorted(self.params.items()))

    def adopt(self, fitted: "LocalFeatureBank") -> "LocalFeatureBank":
        """The banks, standardisation, projection and leave-one-out scores of ``fitted`` (a bank with this one's
        parameters, fitted on the same clips): the state ``fit`` would give."""
        if fitted.fit_key() != self.fit_key() or not fitted.banks:
            raise BankError("adopt: a fitted local-feature bank with this one's parameters is needed")
        for name in ("banks", "owners", "scales", "spreads", "_centred"):
            setattr(self, name, dict(getattr(fitted, name)))
        self.mean, self.std, self.projection, self.n_mels = fitted.mean, fitted.std, fitted.projection, fitted.n_mels
        self.train_scores, self.calibration_ids = fitted.train_scores, list(fitted.calibration_ids)
        return self

    def _pca(self, clips: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """(window dim x pca_dim) float32 principal axes of (a draw of at most ``candidates``) standardised train
        windows, largest variance first; divided by each axis' standard deviation with ``whiten``."""
        p = self.params
        counts = [(len(c) - p["context"]) // p["stride"] + 1 for c in clips]
        owner = np.concatenate([np.full(n, i) for i, n in enumerate(counts)])
        pos = np.concatenate([np.arange(n) for n in counts])
        if p["candidates"] and len(owner) > p["candidates"]:
            keep = random_subset(owner, p["candidates"], seed=int(rng.integers(2**31)))
            owner, pos = owner[keep], pos[keep]
        # owner is ascending (random_subset sorts): rows come clip by clip in the drawn order
        x = np.concatenate([self.windows(clips[i], p["stride"])[pos[owner == i]] for i in np.unique(owner)]
                           ).astype(np.float64)
        x -= x.mean(axis=0)
        values, vectors = np.linalg.eigh(x.T @ x / len(x))
        order = np.argsort(values)[::-1][: p["pca_dim"]]
        axes = vectors[:, order]
        if p["whiten"]:
            axes = axes / np.sqrt(np.maximum(values[order], 1e-12))
        return axes.astype(np.float32)

    def _centred_members(self, group: str) -> tuple[np.ndarray, np.ndarray]:
        """(the bank's members less their mean, that mean), kept after the first call."""
        if group not in self._centred:
            members = self.banks[group].members()  # float32, reconstructed from the FAISS index
            centre = members.mean(axis=0, dtype=np.float64).astype(np.float32)
            self._centred[group] = (np.ascontiguousarray(members - centre), centre)
        return self._centred[group]

    def _bank_score(self, group: str, windows: np.ndarray, leave_out: int | None = None) -> tuple[float, float]:
        """One clip's (score, median window distance) against one bank: each window's mean distance to its k
        nearest members (with ``leave_out``, those of other clips than that one), then ``clip_score`` over the
        windows; the median tells how near the bank is to the clip's bulk (``domain_pick``).

        All of a clip's windows against all members in one BLAS product (``faiss.pairwise_distances``): for a
        few hundred windows FAISS's search takes its own kernels, 2.6 times slower here (10.3 against 3.9 ms
        for 309 windows x 4,096 members x 128). Members and windows are centred on the members' mean first, so
        the product's |x|^2 + |y|^2 - 2xy loses nothing to large norms."""
        k = self.params["k"]
        members, centre = self._centred_members(group)
        d2 = faiss.pairwise_distances(np.ascontiguousarray(windows - centre, dtype=np.float32), members)
        if leave_out is not None:
            own = self.owners[group] == leave_out
            if len(own) - int(own.sum()) < k:
                raise BankError(f"leave-one-out: the {group} bank has fewer than {k} members of other clips")
            d2[:, own] = np.inf
        nearest = d2.min(axis=1, keepdims=True) if k == 1 else np.partition(d2, k - 1, axis=1)[:, :k]
        dist = np.sqrt(np.maximum(nearest, 0.0)).mean(axis=1)
        return clip_score(dist, self.params["clip_score"], self.params["top_q"]), float(np.median(dist))

    def _pick(self, per_bank: dict[str, tuple[float, float]]) -> float:
        """A clip's score from its (score, median distance) against each bank: one bank's scaled score; with two
        banks, the bank nearest its bulk in units of that bank's spread (``nearest``) or the smallest scaled score
        (``min``)."""
        if len(per_bank) == 1:
            (g, (score, _)), = per_bank.items()
            return score / self.scales[g]
        if self.params["domain_pick"] == "nearest":
            g = min(per_bank, key=lambda b: (per_bank[b][1], b))
            return (per_bank[g][0] / self.scales[g] - 1.0) / self.spreads[g]
        return min(per_bank[g][0] / self.scales[g] for g in per_bank)

    def score(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """(m,) float64 raw scores of clips (each T x n_mels; at least ``context`` frames)."""
        if not self.banks:
            raise BankError("the bank is empty: fit() it with normal clips before scoring")
        for g in self.banks:
            self._centred_members(g)  # made once, before threads share them
        return np.array(spread(self._score_one, list(clips), self.faiss_threads), dtype=np.float64)

    def _score_one(self, clip: np.ndarray) -> float:
        w = self.windows(clip)
        return self._pick({g: self._bank_score(g, w) for g in self.banks})

    def loo_scores(self) -> np.ndarray:
        """Leave-one-out scores of the calibration train clips (computed by ``fit``)."""
        if not self.banks:
            raise BankError("the bank is empty: fit() it first")
        return self.train_scores

    def loo_ids(self) -> list[str]:
        """The train clips ``loo_scores`` are given for, in its order."""
        return list(self.calibration_ids)

    def save(self, directory: str | Path) -> Path:
        """``bank.json`` (parameters), ``calibration.npz`` (standardisation, owners, scales, train scores)
        and one FAISS bank per domain group; no pickle."""
        if not self.banks:
            raise BankError("save: the bank is empty")
        d = write_meta(directory, self.kind, **self.params, n_mels=self.n_mels, scales=self.scales,
                       spreads=self.spreads, calibration_ids=self.calibration_ids)
        for g, bank in self.banks.items():
            bank.save(d / g)
        np.savez(d / "calibration.npz", mean=self.mean, std=self.std, projection=self.projection,
                 train_scores=self.train_scores,
                 **{f"owners_{g}": o for g, o in self.owners.items()})
        return d

    @classmethod
    def load(cls, directory: str | Path, *, faiss_threads: int = 1, **_ignored) -> "LocalFeatureBank":
        """The bank saved in ``directory``, checked: ``bank.json``'s n_mels and window against ``calibration.npz``
        (standardisation, projection, owners, train scores) and the domain banks; any fault is a
        ``BankFolderError`` naming the file."""
        d = Path(directory)
        meta = read_meta(d, cls.kind, {"n_mels": int, "scales": dict, "calibration_ids": list, "context": int,
                                       **{k: type(v) if not isinstance(v, float) else (int, float)
                                          for k, v in LOCAL_DEFAULTS.items() if k != "domain_pick"}})
        try:  # a bank saved before domain_pick existed scored by min
            bank = cls(faiss_threads=faiss_threads, domain_pick=meta.get("domain_pick", "min"),
                       **{k: meta[k] for k in LOCAL_DEFAULTS if k != "domain_pick"})
        except BankError as err:
            raise BankFolderError(d, "bank.json", str(err)) from None
        bank.n_mels = meta["n_mels"]
        bank.scales = _per_bank(d, "scales", meta["scales"])
        if "spreads" in meta or (bank.params["domain_pick"] == "nearest" and len(bank.scales) > 1):
            bank.spreads = _per_bank(d, "spreads", meta.get("spreads"), bank.scales)
        else:  # saved before spreads existed (it scores by min), or one domain bank: spreads are not read
            bank.spreads = {g: 1.0 for g in bank.scales}
        bank.banks = {g: MemoryBank.load(d / g, faiss_threads=faiss_threads) for g in bank.scales}
        cal = read_npz(d, "calibration.npz", ["mean", "std", "projection", "train_scores",
                                              *(f"owners_{g}" for g in bank.scales)])
        width = bank.params["context"] * bank.n_mels  # a window: context frames of n_mels bands
        if bank.n_mels < 1:
            raise BankFolderError(d, "bank.json", f"'n_mels' is {bank.n_mels}")
        for key in ("mean", "std"):
            x = finite(d, "calibration.npz", key, cal[key], (None,))
            if x.size not in (0, width):
                raise BankFolderError(d, "bank.json", f"'n_mels' is {bank.n_mels} (windows {bank.params['context']} x "
                                                      f"{bank.n_mels} = {width} wide) but calibration.npz's {key} is "
                                                      f"for {x.size}-wide windows")
        bank.mean, bank.std = cal["mean"], cal["std"]
        bank.projection = finite(d, "calibration.npz", "projection", cal["projection"], (None, None))
        if bank.projection.size and bank.projection.shape[0] != width:
            raise BankFolderError(d, "bank.json", f"'n_mels' is {bank.n_mels} (windows {width} wide) but "
                                                  f"calibration.npz's projection takes {bank.projection.shape[0]}-wide ones")
        member_dim = bank.projection.shape[1] if bank.projection.size else width
        for g, b in bank.banks.items():
            if b.dim != member_dim:
                raise BankFolderError(d, f"{g}/index.faiss", f"holds {b.dim}-d windows, bank.json and calibration.npz "
                                                             f"make {member_dim}-d ones")
            owners = cal[f"owners_{g}"]
            if owners.shape != (b.size,):
                raise BankFolderError(d, "calibration.npz", f"owners_{g} has {owners.size} entries for {b.size} members")
            bank.owners[g] = owners
        bank.train_scores = finite(d, "calibration.npz", "train_scores", cal["train_scores"], (None,))
        bank.calibration_ids = [str(i) for i in meta["calibration_ids"]]
        if not len(bank.train_scores) or len(bank.train_scores) != len(bank.calibration_ids):
            raise BankFolderError(d, "calibration.npz", f"{len(bank.train_scores)} train scores for "
                                                        f"{len(bank.calibration_ids)} calibration clips in bank.json")
        return bank


# bank.json fields of a local-feature bank's parameters, with the constructor's defaults (their types).
LOCAL_DEFAULTS = {k: v.default for k, v in inspect.signature(LocalFeatureBank.__init__).parameters.items()
                  if k not in ("self", "faiss_threads")}


def _per_bank(d: Path, key: str, values, banks: dict | None = None) -> dict[str, float]:
    """bank.json's ``key``: a positive number per domain bank (per bank of ``banks`` when given), else a
    ``BankFolderError`` naming the file."""
    if (not isinstance(values, dict) or not values or (banks is not None and set(values) != set(banks))
            or not all(isinstance(v, (int, float)) and np.isfinite(v) and v > 0 for v in values.values())):
        what = "name the domain banks with positive numbers" if banks is None else \
            "give each domain bank of 'scales' a positive number"
        raise BankFolderError(d, "bank.json", f"'{key}' must {what}, got {values}")
    return {g: float(v) for g, v in values.items()}
