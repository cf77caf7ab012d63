"""What a worker does to one batch of clips: pre-process it, then embed it with the one embedder factory
(``batch_embedder``: clip embeddings of a backbone, or log-mel frame matrices).

Every site that embeds uses these: Ray Data's pre-processing tasks (``preprocess_batch``, ``embed_in_task``,
``frames_batch``), the pipeline's embedding actors and the fleet's (``embed_pool``). A worker imports a task
function's module to unpickle it, so this one stays light (no Ray Data, detectors, report or scikit-learn).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Sequence

import numpy as np

from asd_ray.config import EmbedConfig
from asd_ray.data.audio import pad_waveforms, try_preprocess
from asd_ray.distributed.cache import matrix_column

FEATURE_KINDS = ("clip", "frames")  # clip embeddings of a backbone; log-mel frame matrices


def limit_threads() -> None:
    """One torch/BLAS thread in this worker process: a Ray task holds a share of one CPU, and a thread pool
    per library per process would oversubscribe the cores that the other tasks are using. Called per batch: it
    limits the native libraries again only when modules were imported since its last call (the only way a new
    library comes in), for finding them costs milliseconds (2.4 % of a pre-processing task when done every batch)."""
    global _modules_limited
    if len(sys.modules) != _modules_limited:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        _modules_limited = len(sys.modules)
    torch = sys.modules.get("torch")  # not imported for this: a worker that never resamples never needs it
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


_modules_limited = -1  # len(sys.modules) when limit_threads last limited the native libraries


def object_array(items: Sequence) -> np.ndarray:
    """A 1-D object array of ``items`` (per-row arrays of different lengths in a Ray Data batch; sound files'
    bytes, which ``np.array`` would make a fixed-width byte string column)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = list(items)
    return arr


def preprocess_batch(batch: dict[str, np.ndarray], **preprocess: object) -> dict[str, np.ndarray]:
    """Ray Data map: record columns -> the same columns plus ``samples`` (B x T float32, each clip
    zero-padded to the batch's longest: a fixed-shape tensor column, not pickled objects), ``length``
    (B valid sample counts, 0 for a rejected clip), ``flags`` and ``error`` (the ClipError reason, empty
    when the clip is usable)."""
    limit_threads()
    waves, flags, errors = [], [], []
    for path in batch["path"]:  # a path, or (fleet requests over HTTP) a sound file's bytes
        clip, reason = try_preprocess(path if isinstance(path, bytes) else str(path), **preprocess)
        waves.append(clip.waveform if clip else np.zeros(0, dtype=np.float32))
        flags.append(";".join(clip.flags) if clip else "")
        errors.append(reason)
    out = dict(batch)
    out["samples"], out["length"] = pad_waveforms(waves)
    out["flags"] = np.array(flags, dtype=object)
    out["error"] = np.array(errors, dtype=object)
    return out


def padded_samples(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A batch after ``preprocess_batch`` -> (B x T float32 zero-padded samples, B lengths). Ray Data hands
    over one 2-D array, or an object array of rows when blocks padded to different widths were joined."""
    samples, lengths = batch["samples"], np.asarray(batch["length"], dtype=np.int64)
    if samples.dtype == object or samples.ndim != 2:
        return pad_waveforms([np.asarray(row, dtype=np.float32)[:n] for row, n in zip(samples, lengths)])
    return samples, lengths


def batch_waveforms(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A batch after ``preprocess_batch`` -> each row's waveform (a view without the padding)."""
    samples, lengths = padded_samples(batch)
    return [row[:n] for row, n in zip(samples, lengths)]


def joined(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches after ``preprocess_batch`` (padded to different widths) -> one batch padded to its longest clip."""
    if len(batches) == 1:
        return batches[0]
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0] if k not in ("samples", "length")}
    out["samples"], out["length"] = pad_waveforms([w for b in batches for w in batch_waveforms(b)])
    return out


def actor_embed_kwargs(embed: EmbedConfig, use_gpu: bool) -> dict:
    """``EmbedConfig`` as keyword arguments for an embedder: "auto" becomes "cpu" where there is no GPU for it
    (Ray hides the node's GPUs from an actor without one, but torch could still see them)."""
    kwargs = dataclasses.asdict(embed)
    if not use_gpu and kwargs["device"] == "auto":
        kwargs["device"] = "cpu"
    return kwargs


def _usable(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([e == "" for e in batch["error"]], dtype=bool)


class EmbedBatch:
    """Clip embeddings: loads the backbone once, maps a batch of padded waveforms to embeddings (a Ray Data
    callable class). Keywords: ``EmbedConfig``'s.

    Thread-safe: with two calls at once per actor, one batch's host work (block to array, copy to pinned
    memory) overlaps the other's forward pass on the GPU."""

    def __init__(self, **embed: object):
        import torch

        from asd_ray.models.backbones import load_backbone

        torch.set_num_threads(max(1, int(os.environ.get("ASD_RAY_TORCH_THREADS", "1"))))
        self.backbone = load_backbone(**embed)

    def features(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """A batch after ``preprocess_batch`` -> (B x dim) float32 embeddings, zeros for rejected clips."""
        samples, lengths = padded_samples(batch)
        ok = _usable(batch) & (lengths > 0)
        emb = np.zeros((len(ok), self.backbone.dim), dtype=np.float32)
        if ok.all():
            emb[:] = self.backbone.embed_padded(samples, lengths)
        elif ok.any():
            emb[ok] = self.backbone.embed_padded(samples[ok], lengths[ok])
        return emb

    def warm(self) -> None:
        """One small forward pass: the first one sets up the device's kernels and libraries (2.3 s for
        HuBERT-Base on an H100)."""
        noise = 0.01 * np.random.default_rng(0).standard_normal((2, 16_000)).astype(np.float32)
        self.backbone.embed_padded(noise, np.array([16_000, 12_000]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k not in ("samples", "length")}
        out["embedding"] = self.features(batch)
        return out


class FrameBatch:
    """Frame matrices of the detectors that eat frames: log-mel (keywords: ``FramesConfig``'s + sample_rate) or a
    backbone's frames (``EmbedConfig``'s; ``models.backbones.frame_extractor``)."""

    def __init__(self, **features: object):
        from asd_ray.models.backbones import frame_extractor

        if "backbone" in features:  # a model's forward passes: as many torch threads as EmbedBatch's
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("ASD_RAY_TORCH_THREADS", "1"))))
        self.extractor = frame_extractor(**features)

    def features(self, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        """A batch after ``preprocess_batch`` -> B (T_i x n_mels) float32 matrices, (0 x 0) for rejected clips."""
        return [self.extractor.embed([w])[0] if not e else np.zeros((0, 0), np.float32)
                for w, e in zip(batch_waveforms(batch), batch["error"])]

    def warm(self) -> None:
        self.extractor.embed([0.01 * np.random.default_rng(0).standard_normal(16_000).astype(np.float32)])

    def __call__(self, batch: dict[str, np.ndarray]) -> "pyarrow.Table":
        """-> an Arrow table of the batch's columns (no samples) plus ``frames`` (T_i) and ``logmel`` (each
        matrix's float32 bytes, row-major: ``cache.matrix_column``). One contiguous column: a block moves through
        the object store and into Parquet whole, not as a pickled array per row."""
        import pyarrow as pa

        mats = self.features(batch)
        columns = {k: _arrow_column(v) for k, v in batch.items() if k not in ("samples", "length")}
        columns["frames"] = pa.array(np.array([m.shape[0] for m in mats], dtype=np.int64))
        columns["logmel"] = matrix_column(mats)
        return pa.table(columns)


def _arrow_column(values: np.ndarray):
    import pyarrow as pa

    return pa.array(values.tolist() if values.dtype == object else values)


def batch_embedder(features: str, **settings: object) -> EmbedBatch | FrameBatch:
    """The one embedder factory: ``features`` "clip" (``settings``: ``EmbedConfig``'s keywords) -> ``EmbedBatch``;
    "frames" (``FramesConfig``'s + sample_rate) -> ``FrameBatch``. Each maps a batch after ``preprocess_batch``:
    ``features(batch)`` gives the features, calling it gives the batch with them (a Ray Data map)."""
    if features == "clip":
        return EmbedBatch(**settings)
    if features == "frames":
        return FrameBatch(**settings)
    raise ValueError(f"no embedder for features {features!r} (one of {FEATURE_KINDS})")


@functools.lru_cache(maxsize=4)
def _task_embedder(features: str, settings: tuple) -> EmbedBatch | FrameBatch:
    return batch_embedder(features, **dict(settings))


def embed_in_task(batch: dict[str, np.ndarray], **embed: object) -> dict[str, np.ndarray]:
    """Ray Data task map after ``preprocess_batch`` for a weight-free backbone: what ``EmbedBatch`` does, with
    the backbone built once per worker process."""
    return _task_embedder("clip", tuple(sorted(embed.items())))(batch)


def frames_batch(batch: dict[str, np.ndarray], **features: object) -> "pyarrow.Table":
    """Ray Data task map after ``preprocess_batch``: waveforms -> ``FrameBatch``'s Arrow table (``frames``,
    flattened ``logmel``), the extractor built once per worker process."""
    return _task_embedder("frames", tuple(sorted(features.items())))(batch)
