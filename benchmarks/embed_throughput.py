"""P1 and P2 (run by hand, not in CI).

P2: pre-processing (decode, loudness, trim) clips/s on one core, 10 s 16 kHz clips.
P1: embedding clips/s of the whole pipeline (Ray Data read + pre-process tasks, the embedding actors, Parquet)
    vs. the raw backbone on already-decoded waveforms, same device, same run. The embedding actors are started
    once (``pool_start_s``: imports, checkpoint, first forward pass) and serve every call, as in a run, which
    starts them while Ray Data plans and pre-processes.

    python benchmarks/embed_throughput.py --clips 256 --backbone logmel --device cpu
    python benchmarks/embed_throughput.py --clips 2048 --backbone hubert-base-random --device cuda --batch-size 128

``hubert-base-random`` is a randomly initialised HuBERT-Base (95 M parameters, same compute as the
real one) saved with save_pretrained, for machines that cannot download weights; ``beats-iter3-random`` and
``eat-base-random`` are the official BEATs_iter3 and EAT-base architectures with seeded random weights, written in
their official checkpoint formats (neither imports transformers).

    python benchmarks/embed_throughput.py --clips 64 --backbone beats-iter3-random --device cpu --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _corpus(n: int, seconds: float, where: Path) -> Path:
    from asd_ray.data.synth import generate_corpus

    per_cell = max(1, n // 4)
    return generate_corpus(where, dev_machines=("fan",), eval_machines=(), train_source=0, train_target=0,
                           test_per_cell=per_cell, supplemental=0, seconds=seconds, workers=os.cpu_count() or 1)


def _hubert_base(where: Path) -> str:
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    HubertModel(HubertConfig(layerdrop=0.0)).save_pretrained(where)
    return str(where)


def random_checkpoint(name: str, where: Path) -> str:
    """``beats-iter3-random`` / ``eat-base-random``: the official architecture with the fixture scripts' seeded
    weights (``make_beats_fixtures.ITER3``, ``make_eat_fixtures.BASE``), in the official format, under ``where``."""
    if name == "beats-iter3-random":
        from make_beats_fixtures import ITER3, SEEDS

        from asd_ray.models import beats

        return str(beats.write_random_checkpoint(where / "beats_iter3.pt", ITER3, seed=SEEDS["iter3"]))
    from make_eat_fixtures import BASE, SEEDS

    from asd_ray.models import eat

    return str(eat.write_random_checkpoint(where / "eat_base.pt", **BASE, seed=SEEDS["base"]))


def steady_rate(records, embed, pool, args) -> float:
    """Clips/s of the same pipeline once it streams: from the first embedded batch to the last, as the driver
    receives them (the pipeline's start and first batch are left out)."""
    from asd_ray.config import PreprocessConfig
    from asd_ray.distributed.pipeline import embedded_tables

    tables = embedded_tables([r.to_row() for r in records], embed=embed, preprocess=PreprocessConfig(), pool=pool,
                             use_gpu=args.device == "cuda")
    stamps, rows = [], []
    for table in tables:
        stamps.append(time.perf_counter())
        rows.append(table.num_rows)
    return (sum(rows) - rows[0]) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--backbone", default="logmel", help="logmel, hubert-base-random, beats-iter3-random, "
                    "eat-base-random, or a checkpoint path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--actor-cpus", type=float, default=0.5)
    ap.add_argument("--skip-p1", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from asd_ray.config import EmbedConfig, PreprocessConfig
    from asd_ray.data.audio import preprocess_clip
    from asd_ray.data.layout import discover
    from asd_ray.models.backbones import load_backbone

    work = Path(tempfile.mkdtemp(prefix="asd-bench-"))
    records = [r for r in discover([_corpus(args.clips, args.seconds, work / "data")]) if r.split == "test"]
    result = {"clips": len(records), "seconds_per_clip": args.seconds, "cpu_count": os.cpu_count()}

    t = time.perf_counter()
    waves = [preprocess_clip(r.path).waveform for r in records]
    dt = time.perf_counter() - t
    result["p2_preprocess_clips_per_s_one_core"] = len(records) / dt

    if not args.skip_p1:
        import ray
        import torch

        from asd_ray.distributed.embed import embed_corpus
        from asd_ray.distributed.embed_pool import EmbeddingPool
        from asd_ray.distributed.pipeline import needs_actors

        backbone = args.backbone
        if backbone == "hubert-base-random":
            backbone = _hubert_base(work / "hubert")
        elif backbone in ("beats-iter3-random", "eat-base-random"):
            backbone = random_checkpoint(backbone, work)
        embed = EmbedConfig(backbone=backbone, device=args.device, batch_size=args.batch_size)
        model = load_backbone(backbone=backbone, device=args.device)
        model.embed(waves[: args.batch_size])  # warm-up
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(waves), args.batch_size):
            model.embed(waves[i:i + args.batch_size])
        if args.device == "cuda":
            torch.cuda.synchronize()
        raw = len(waves) / (time.perf_counter() - t)
        del model
        ray.init(include_dashboard=False)
        use_gpu = args.device == "cuda"
        t = time.perf_counter()
        pool = None  # the weight-free logmel backbone embeds inside the pre-processing tasks
        if needs_actors(embed):
            pool = EmbeddingPool(embed, use_gpu=use_gpu, num_actors=args.actors, actor_cpus=args.actor_cpus)
            pool.ready()
        pool_start = time.perf_counter() - t
        # the pipeline's own first-call costs out of the measurement: a tiny run, then a fresh cache for the real one
        embed_corpus(records[:4], embed=embed, preprocess=PreprocessConfig(), cache_dir=work / "warm", pool=pool,
                     use_gpu=use_gpu)
        t = time.perf_counter()
        embed_corpus(records, embed=embed, preprocess=PreprocessConfig(), cache_dir=work / "cache", pool=pool,
                     use_gpu=use_gpu)
        pipe = len(records) / (time.perf_counter() - t)
        steady = steady_rate(records, embed, pool, args)
        if pool:
            pool.close()
        ray.shutdown()
        result.update({"backbone": args.backbone, "device": args.device, "batch_size": args.batch_size,
                       "p1_raw_model_clips_per_s": raw, "p1_pipeline_clips_per_s": pipe,
                       "p1_ratio": pipe / raw, "pool_start_s": pool_start, "p1_steady_clips_per_s": steady, "p1_steady_ratio": steady / raw,
                       "torch_threads": torch.get_num_threads()})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
