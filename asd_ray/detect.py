"""The detector from embeddings to official files, and the single-process reference run. No ray here.

``reference_run`` is the oracle the Ray pipeline must equal: it pre-processes and embeds every clip
in this process, then hands the same tables to ``detect`` and ``write_outputs`` as the Ray path does.
Every input clip ends up scored, used in a bank, or listed in ``rejects`` with its reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from asd_ray.bank.memory_bank import build_bank
from asd_ray.config import AEConfig, BankConfig, ConfigError, PostConfig, PreprocessConfig, RunConfig, save_config
from asd_ray.data.audio import try_preprocess
from asd_ray.data.layout import ClipRecord, discover
from asd_ray.report import write_report
from asd_ray.scoring.files import evaluate_scores, ground_truth, write_results, write_rows
from asd_ray.scoring.metrics import MetricError
from asd_ray.scoring.postprocess import postprocess

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported where a backbone is loaded: a Ray driver starts Ray without it
    from asd_ray.models.backbones import Backbone


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
    bank_size: int  # members of the k-NN bank, or train clips of the AE
    train_losses: list[float] = field(default_factory=list)  # the AE's loss per epoch


@dataclass
class RunReport:
    """What a run did: per-machine results, metrics where ground truth exists, rejects, timings."""

    results: dict[str, MachineResult]
    metrics: dict | None
    rejects: list[dict]
    unused: list[dict]
    clips_in: int
    clips_embedded: int
    timings: dict[str, float] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)
    truth: dict = field(default_factory=dict)  # {machine: {filename: (label, domain)}} where known
    unscored: list[dict] = field(default_factory=list)  # embedded test clips of machines without a bank


def plan_records(records: Iterable[ClipRecord]) -> tuple[list[ClipRecord], list[dict]]:
    """Split a corpus into clips the detector embeds (normal train clips, test clips) and unused ones with a reason."""
    used, unused = [], []
    for r in records:
        if r.parse_error:
            unused.append({"path": r.path, "machine": r.machine, "reason": r.parse_error})
        elif r.split == "supplemental":
            unused.append({"path": r.path, "machine": r.machine, "reason": "supplemental clip: not part of a bank"})
        elif r.split == "train" and r.label != "normal":
            unused.append({"path": r.path, "machine": r.machine, "reason": "train clip not known to be normal"})
        else:
            used.append(r)
    return used, unused


def embed_records(records: Sequence[ClipRecord], backbone: "Backbone", preprocess: PreprocessConfig,
                  batch_size: int = 16, progress: Callable[[int], None] | None = None, chunk_batches: int = 16
                  ) -> tuple[np.ndarray, list[ClipRecord], list[dict], list[list[str]]]:
    """Pre-process and embed clips in this process.

    Returns (n x dim float32 embeddings, the n records embedded, rejects [{path, machine, reason}],
    per-clip pre-processing flags). A backbone with ``dim`` None (``AEFeatures``) gives a list of
    per-clip matrices instead of the n x dim array. Works through ``chunk_batches`` batches at a time, in length order
    inside a chunk so that equal lengths share a batch; memory holds one chunk of waveforms, not the corpus.
    """
    kwargs = dataclasses.asdict(preprocess)
    embs, kept, flags, rejects = [], [], [], []
    chunk = batch_size * chunk_batches
    for start in range(0, len(records), chunk):
        waves = []
        for r in records[start:start + chunk]:
            clip, reason = try_preprocess(r.path, **kwargs)
            if clip is None:
                rejects.append({"path": r.path, "machine": r.machine, "reason": reason})
                continue
            waves.append(clip.waveform)
            kept.append(r)
            flags.append(clip.flags)
        out: list = [None] * len(waves)
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            for i, e in zip(idx, backbone.embed([waves[i] for i in idx])):
                out[i] = e
            if progress:
                progress(len(idx))
        embs.extend(out)
    if backbone.dim is None:  # per-clip feature matrices (the AE baseline's log-mel frames)
        return embs, kept, rejects, flags
    return (np.stack(embs).astype(np.float32) if embs else np.zeros((0, backbone.dim), np.float32)), kept, rejects, flags


@dataclass
class MachineSplit:
    """One machine's rows: normal train clips (bank / model) and test clips in file-name (stream) order."""

    machine: str
    section: str
    train: list[int]
    test: list[int]


def machine_splits(records: Sequence[ClipRecord], unscored: list[dict] | None = None) -> list[MachineSplit]:
    """Rows per machine. A machine with test clips but fewer than 2 normal train clips cannot be modelled:
    its test clips go to ``unscored`` with the reason (or, without ``unscored``, it is an error)."""
    by_machine: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_machine.setdefault(r.machine, []).append(i)
    splits = []
    for machine, idx in sorted(by_machine.items()):
        train = [i for i in idx if records[i].is_normal_train]
        test = sorted((i for i in idx if records[i].split == "test"), key=lambda i: records[i].filename)
        if not test:
            continue
        if len(train) < 2:
            reason = f"machine {machine}: {len(train)} usable normal train clip(s); a bank needs at least 2"
            if unscored is None:
                raise MetricError(reason)
            unscored.extend({"path": records[i].path, "machine": machine, "reason": reason} for i in test)
            continue
        splits.append(MachineSplit(machine, records[test[0]].section, train, test))
    return splits


def machine_result(split: MachineSplit, records: Sequence[ClipRecord], raw: np.ndarray, train_scores: np.ndarray,
                   post: PostConfig, model_size: int, train_losses: list[float] | None = None) -> MachineResult:
    """Post-processing and decisions of one machine's raw test scores (threshold from its train scores)."""
    scores, decisions, threshold = postprocess(raw, train_scores, **dataclasses.asdict(post))
    return MachineResult(machine=split.machine, section=split.section,
                         filenames=[records[i].filename for i in split.test], raw_scores=raw, scores=scores,
                         decisions=decisions, threshold=threshold, bank_size=model_size,
                         train_losses=list(train_losses or []))


def detect(embeddings: np.ndarray, records: Sequence[ClipRecord], *, bank: BankConfig, post: PostConfig,
           unscored: list[dict] | None = None, bank_dir: str | Path | None = None) -> dict[str, MachineResult]:
    """Per machine: a bank of its normal train clips, scores of its test clips, post-processing, decisions.

    ``records[i]`` describes ``embeddings[i]``; see ``machine_splits`` for machines that cannot be scored.
    With ``bank_dir``, each machine's bank is saved to ``bank_dir/<machine>`` (what the bank actors of
    ``serve-fleet`` load). The threshold comes from the bank's leave-one-out train scores.
    """
    results = {}
    for s in machine_splits(records, unscored):
        mbank = build_bank(embeddings[s.train], [records[i].filename for i in s.train],
                           [records[i].domain for i in s.train], **dataclasses.asdict(bank))
        if bank_dir is not None:
            mbank.save(Path(bank_dir) / s.machine)
        results[s.machine] = machine_result(s, records, mbank.score(embeddings[s.test]), mbank.loo_scores(), post,
                                            mbank.size)
    return results


MachineMap = Callable[[Callable, list[tuple]], list]  # map(fn, [args, ...]) -> [fn(*args), ...]


def local_map(fn: Callable, jobs: list[tuple]) -> list:
    return [fn(*args) for args in jobs]


def detect_ae(features: Sequence[np.ndarray], records: Sequence[ClipRecord], *, ae: AEConfig, score: str,
              post: PostConfig, unscored: list[dict] | None = None, machine_map: MachineMap = local_map,
              device: str = "cpu") -> dict[str, MachineResult]:
    """The AE baseline per machine: ``features[i]`` is clip i's (frames x n_mels) log-mel matrix; one AE per
    machine on its normal train clips (trained through ``machine_map``: here, or one Ray task per machine);
    ``score`` is ``mse`` or ``maha``; the threshold is the gamma rule on the train clips' scores."""
    from asd_ray.models.autoencoder import ae_machine

    splits = machine_splits(records, unscored)
    kwargs = {"context": ae.frames, "hidden": ae.hidden, "bottleneck": ae.bottleneck, "layers": ae.layers,
              "epochs": ae.epochs, "batch_size": ae.batch_size, "lr": ae.lr, "seed": ae.seed, "device": device}
    jobs = [([features[i] for i in s.train], [records[i].domain for i in s.train], [features[i] for i in s.test])
            for s in splits]
    outs = machine_map(functools.partial(ae_machine, **kwargs), jobs)
    return {s.machine: machine_result(s, records, o.test[score], o.train[score], post, len(s.train), o.losses)
            for s, o in zip(splits, outs)}


def known_truth(results: dict[str, MachineResult], roots: Iterable[str | Path]) -> dict:
    """{machine: {filename: (label, domain)}} for the scored machines whose test labels are known."""
    truth: dict = {}
    for root in roots:
        for machine, table in ground_truth(root, None).items():
            if machine in results:
                truth.setdefault(machine, {}).update(table)
    return truth


def evaluate_results(results: dict[str, MachineResult], truth: dict) -> dict | None:
    """Official metrics of the machines in ``truth`` (see ``known_truth``).

    Test clips that were rejected have no score: they are left out of the metrics and listed
    under ``excluded_test_clips`` (the official evaluator would need them all).
    """
    if not truth:
        return None
    scored = {m: set(results[m].filenames) for m in truth}
    excluded = sorted(f"{m}/{f}" for m, t in truth.items() for f in t if f not in scored[m])
    kept = {m: {f: v for f, v in t.items() if f in scored[m]} for m, t in truth.items()}
    metrics = evaluate_scores({m: dict(zip(results[m].filenames, results[m].scores)) for m in kept}, kept)
    return {**metrics, "excluded_test_clips": excluded}


def write_outputs(report: RunReport, out_dir: str | Path, config: RunConfig) -> Path:
    """Official CSVs per machine, rejects.csv / unused.csv, metrics.json and the config used."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in report.results.values():
        write_results(out, r.machine, r.filenames, r.scores, r.decisions, r.section)
    for name, rows in (("rejects.csv", report.rejects), ("unused.csv", report.unused),
                       ("unscored.csv", report.unscored)):
        write_rows(out / name, [("path", "reason")] + [(x["path"], x["reason"]) for x in rows])
    body = {**(report.metrics or {"official_score": None, "machines": {}}),
            "counts": {"clips_in": report.clips_in, "embedded": report.clips_embedded,
                       "rejected": len(report.rejects), "unused": len(report.unused),
                       "unscored": len(report.unscored)},
            "thresholds": {m: r.threshold for m, r in report.results.items()},
            **({"train_losses": {m: r.train_losses for m, r in report.results.items()}}
               if any(r.train_losses for r in report.results.values()) else {}),
            "flags": report.flags, "timings_s": report.timings}
    (out / "metrics.json").write_text(json.dumps(body, indent=2))
    save_config(config, out / "config.yaml")
    write_report(report, out, config)
    return out


def check_counts(report: RunReport) -> None:
    """Input count = embedded + rejected + unused; anything else means a clip was lost."""
    if report.clips_in != report.clips_embedded + len(report.rejects) + len(report.unused):
        raise RuntimeError(f"clip accounting broken: {report.clips_in} in, {report.clips_embedded} embedded, "
                           f"{len(report.rejects)} rejected, {len(report.unused)} unused")


Embedder = Callable[[Sequence[ClipRecord]], tuple[np.ndarray, list[ClipRecord], list[dict], list[list[str]]]]


def run_detection(roots: Sequence[str | Path], config: RunConfig, embedder: Embedder,
                  out_dir: str | Path | None = None, machines: Iterable[str] | None = None,
                  machine_map: MachineMap = local_map, device: str = "cpu") -> RunReport:
    """Discover a corpus, embed it with ``embedder``, detect, evaluate; write outputs when ``out_dir`` is set.

    ``embedder(records)`` returns what ``embed_records`` returns; the reference run embeds in this
    process, the Ray pipeline on a cluster, and everything else is this one function. With an AE
    ``config.detector``, the embedder gives log-mel matrices and ``machine_map`` trains the per-machine AEs
    (on ``device``).
    """
    t0 = time.perf_counter()
    records = discover(roots, machines, normals_only_roots=config.normals_only_roots)
    used, unused = plan_records(records)
    t1 = time.perf_counter()
    emb, kept, rejects, flags = embedder(used)
    t2 = time.perf_counter()
    unscored: list[dict] = []
    if config.detector == "knn":
        results = detect(emb, kept, bank=config.bank, post=config.post, unscored=unscored,
                         bank_dir=None if out_dir is None else Path(out_dir) / "banks")
    else:
        results = detect_ae(emb, kept, ae=config.ae, score=config.detector.removeprefix("ae-"), post=config.post,
                            unscored=unscored, machine_map=machine_map, device=device)
    truth = known_truth(results, roots)
    metrics = evaluate_results(results, truth)
    t3 = time.perf_counter()
    flag_counts = dict(Counter(f.split(":")[0] for fl in flags for f in fl))
    report = RunReport(results=results, metrics=metrics, rejects=rejects, unused=unused, clips_in=len(records),
                       clips_embedded=len(kept), flags=flag_counts, truth=truth, unscored=unscored,
                       timings={"discover": t1 - t0, "embed": t2 - t1, "score_evaluate": t3 - t2})
    check_counts(report)
    if out_dir is not None:
        write_outputs(report, out_dir, config)
        log.info("outputs and report written in %.1f s", time.perf_counter() - t3)
    return report


def ae_feature_kwargs(config: RunConfig) -> dict:
    """``AEFeatures`` keywords; a ``min_seconds`` too short for one stacked vector is a config error up front
    (otherwise the shortest clips would stop the AE's training instead of being rejected by pre-processing)."""
    ae = config.ae
    shortest = int(config.preprocess.min_seconds * config.preprocess.sample_rate)
    if 1 + shortest // ae.hop_length < ae.frames:
        need = (ae.frames - 1) * ae.hop_length / config.preprocess.sample_rate
        raise ConfigError(f"preprocess.min_seconds={config.preprocess.min_seconds}: the AE stacks {ae.frames} frames "
                          f"of hop {ae.hop_length}, so clips must be at least {need:.3f} s; raise min_seconds")
    return {"sample_rate": config.preprocess.sample_rate, "n_mels": ae.n_mels, "n_fft": ae.n_fft,
            "hop_length": ae.hop_length, "power": ae.power}


def reference_run(roots: Sequence[str | Path], config: RunConfig, out_dir: str | Path | None = None,
                  machines: Iterable[str] | None = None) -> RunReport:
    """Single-process run over a corpus: the oracle for the Ray pipeline."""
    if config.detector == "knn":
        from asd_ray.models.backbones import load_backbone

        backbone = load_backbone(**dataclasses.asdict(config.embed))
    else:
        from asd_ray.models.autoencoder import AEFeatures

        backbone = AEFeatures(**ae_feature_kwargs(config))

    def embedder(records):
        return embed_records(records, backbone, config.preprocess, config.embed.batch_size)

    return run_detection(roots, config, embedder, out_dir, machines)
