"""Embedding a corpus, cached: clip embeddings (``embed_corpus``) and log-mel frame matrices (``frames_corpus``)
through the Ray Data pipeline (``pipeline``; its actors: ``embed_pool``), the result in Parquet.

The Parquet folder is keyed by the content that decides the features (``asd_ray.distributed.cache``): a second
run over the same corpus with the same backbone, or the same log-mel settings, reads it back instead of
embedding again, which is what sweeps over k, distance or post-processing rely on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from asd_ray.config import EmbedConfig, PreprocessConfig
from asd_ray.data.layout import ClipRecord
from asd_ray.distributed.batches import frames_batch
from asd_ray.distributed.cache import (IDENTITY_COLUMNS, CacheWriter, cache_folder, clip_identities, read_cached,
                                       repeated_clips, table_parts)
from asd_ray.distributed.embed_pool import EmbeddingPool
from asd_ray.distributed.pipeline import TASK_BATCHES, embedded_tables, needs_actors, preprocessed
from asd_ray.distributed.session import gpu_wanted
from asd_ray.progress import advance

log = logging.getLogger(__name__)


@dataclass
class EmbeddingTable:
    """Features of the usable clips (rows match ``records``): an (n x dim) float32 array of clip embeddings, or
    n (T_i x n_mels) log-mel matrices; rejects with reasons, pre-processing flags."""

    embeddings: Any
    records: list[ClipRecord]
    rejects: list[dict]
    flags: list[list[str]]
    path: Path
    from_cache: bool


def _rows(records: Sequence[ClipRecord], identities: Mapping[str, tuple[int, int]], caller: str,
          fields: bool = True) -> list[dict]:
    """The pipeline's input rows, similar lengths together (file size stands in for length: a padded batch wastes
    little on padding). Each row carries its file's size and mtime as the key saw them: a cache read back is
    checked against them."""
    rows = sorted(({**(r.to_row() if fields else {"path": r.path}), **dict(zip(IDENTITY_COLUMNS, identities[r.path]))}
                   for r in records), key=lambda r: (r["size"], r["path"]))
    if not rows:
        raise ValueError(f"{caller}: no clips to embed")
    return rows


def embed_corpus(records: Sequence[ClipRecord], *, embed: EmbedConfig, preprocess: PreprocessConfig,
                 cache_dir: str | Path, num_actors: int = 1, actor_cpus: float = 0.5,
                 use_gpu: bool | None = None, preprocess_cpus: float = 0.0,
                 pool: EmbeddingPool | None = None) -> EmbeddingTable:
    """Pre-process and embed ``records`` with Ray Data on the connected Ray cluster.

    CPU tasks of ``preprocess_cpus`` each (0: half a CPU beside CPU embedding actors, one otherwise) decode and
    pre-process; the actors of ``pool`` embed whole padded batches (without a pool, ``num_actors`` actors are
    started for this call and ended after it: ``num_gpus=1`` each when ``use_gpu``, else ``actor_cpus`` CPUs so
    that the tasks keep running); the result lands as Parquet under ``cache_dir/<content key>`` and is reused
    by the next call with the same key when it checks out against the clips (``asd_ray.distributed.cache``).
    """
    identities, repeats = clip_identities(records), repeated_clips(records)
    out = cache_folder(records, embed, preprocess, cache_dir, identities)
    cached = read_cached(out, identities, repeats)
    if cached is not None:
        log.info("embeddings cached at %s: not embedding again", out)
        advance(len(records))
        return EmbeddingTable(*table_parts(cached), path=out, from_cache=True)
    if use_gpu is None:
        use_gpu = gpu_wanted("auto", embed.device)
    rows = _rows(records, identities, "embed_corpus")
    if pool is not None and needs_actors(embed) and not pool.serves(embed):
        # its actors would embed with another backbone or settings, under this config's cache key
        raise ValueError(f"embed_corpus: the embedding pool was started for {pool.config}, not for {embed}")
    own = pool is None and needs_actors(embed)
    if own:
        pool = EmbeddingPool(embed, use_gpu=use_gpu, num_actors=num_actors, actor_cpus=actor_cpus)
    writer = CacheWriter(out)
    try:
        tables = embedded_tables(rows, embed=embed, preprocess=preprocess, pool=pool, use_gpu=use_gpu,
                                 preprocess_cpus=preprocess_cpus)
        # Written here, block by block as they arrive (embeddings are small): the driver sees the progress.
        for i, block in enumerate(tables):
            writer.write(i, block)
            advance(block.num_rows)
    except BaseException:
        writer.discard()
        raise
    finally:
        if own:
            pool.close()
    columns = writer.publish({"clips": len(rows), "backbone": embed.backbone}, identities, repeats)
    return EmbeddingTable(*table_parts(columns), path=out, from_cache=False)


def frame_parts(columns: Mapping[str, list], records: Sequence[ClipRecord]
                ) -> tuple[list[np.ndarray], list[ClipRecord], list[dict], list[list[str]]]:
    """A frames cache's columns -> (log-mel matrices, records, rejects, flags), rows sorted by path; each row's
    record is the one of ``records`` with its path."""
    by_path = {r.path: r for r in records}
    paths = columns["path"]
    mats, kept, rejects, flags = [], [], [], []
    for i in sorted(range(len(paths)), key=lambda i: paths[i]):
        rec = by_path[paths[i]]
        if columns["error"][i]:
            rejects.append({"path": rec.path, "machine": rec.machine, "reason": columns["error"][i]})
            continue
        n = int(columns["frames"][i])
        mats.append(np.asarray(columns["logmel"][i], dtype=np.float32).reshape(n, -1 if n else 0))
        kept.append(rec)
        flags.append([f for f in columns["flags"][i].split(";") if f])
    return mats, kept, rejects, flags


def frames_corpus(records: Sequence[ClipRecord], *, features: Mapping[str, object], preprocess: PreprocessConfig,
                  cache_dir: str | Path, batch_size: int, num_cpus: float) -> EmbeddingTable:
    """Pre-process ``records`` and compute their log-mel matrices (``LogMelFrames(**features)``) in Ray Data
    tasks of ``num_cpus`` each, ``batch_size`` clips per task, on the connected Ray cluster; cached as
    ``embed_corpus`` caches clip embeddings (Parquet under ``cache_dir/<content key>``: the clips' files and the
    log-mel and pre-processing settings), read back by the next call with the same key when it checks out."""
    identities, repeats = clip_identities(records), repeated_clips(records)
    out = cache_folder(records, features, preprocess, cache_dir, identities)
    cached = read_cached(out, identities, repeats, feature="logmel")
    if cached is not None:
        log.info("log-mel frames cached at %s: not computing them again", out)
        advance(len(records))
        return EmbeddingTable(*frame_parts(cached, records), path=out, from_cache=True)
    rows = _rows(records, identities, "frames_corpus", fields=False)
    writer = CacheWriter(out)
    try:
        ds = preprocessed(rows, preprocess, batch_size=batch_size, num_cpus=num_cpus,
                          then=[(frames_batch, dict(features))], task_batches=TASK_BATCHES)
        for i, block in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            writer.write(i, block)  # whole blocks: the matrices of a block are one Arrow buffer
            advance(block.num_rows)
    except BaseException:
        writer.discard()
        raise
    columns = writer.publish({"clips": len(rows), "features": "logmel-frames", **dict(features)}, identities,
                             repeats, feature="logmel")
    log.info("log-mel frames of %d clips computed, cached at %s", len(rows), out)
    return EmbeddingTable(*frame_parts(columns, records), path=out, from_cache=False)
