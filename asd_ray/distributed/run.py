"""The main job on Ray: the reference run's flow with the Ray Data embedding pipeline as its embedder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from asd_ray.config import RunConfig
from asd_ray.detect import Embedder, RunReport, run_detection
from asd_ray.distributed.embed import EmbeddingTable, embed_corpus
from asd_ray.distributed.session import ensure_ray, gpu_wanted


def embed_table(records, config: RunConfig) -> EmbeddingTable:
    """The Ray Data pipeline over ``records`` with ``config``'s embedding, pre-processing and Ray knobs
    (read back from the Parquet cache when it holds them already)."""
    return embed_corpus(records, embed=config.embed, preprocess=config.preprocess, cache_dir=config.ray.cache_dir,
                        num_actors=config.ray.embed_actors, actor_cpus=config.ray.actor_cpus,
                        use_gpu=gpu_wanted(config.ray.use_gpu, config.embed.device))


def ray_embedder(config: RunConfig) -> Embedder:
    def embedder(records):
        table = embed_table(records, config)
        return table.embeddings, table.records, table.rejects, table.flags

    return embedder


def ray_run(roots: Sequence[str | Path], config: RunConfig, out_dir: str | Path | None = None,
            machines: Iterable[str] | None = None) -> RunReport:
    """Embed the corpus with Ray Data (cached Parquet), then build banks, score, decide, evaluate, write.

    Joins the Ray at ``RAY_ADDRESS`` or the running session, else starts a local one.
    """
    ensure_ray(num_cpus=config.ray.num_cpus or None)
    return run_detection(roots, config, ray_embedder(config), out_dir, machines)
