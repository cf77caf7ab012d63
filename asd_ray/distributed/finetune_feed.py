"""The data feed of fine-tuning (``asd_ray.distributed.finetune``): which clips a run trains on, and one Ray Data
dataset per Train worker of their augmented crops, the same rows in the same order in every run of one seed.

``rank_rows`` fixes in the driver which clips each rank reads, epoch after epoch; ``training_datasets`` makes of each
rank's rows a dataset ``train_<rank>`` that Ray Data pre-processes and augments in its own tasks, each row drawing
from a generator of (seed, epoch, clip) (``augment_batch``); ``data_config`` gives each worker its own dataset,
unsplit and in order, executed only by the worker that reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from asd_ray.config import FinetuneConfig, PreprocessConfig
from asd_ray.data.audio import try_preprocess
from asd_ray.data.layout import ClipRecord
from asd_ray.distributed.batches import batch_waveforms, limit_threads
from asd_ray.distributed.pipeline import preprocessed, task_memory
from asd_ray.models.finetune import augment, crop_or_tile, row_generator


AUGMENT_KEYS = ("noise_prob", "snr_low", "snr_high", "stretch_prob", "stretch_low", "stretch_high")


def augmentation(finetune: FinetuneConfig) -> dict[str, float]:
    """The config's augmentation settings as ``models.finetune.augment`` keywords."""
    return {k: getattr(finetune, k) for k in AUGMENT_KEYS}


@functools.lru_cache(maxsize=64)
def _noise_clip(path: str, preprocess: tuple) -> np.ndarray | None:
    clip, _ = try_preprocess(path, **dict(preprocess))
    return None if clip is None else clip.waveform


def augment_batch(batch: dict[str, np.ndarray], *, noise_paths: Sequence[str], preprocess: dict,
                  samples: int, seed: int, **augmentation: float) -> dict[str, np.ndarray]:
    """Ray Data map after ``preprocess_batch``: -> {"waveform": B x samples float32}, augmented crops.

    Each row's draws come from ``row_generator(seed, epoch, index)`` of its own ``epoch`` and ``index`` columns, so
    a crop is the same in every run and every task. Noise comes from the corpus's noise-only clips when it has some,
    else from the next clip of the batch (``training_datasets`` makes a batch the same rows in every run). A row
    whose pre-processing fails now, though it passed the check before the run (the file changed), is an error
    naming it: dropping it would shift every later batch.
    """
    limit_threads()
    for path, err in zip(batch["path"], batch["error"]):
        if err:
            raise RuntimeError(f"{path}: pre-processing failed during fine-tuning, though it passed the check "
                               f"before the run (was the file changed?): {err}")
    waves = batch_waveforms(batch)
    # Augment a window just long enough for the slowest stretch, not the whole clip: the same crops, less work.
    window = int(math.ceil(samples * max(1.0, augmentation.get("stretch_high", 1.0)))) + 1
    out = []
    for j, (w, epoch, index) in enumerate(zip(waves, batch["epoch"], batch["index"])):
        rng = row_generator(seed, int(epoch), int(index))
        if noise_paths:
            noise = _noise_clip(str(noise_paths[rng.integers(len(noise_paths))]), tuple(sorted(preprocess.items())))
        else:
            noise = waves[(j + 1) % len(waves)] if len(waves) > 1 else None
        w = crop_or_tile(w, window, rng) if len(w) > window else w
        out.append(crop_or_tile(augment(w, rng, noise, **augmentation), samples, rng))
    return {"waveform": np.stack(out) if out else np.zeros((0, samples), np.float32)}


def plan_finetune(records: Sequence[ClipRecord]) -> tuple[list[ClipRecord], list[str], list[dict]]:
    """What fine-tuning takes of a corpus: (normal train clips, paths of noise-only supplemental clips for the
    augmentation, every other entry with the reason it is not used: nothing found on disk goes unlisted)."""
    train, noise, unused = [], [], []
    for r in records:
        if r.is_normal_train:
            train.append(r)
        elif r.kind == "noise" and not r.parse_error:
            noise.append(r.path)
        else:
            reason = (r.parse_error or ("test clip: fine-tuning learns from normal train clips" if r.split == "test"
                                        else "supplemental clip: not a train clip" if r.split == "supplemental"
                                        else "train clip not known to be normal"))
            unused.append({"path": r.path, "machine": r.machine, "reason": reason})
    return train, noise, unused


def check_clips(records: Sequence[ClipRecord], preprocess: PreprocessConfig) -> tuple[list[ClipRecord], list[dict]]:
    """One Ray Data pass that pre-processes every clip: (usable records, rejects with their reason)."""
    got = (preprocessed([{"path": r.path} for r in records], preprocess, batch_size=16, num_cpus=0.5)
           .select_columns(["path", "error"]).take_all())
    reasons = {row["path"]: row["error"] for row in got}
    ok = [r for r in records if not reasons[r.path]]
    rejects = [{"path": r.path, "machine": r.machine, "reason": reasons[r.path]} for r in records if reasons[r.path]]
    return ok, rejects


def rank_rows(clips: int, workers: int, steps_per_epoch: int, batch_size: int, epochs: int,
              seed: int) -> list[list[dict]]:
    """Which clips each rank trains on, in order, over the whole run: per rank, ``epochs x steps_per_epoch x
    batch_size`` rows {"index": clip index, "epoch"}. Each epoch draws a permutation of the ``clips`` from (seed,
    epoch) and gives rank r its r-th run of ``steps_per_epoch x batch_size`` clips (the rest wait for another
    epoch). A function of its arguments alone: the same rows go to the same rank in every run."""
    per_epoch = steps_per_epoch * batch_size
    out: list[list[dict]] = [[] for _ in range(workers)]
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(clips)
        for rank in range(workers):
            out[rank].extend({"index": int(i), "epoch": epoch} for i in order[rank * per_epoch:(rank + 1) * per_epoch])
    return out


def training_datasets(records: Sequence[ClipRecord], noise_paths: Sequence[str], preprocess: PreprocessConfig,
                      finetune: FinetuneConfig, steps_per_epoch: int) -> dict:
    """One Ray Data dataset per rank, ``train_<rank>``, of its augmented training crops over the whole run
    (``rank_rows``), in order: {"waveform": crop_seconds x sample_rate float32}. Trained with ``DataConfig(
    datasets_to_split=[])`` and ``preserve_order``, each is executed only by the worker that reads it, and gives it
    the same batches in every run: a run resumed at step s reads its rows again and trains from batch s on.

    Pre-processing and augmentation run fused in tasks of ``feed_cpus`` each: with half a CPU per task, two
    feed processes would share the one core a 2-core machine has beside its worker, and the worker's steps
    would lose a third of their CPU to them (a tiny model's Ray Train rate fell to 0.72 of a plain loop).
    One input block per batch, so that a batch is the same clips whatever the cluster's size (the noise of a
    corpus without noise clips is the next clip of the batch)."""
    pre = dataclasses.asdict(preprocess)
    aug = augmentation(finetune)
    samples = int(round(finetune.crop_seconds * preprocess.sample_rate))
    ranks = rank_rows(len(records), finetune.workers, steps_per_epoch, finetune.batch_size, finetune.epochs,
                      finetune.seed)
    return {f"train_{rank}": (
        preprocessed([{"path": records[r["index"]].path, **r} for r in rows], preprocess,
                     batch_size=finetune.batch_size, num_cpus=finetune.feed_cpus,
                     blocks=len(rows) // finetune.batch_size)
        .map_batches(augment_batch, fn_kwargs={"noise_paths": list(noise_paths), "preprocess": pre,
                                               "samples": samples, "seed": finetune.seed, **aug},
                     batch_size=finetune.batch_size, num_cpus=finetune.feed_cpus,
                     memory=task_memory(finetune.batch_size, preprocess)))  # as pre-processing's: fused with it
        for rank, rows in enumerate(ranks)}


def data_config():
    """Ray Train's ingest of ``training_datasets``: no dataset split (each rank reads its own, ``train_<rank>``),
    blocks in order (``preserve_order``), the driver's other execution options kept (copied, not rebuilt: Ray 2.60's
    ``default_ingest_options`` passes the deprecated ``exclude_resources`` and warns)."""
    import copy

    import ray.train
    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)
