"""A clip's score does not depend on how many BLAS / OpenMP / torch threads its process has (asd_ray/threads.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from asd_ray.threads import one_thread, spread

# Fits and scores every detector kind on fixed random features, twice (faiss_threads 1 and 2), and saves the scores.
SCRIPT = r"""
import sys
import numpy as np
from asd_ray.bank.local_bank import LocalFeatureBank
from asd_ray.bank.domain_bank import DomainAwareBank
from asd_ray.bank.memory_bank import MemoryBank
from asd_ray.bank.pooling import PooledBank
from asd_ray.models.autoencoder import AEDetector

rng = np.random.default_rng(0)
clips = [rng.standard_normal((int(rng.integers(120, 260)), 64)).astype(np.float32) - 60 for _ in range(14)]
domains = ["source"] * 11 + ["target"] * 3
tests = [rng.standard_normal((int(n), 64)).astype(np.float32) - 60 for n in (30, 150, 313)]
emb = rng.standard_normal((400, 256)).astype(np.float32)
queries = rng.standard_normal((60, 256)).astype(np.float32)
out = {}
for threads in (1, 2):
    local = LocalFeatureBank(bank_size=400, pca_dim=48, whiten=True, calibration_clips=0, faiss_threads=threads)
    local.fit(clips, domains=domains)
    out[f"local{threads}"] = local.score(tests)
    out[f"local_loo{threads}"] = local.loo_scores()
    kmeans = LocalFeatureBank(bank_size=50, coreset="kmeans", pca_dim=0, domain_norm=False, faiss_threads=threads)
    out[f"kmeans{threads}"] = kmeans.fit(clips).score(tests)
    pooled = PooledBank(strategy="domain_aware", density=True, k=1, faiss_threads=threads)
    out[f"pooled{threads}"] = pooled.fit(clips, domains=domains).score(tests + clips[:3])
    out[f"pooled_loo{threads}"] = pooled.loo_scores()
    rhythm = PooledBank(pooling="rhythm", strategy="domain_aware", density=True, k=1, faiss_threads=threads)
    out[f"rhythm{threads}"] = rhythm.fit(clips, domains=domains).score(tests)  # the default fusion's third member
    out[f"rhythm_loo{threads}"] = rhythm.loo_scores()
    knn = MemoryBank(k=3, faiss_threads=threads).fit(emb)
    out[f"knn{threads}"] = knn.score(queries)
    out[f"knn_loo{threads}"] = knn.loo_scores()
    aware = DomainAwareBank(k=2, faiss_threads=threads).fit(emb, domains=["source"] * 350 + ["target"] * 50)
    out[f"aware{threads}"] = aware.score(queries)
    ae = AEDetector(score_kind="maha", epochs=2, batch_size=128).fit(clips, domains=domains)
    out[f"ae{threads}"] = np.concatenate([ae.score(tests), ae.loo_scores()])
np.savez(sys.argv[1], **out)
"""


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _scores(tmp_path: Path, threads: int) -> dict[str, np.ndarray]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    if _has_avx2():
        # OpenBLAS's Haswell kernels round a product differently with 1 and 2 threads (its SkylakeX ones did
        # not, here): the kernel a user's CPU gets, forced, so that the test sees the difference on any AVX2 CPU.
        env["OPENBLAS_CORETYPE"] = "Haswell"
    out = tmp_path / f"scores_{threads}.npz"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, check=True, timeout=300)
    return dict(np.load(out))


def test_every_detector_scores_bit_identically_with_1_and_2_blas_threads(tmp_path):
    one, two = _scores(tmp_path, 1), _scores(tmp_path, 2)
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].tobytes() == two[key].tobytes(), (key, one[key] - two[key])
    for key in one:  # and faiss_threads (clips or query blocks scored at once) changes nothing either
        if key.endswith("1"):
            assert one[key].tobytes() == one[key[:-1] + "2"].tobytes(), key


def test_one_thread_blocks_nest_and_restore_the_thread_counts():
    from threadpoolctl import threadpool_info

    before = [p["num_threads"] for p in threadpool_info()]
    with one_thread():
        assert all(p["num_threads"] == 1 for p in threadpool_info())
        with one_thread():
            pass
        assert all(p["num_threads"] == 1 for p in threadpool_info())  # the inner block did not restore
    assert [p["num_threads"] for p in threadpool_info()] == before
    assert spread(lambda x: x * 2, [1, 2, 3], threads=3) == [2, 4, 6]


def test_a_pipeline_task_limits_the_native_libraries_again_only_after_new_imports(monkeypatch):
    """``limit_threads`` runs per batch: it looks for native libraries (threadpoolctl, milliseconds) only when a
    module was imported since its last look, and torch's own count is checked every time."""
    import threadpoolctl

    from asd_ray.distributed import batches

    calls = []
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", lambda n: calls.append(n))
    monkeypatch.setattr(batches, "_modules_limited", -1)
    batches.limit_threads()
    batches.limit_threads()
    assert calls == [1]
    monkeypatch.setitem(sys.modules, "asd_ray_test_new_native_library", object())
    batches.limit_threads()
    batches.limit_threads()
    assert calls == [1, 1]
