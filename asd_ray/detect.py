"""The run flow from a corpus to official files, and the single-process reference run. No ray here.

``run_detection`` plans the clips, has them embedded (clip embeddings or log-mel frame matrices, as the
detector eats), fits one detector per machine (``detectors/``) on its normal train clips, scores its
test clips, post-processes, evaluates and writes. ``reference_run`` is the oracle the Ray pipeline must
equal: it embeds every clip in this process and hands the same tables to the same flow as the Ray path.
Every input clip ends up scored, used in a bank, or listed (``Reject``) with its reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from asd_ray.bank.saved import write_preprocess
from asd_ray.config import ConfigError, PostConfig, PreprocessConfig, RunConfig, save_config
from asd_ray.data.audio import try_preprocess
from asd_ray.data.layout import ClipRecord, discover
from asd_ray.detectors import (REGISTRY, Detector, detector_features, features_key, frame_settings, make_detector,
                               uses_noise)
from asd_ray.models.frames import LogMelFrames, frames_needed_seconds
from asd_ray.progress import advance, stage
from asd_ray.report import clip_counts, write_report
from asd_ray.results import MachineResult, Reject, RunReport
from asd_ray.scoring.files import (evaluate_scores, ground_truth, read_eval_list, write_evaluator_results,
                                   write_results, write_rows)
from asd_ray.scoring.metrics import MetricError, TaskMap, in_process
from asd_ray.scoring.postprocess import calibrate, postprocess

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported where a backbone is loaded: a Ray driver starts Ray without it
    from asd_ray.models.backbones import Backbone

Features = Any  # an (n x dim) float32 array of clip embeddings, or a list of n (T_i x n_mels) log-mel matrices


def plan_records(records: Iterable[ClipRecord], noise: bool = False) -> tuple[list[ClipRecord], list[Reject]]:
    """Split a corpus into clips the detector embeds (normal train clips, test clips; with ``noise``, the
    noise-only supplemental clips too) and unused ones with a reason."""
    used, unused = [], []
    for r in records:
        if r.parse_error:
            unused.append(Reject(r.path, r.machine, r.parse_error))
        elif r.split == "supplemental" and noise and r.kind == "noise":
            used.append(r)
        elif r.split == "supplemental":
            why = "supplemental clip: not part of a bank" + ("" if noise else " (supplemental.noise_profile is off)")
            unused.append(Reject(r.path, r.machine, why))
        elif r.split == "train" and r.label != "normal":
            unused.append(Reject(r.path, r.machine, "train clip not known to be normal"))
        else:
            used.append(r)
    return used, unused


def embed_records(records: Sequence[ClipRecord], backbone: "Backbone | LogMelFrames", preprocess: PreprocessConfig,
                  batch_size: int = 16, chunk_batches: int = 16) -> tuple[Features, list[ClipRecord], list[Reject], list[list[str]]]:
    """Pre-process and embed clips in this process.

    Returns (features of the n records embedded, those n records, rejects, per-clip pre-processing flags).
    Features are an n x dim float32 array, or with ``LogMelFrames`` (``dim`` None) a list of per-clip
    (frames x n_mels) matrices. Works through ``chunk_batches`` batches at a time, in length order
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
                rejects.append(Reject(r.path, r.machine, reason))
                advance()
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
            advance(len(idx))
        embs.extend(out)
    if backbone.dim is None:
        return embs, kept, rejects, flags
    return (np.stack(embs).astype(np.float32) if embs else np.zeros((0, backbone.dim), np.float32)), kept, rejects, flags


def take(features: Features, rows: Sequence[int]) -> Features:
    """The features of ``rows`` (an array's rows, or a list's items)."""
    if isinstance(features, np.ndarray):
        return features[list(rows)]
    return [features[i] for i in rows]


@dataclass
class MachineSplit:
    """One machine's rows: normal train clips (bank / model), test clips in file-name (stream) order and
    noise-only supplemental clips (embedded only with ``supplemental.noise_profile``)."""

    machine: str
    section: str
    train: list[int]
    test: list[int]
    noise: list[int] = dataclasses.field(default_factory=list)


def machine_splits(records: Sequence[ClipRecord], unscored: list[Reject] | None = None) -> list[MachineSplit]:
    """Rows per machine. A machine with test clips but fewer than 2 normal train clips cannot be modelled: each
    of its clips (test, train and noise-only) goes to ``unscored`` with the reason (or, without ``unscored``, it
    is an error). So do the clips of a machine without test clips: no bank is fitted for it."""
    by_machine: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_machine.setdefault(r.machine, []).append(i)
    splits = []
    for machine, idx in sorted(by_machine.items()):
        train = [i for i in idx if records[i].is_normal_train]
        test = sorted((i for i in idx if records[i].split == "test"), key=lambda i: records[i].filename)
        if not test:
            if unscored is not None:
                why = f"machine {machine}: no test clips to score, so no bank is fitted"
                unscored.extend(Reject(records[i].path, machine, why) for i in idx)
            continue
        if len(train) < 2:
            reason = f"machine {machine}: {len(train)} usable normal train clip(s); a bank needs at least 2"
            if unscored is None:
                raise MetricError(reason)
            unscored.extend(Reject(records[i].path, machine, reason)
                            for i in test + [i for i in idx if records[i].split != "test"])
            continue
        noise = [i for i in idx if records[i].split == "supplemental" and records[i].kind == "noise"]
        splits.append(MachineSplit(machine, records[test[0]].section, train, test, noise))
    return splits


@dataclass
class FittedMachine:
    """One machine's fitted detector, the raw scores of its test clips and its leave-one-out train scores."""

    detector: Detector
    test_scores: np.ndarray
    train_scores: np.ndarray


def fit_machine(detector: Detector, train: Features | None, ids: list[str], domains: list[str], test: Features,
                noise: Features | None = None) -> FittedMachine:
    """Fit ``detector`` on one machine's normal train features and score its test features (a job of ``MachineMap``);
    a detector that ``uses_noise`` also gets the machine's noise-only supplemental clips. ``train`` None: the
    detector holds its fit already (adopted from another's, ``detect``), only scored."""
    if train is not None:
        detector.fit(train, ids, domains=domains, **({"noise": noise} if detector.uses_noise else {}))
    return FittedMachine(detector, detector.score(test), detector.loo_scores())


MachineMap = TaskMap  # map(fn, [args, ...]) -> [fn(*args), ...]: in this process, or one Ray task each


def local_map(fn: Callable, jobs: list[tuple]) -> list:
    out = []
    for args in jobs:
        out.append(fn(*args))
        advance()
    return out


def machine_result(split: MachineSplit, records: Sequence[ClipRecord], fitted: FittedMachine,
                   post: PostConfig) -> MachineResult:
    """Post-processing and decisions of one machine's raw test scores (threshold from its train scores)."""
    calibration = calibrate(fitted.train_scores, post.threshold_quantile)
    scores, decisions, threshold = postprocess(fitted.test_scores, calibration, minmax=post.minmax)
    det = fitted.detector
    return MachineResult(machine=split.machine, section=split.section,
                         filenames=[records[i].filename for i in split.test], raw_scores=fitted.test_scores,
                         scores=scores, decisions=decisions, threshold=threshold, bank_size=det.size,
                         detector=det.kind, train_losses=list(det.losses))


def detect(features: Features, records: Sequence[ClipRecord], *, detector: Callable[[], Detector], post: PostConfig,
           unscored: list[Reject] | None = None, bank_dir: str | Path | None = None,
           machine_map: MachineMap = local_map, fits: dict | None = None) -> dict[str, MachineResult]:
    """Per machine: ``detector()`` (a new, unfitted detector) fitted on its normal train clips, scores of its
    test clips, post-processing, decisions.

    ``records[i]`` describes ``features[i]``; see ``machine_splits`` for machines that cannot be scored.
    Machines are fitted through ``machine_map`` (here, or one Ray task each). With ``bank_dir``, each
    machine's fitted detector is saved to ``bank_dir/<machine>`` (what the bank actors of ``serve-fleet``
    load). The threshold comes from the detector's leave-one-out train scores. ``fits`` (a dict the caller keeps
    across runs on the same features, as ``compare`` does) holds, per machine and train clips, the ``shared_fits``
    of the detectors fitted so far: a detector whose fit is all there adopts it (``adopt_from``) and is only
    scored (one AE for ``ae-mse`` and ``ae-maha``; ``local`` and ``pooled`` for a fusion of the two).
    """
    splits = machine_splits(records, unscored)
    detectors = [detector() for _ in splits]
    shared = [None if fits is None else fits.setdefault((s.machine, tuple(records[i].path for i in s.train)), {})
              for s in splits]
    adopted = [sh is not None and d.can_adopt(sh) for d, sh in zip(detectors, shared)]
    for d, sh, a in zip(detectors, shared, adopted):
        if a:
            d.adopt_from(sh)
    jobs = [(d, None if a else take(features, s.train), [records[j].filename for j in s.train],
             [records[j].domain for j in s.train], take(features, s.test), None if a else take(features, s.noise))
            for d, s, a in zip(detectors, splits, adopted)]
    with stage("banks", total=len(splits), unit="machine"):
        fitted = machine_map(fit_machine, jobs)
    for f, sh in zip(fitted, shared):
        if sh is not None:
            for key, part in f.detector.shared_fits().items():
                sh.setdefault(key, part)
    results = {}
    with stage("scoring", total=len(splits), unit="machine"):
        for s, f in zip(splits, fitted):
            if bank_dir is not None:
                f.detector.save(Path(bank_dir) / s.machine)
            results[s.machine] = machine_result(s, records, f, post)
            advance()
    return results


def known_truth(results: dict[str, MachineResult], roots: Iterable[str | Path], eval_list: dict | None = None
                ) -> dict:
    """{machine: {filename: ClipTruth}} for the scored machines whose test labels are known (eval labels from
    ``eval_list``, ``read_eval_list`` of the baseline repo's single list, or each root's per-machine tables)."""
    truth: dict = {}
    for root in roots:
        for machine, table in ground_truth(root, None, eval_list).items():
            if machine in results:
                truth.setdefault(machine, {}).update(table)
    return truth


def evaluate_results(results: dict[str, MachineResult], truth: dict, task_map: MachineMap = in_process) -> dict | None:
    """Official metrics of the machines in ``truth`` (see ``known_truth``), per split, decisions included (the
    jackknife's leave-one-out values through ``task_map``).

    Test clips that were rejected have no score: they are left out of the metrics and listed
    under ``excluded_test_clips`` (the official evaluator would need them all).
    """
    if not truth:
        return None
    scored = {m: set(results[m].filenames) for m in truth}
    excluded = sorted(f"{m}/{f}" for m, t in truth.items() for f in t if f not in scored[m])
    kept = {m: {f: v for f, v in t.items() if f in scored[m]} for m, t in truth.items()}
    metrics = evaluate_scores({m: dict(zip(results[m].filenames, results[m].scores)) for m in kept}, kept,
                              {m: dict(zip(results[m].filenames, results[m].decisions.tolist())) for m in kept},
                              task_map)
    return {**metrics, "excluded_test_clips": excluded}


def write_reasons(out: Path, tables: dict[str, Sequence[Reject]]) -> None:
    """Each ``{file name: clips}`` table as ``out/<file name>``: a ``path,reason`` header and a row per clip."""
    for name, rows in tables.items():
        write_rows(out / name, [("path", "reason")] + [(x.path, x.reason) for x in rows])


def write_outputs(report: RunReport, out_dir: str | Path, config: RunConfig, plot_map: MachineMap | None = None
                  ) -> Path:
    """Official CSVs per machine, rejects.csv / unused.csv / unscored.csv, metrics.json, the config used and
    report.md with its plots (drawn by ``plot_map``, in this process by default)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in report.results.values():
        write_results(out, r.machine, r.filenames, r.scores, r.decisions, r.section)
    write_reasons(out, {"rejects.csv": report.rejects, "unused.csv": report.unused, "unscored.csv": report.unscored})
    body = {**(report.metrics or {"official_score": None, "machines": {}, "splits": {}}),
            "counts": {"clips_in": report.clips_in, "embedded": report.clips_embedded,
                       "rejected": len(report.rejects), "unused": len(report.unused),
                       "unscored": len(report.unscored)},
            "detector": {m: r.detector for m, r in report.results.items()},
            "bank_sizes": {m: r.bank_size for m, r in report.results.items()},
            "thresholds": {m: r.threshold for m, r in report.results.items()},
            **({"train_losses": {m: r.train_losses for m, r in report.results.items()}}
               if any(r.train_losses for r in report.results.values()) else {}),
            "flags": report.flags, "timings_s": report.timings}
    (out / "metrics.json").write_text(json.dumps(body, indent=2))
    if report.metrics:  # what the official evaluator would write for this folder, per split
        write_evaluator_results(out, report.metrics, out.resolve().name)
    save_config(config, out / "config.yaml")
    write_report(report, out, config, plot_map)
    return out


def check_counts(report: RunReport) -> None:
    """Input count = embedded + rejected + unused; anything else means a clip was lost."""
    if report.clips_in != report.clips_embedded + len(report.rejects) + len(report.unused):
        raise RuntimeError(f"clip accounting broken: {report.clips_in} in, {report.clips_embedded} embedded, "
                           f"{len(report.rejects)} rejected, {len(report.unused)} unused")


Embedder = Callable[[Sequence[ClipRecord]], tuple[Features, list[ClipRecord], list[Reject], list[list[str]]]]


def run_detection(roots: Sequence[str | Path], config: RunConfig, embedder: Embedder,
                  out_dir: str | Path | None = None, machines: Iterable[str] | None = None,
                  machine_map: MachineMap = local_map, device: str = "cpu",
                  warm_up: Callable[[Sequence[ClipRecord]], None] | None = None,
                  task_map: MachineMap = in_process, fits: dict | None = None) -> RunReport:
    """Discover a corpus, embed it with ``embedder``, detect, evaluate; write outputs when ``out_dir`` is set.

    ``embedder(records)`` returns what ``embed_records`` returns, in the features ``config.detector`` eats;
    the reference run embeds in this process, the Ray pipeline on a cluster, and everything else is this
    one function. ``machine_map`` fits the per-machine detectors (an AE on ``device``), ``task_map`` runs the
    driver's own work in parallel jobs: the metrics' jackknife and the report's plots (both: in this process by
    default); ``fits`` (a dict kept across runs, ``compare``'s) lets
    detectors that share a fit on the same features fit it once (``detect``). ``warm_up(records)``
    (the Ray run's: starting its embedding actors for the clips to embed, waiting for its warm workers) runs after
    discovery and is timed on its own (``timings["warm_up"]``), as the reference run's imports and backbone
    loading are not part of its embedding time either.
    """
    check_batch_post(config.post)
    t0 = time.perf_counter()
    eval_list = read_eval_list(config.eval_list) if config.eval_list else None  # a bad path fails before any work
    with stage("discover"):
        records = discover(roots, machines, normals_only_roots=config.normals_only_roots)
        used, unused = plan_records(records, noise=uses_noise(config))
        advance(len(records))
    t1 = time.perf_counter()
    if warm_up is not None:
        warm_up(used)
    tw, t1 = time.perf_counter() - t1, time.perf_counter()
    with stage("embed", total=len(used)):
        features, kept, rejects, flags = embedder(used)
    rejects = [Reject.of(r) for r in rejects]
    t2 = time.perf_counter()
    unscored: list[Reject] = []
    results = detect(features, kept, detector=lambda: make_detector(config, device=device), post=config.post,
                     unscored=unscored, bank_dir=None if out_dir is None else Path(out_dir) / "banks",
                     machine_map=machine_map,
                     fits=None if fits is None else fits.setdefault(features_key(config), {}))
    t3 = time.perf_counter()
    truth = known_truth(results, roots, eval_list)
    metrics = evaluate_results(results, truth, task_map)
    flag_counts = dict(Counter(f.split(":")[0] for fl in flags for f in fl))
    report = RunReport(results=results, metrics=metrics, rejects=rejects, unused=unused, clips_in=len(records),
                       clips_embedded=len(kept), flags=flag_counts, truth=truth, unscored=unscored,
                       timings={"discover": t1 - tw - t0, **({"warm_up": tw} if warm_up else {}), "embed": t2 - t1, "score_evaluate": time.perf_counter() - t2,
                                "fit_score": t3 - t2})
    check_counts(report)
    report.roots, report.clips = [str(r) for r in roots], clip_counts(kept)
    if out_dir is not None:
        for machine in results:  # how the banks' clips were pre-processed: a service pre-processes requests alike
            if (Path(out_dir) / "banks" / machine).is_dir():
                write_preprocess(Path(out_dir) / "banks" / machine, dataclasses.asdict(config.preprocess))
        t4 = time.perf_counter()
        with stage("report", total=1, unit="run"):
            write_outputs(report, out_dir, config, task_map)
            advance()
        report.timings["report"] = time.perf_counter() - t4
        log.info("outputs and report written in %.1f s", report.timings["report"])
    return report


def check_batch_post(post: PostConfig) -> None:
    """A batch run's post-processing must not see labels: its median filter would run over each machine's test
    clips in file-name order, which in DCASE files is grouped by domain and label, so it would smooth within a
    label: a sweep that offered it picked it for dev 0.80 against 0.74 unfiltered, while eval fell from 0.69 to
    0.58. The filter is for a stream's time order: serve-fleet and serve apply it."""
    if post.median_window > 1:
        raise ConfigError(f"post.median_window={post.median_window}: a batch run's test clips have no time order "
                          "(DCASE file names group them by domain and label, so the filter would smooth within a "
                          "label); the median filter applies to streams only (serve-fleet, serve). Leave it at 1 "
                          "here")


def frame_feature_kwargs(config: RunConfig) -> dict:
    """The keywords of a frame-eating detector's frames (``models.backbones.frame_extractor``): ``LogMelFrames``'s,
    or with ``embed.backbone`` a checkpoint, ``EmbedConfig``'s (the backbone's frames before pooling). A
    ``min_seconds`` too short for one window of the detector's frames is a config error up front (otherwise the
    shortest clips would stop training or scoring instead of being rejected by pre-processing)."""
    fr, sr = config.frames, config.preprocess.sample_rate
    context = REGISTRY.frames_needed(config)
    if config.embed.backbone != "logmel":
        if REGISTRY.needs_log_mel(config):
            raise ConfigError(f"detector {config.detector} pools the rhythm of log-mel bands (onsets of their levels "
                              f"in dB), which {config.embed.backbone}'s frames do not have: use it with the logmel "
                              f"backbone, or another pooling")
        need = backbone_frames_seconds(config.embed.backbone, context)
        if need and config.preprocess.min_seconds < need:
            raise ConfigError(f"preprocess.min_seconds={config.preprocess.min_seconds}: the detector stacks {context} "
                              f"frames of {config.embed.backbone}, so clips must be at least {need:.3f} s; raise "
                              f"min_seconds")
        return frame_settings(config)
    shortest = int(config.preprocess.min_seconds * sr)
    if 1 + shortest // fr.hop_length < context:
        raise ConfigError(f"preprocess.min_seconds={config.preprocess.min_seconds}: the detector stacks {context} "
                          f"frames of hop {fr.hop_length}, so clips must be at least "
                          f"{frames_needed_seconds(context, fr.hop_length, sr):.3f} s; raise min_seconds")
    return frame_settings(config)


def backbone_frames_seconds(backbone: str, frames: int) -> float | None:
    """The shortest clip (s) that gives a backbone ``frames`` frames, known without loading it where the file says
    it: a BEATs checkpoint's frame is a patch of 16 Kaldi fbank frames (25 ms, 10 ms apart; every official
    release). None where it is not known up front."""
    if not Path(backbone).expanduser().is_file():
        return None
    return (400 + 160 * (16 * frames - 1)) / 16_000


def shared(embedder: Embedder, cache: dict | None, key: tuple) -> Embedder:
    """``embedder`` that answers from ``cache`` (per ``key``, clip by clip) and embeds only the clips it has not
    seen (a run that also takes the noise-only supplemental clips embeds just those)."""
    if cache is None:
        return embedder

    def cached(records):
        store = cache.setdefault(key, {})  # path -> (feature, record, flags), or the clip's Reject
        missing = [r for r in records if r.path not in store]
        if missing:
            features, kept, rejects, flags = embedder(missing)
            for i, (r, f) in enumerate(zip(kept, flags)):
                store[r.path] = (features[i], r, f)
            for x in rejects:
                x = Reject.of(x)
                store[x.path] = x
        advance(len(records) - len(missing))
        got = [store[r.path] for r in records]
        rows = [g for g in got if not isinstance(g, Reject)]
        rejects = [g for g in got if isinstance(g, Reject)]
        features = [g[0] for g in rows]
        if key[0] == "clip":
            features = np.stack(features) if features else np.zeros((0, 0), np.float32)
        return features, [g[1] for g in rows], rejects, [g[2] for g in rows]

    return cached


def reference_run(roots: Sequence[str | Path], config: RunConfig, out_dir: str | Path | None = None,
                  machines: Iterable[str] | None = None, feature_cache: dict | None = None,
                  fits: dict | None = None) -> RunReport:
    """Single-process run over a corpus: the oracle for the Ray pipeline. With ``feature_cache`` (a dict
    kept by the caller), runs of several detectors over the same clips embed them once; with ``fits``, detectors
    that share a fit fit it once (``detect``)."""
    if detector_features(config) == "clip":
        from asd_ray.models.backbones import load_backbone

        backbone = load_backbone(**dataclasses.asdict(config.embed))
    else:
        from asd_ray.models.backbones import frame_extractor

        backbone = frame_extractor(**frame_feature_kwargs(config))

    def embedder(records):
        return embed_records(records, backbone, config.preprocess, config.embed.batch_size)

    return run_detection(roots, config, shared(embedder, feature_cache, features_key(config)), out_dir, machines,
                         fits=fits)
