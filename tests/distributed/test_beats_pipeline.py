"""A BEATs (and an EAT) checkpoint file through the Ray Data pipeline: mixed-length batches embed as clips alone, and
a knn run on Ray equals the single-process reference run."""

import dataclasses

import numpy as np
import pytest

from asd_ray.config import RunConfig, load_config
from asd_ray.data.layout import discover
from asd_ray.detect import plan_records, reference_run
from asd_ray.distributed.embed import embed_corpus
from asd_ray.distributed.run import ray_run
from test_cache import _counting_pipeline


@pytest.mark.parametrize("family", ["beats", "eat"])
def test_beats_and_eat_pipelines_embed_mixed_length_batches_as_clip_by_clip(ray_local, request, tmp_path, family):
    tiny_beats = request.getfixturevalue(f"tiny_{family}")
    import soundfile as sf

    from asd_ray.data.audio import preprocess_clip
    from asd_ray.models.backbones import load_backbone

    test = tmp_path / "data" / "dev_data" / "raw" / "fan" / "test"
    test.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i, seconds in enumerate((1.0, 2.3, 1.7, 3.1, 11.2)):  # EAT pads to 10.24 s: one clip past it
        sf.write(test / f"section_00_source_test_normal_{i:04d}_a_1.wav",
                 0.1 * rng.standard_normal(int(seconds * 16_000)), 16_000, subtype="FLOAT")
    records, _ = plan_records(discover([tmp_path / "data"]))
    config = load_config(RunConfig, None, [f"embed.backbone={tiny_beats}", "embed.batch_size=4", "embed.device=cpu"])
    table = embed_corpus(records, embed=config.embed, preprocess=config.preprocess, cache_dir=tmp_path / "c")
    backbone = load_backbone(str(tiny_beats), device="cpu")
    assert len(table.records) == 5 and not table.rejects
    for rec, got in zip(table.records, table.embeddings):
        alone = backbone.embed([preprocess_clip(rec.path).waveform])[0]
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)


def test_knn_over_beats_on_ray_equals_the_reference_run(ray_local, tiny_corpus, tiny_beats, tmp_path):
    config = load_config(RunConfig, None, [f"ray.cache_dir={tmp_path / 'cache'}", "detector=knn",
                                           f"embed.backbone={tiny_beats}"])
    ref = reference_run([tiny_corpus], config, tmp_path / "ref", ["valve"])
    got = ray_run([tiny_corpus], config, tmp_path / "ray", ["valve"])
    assert set(got.results) == set(ref.results) == {"valve"}
    np.testing.assert_allclose(got.results["valve"].raw_scores, ref.results["valve"].raw_scores, rtol=1e-5)
    assert 0 <= got.metrics["official_score"] <= 1


def test_fusion_over_beats_frames_on_ray_equals_the_reference_run_and_is_cached(ray_local, tiny_corpus, tiny_beats,
                                                                                  tmp_path, monkeypatch):
    """The default detector over a BEATs file's frames: computed in the Ray Data tasks (the model loaded once per
    worker), scored as the single-process run scores, cached under a key of the checkpoint's contents."""
    config = load_config(RunConfig, None, [f"ray.cache_dir={tmp_path / 'cache'}", "detector=fusion",
                                           f"embed.backbone={tiny_beats}", "embed.device=cpu"])
    ref = reference_run([tiny_corpus], config, tmp_path / "ref", ["valve"])
    started = _counting_pipeline(monkeypatch)
    got = ray_run([tiny_corpus], config, tmp_path / "ray", ["valve"])
    np.testing.assert_allclose(got.results["valve"].raw_scores, ref.results["valve"].raw_scores, rtol=1e-5)
    assert got.metrics["official_score"] == ref.metrics["official_score"]
    again = ray_run([tiny_corpus], config, tmp_path / "again", ["valve"])
    assert len(started) == 1  # the second run computed no frame: it read them from the cache
    np.testing.assert_array_equal(again.results["valve"].raw_scores, got.results["valve"].raw_scores)


def test_the_embedding_cache_key_follows_a_beats_checkpoint_files_contents(tiny_beats, tmp_path):
    """A BEATs backbone is one file: another checkpoint written to the same path must not reuse its embeddings."""
    import os

    import torch

    from asd_ray.distributed.cache import cache_key
    from asd_ray.models.beats import write_random_checkpoint

    path = tmp_path / "beats.pt"
    path.write_bytes(tiny_beats.read_bytes())
    config = load_config(RunConfig, None, [f"embed.backbone={path}"])
    first = cache_key([], config.embed, config.preprocess)
    write_random_checkpoint(path, torch.load(tiny_beats, weights_only=True)["cfg"], seed=99)  # other weights
    os.utime(path, ns=(1, 1))  # a file system's coarse clock must not hide the change
    assert cache_key([], config.embed, config.preprocess) != first
    frames = {k: v for k, v in dataclasses.asdict(config.embed).items() if k not in ("batch_size", "pooling")}
    before = cache_key([], frames, config.preprocess)  # a backbone's frames: the same for its file's contents
    write_random_checkpoint(path, torch.load(tiny_beats, weights_only=True)["cfg"], seed=98)
    os.utime(path, ns=(2, 2))
    assert cache_key([], frames, config.preprocess) != before
    assert cache_key([], {**frames, "device": "cuda"}, config.preprocess) == cache_key([], frames, config.preprocess)
