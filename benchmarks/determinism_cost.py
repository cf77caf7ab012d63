"""What one BLAS thread per score costs (asd_ray/threads.py): detectors fitted and scored with their products
pinned to one thread (as shipped) and with the process's own thread pools ("free": ``one_thread`` replaced by a
no-op, as before the pinning), on fixed random features of DCASE sizes.

    PYTHONPATH=. python3 benchmarks/determinism_cost.py --out benchmarks/results_determinism_cpu2.json

Each figure is the best of ``--repeat`` runs (seconds). Results name the machine they were measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time

import numpy as np


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(repeat: int) -> dict[str, float]:
    from asd_ray.bank.local_bank import LocalFeatureBank
    from asd_ray.bank.memory_bank import MemoryBank
    from asd_ray.models.autoencoder import AEDetector

    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((313, 128)).astype(np.float32) - 60 for _ in range(40)]  # 10 s clips' log-mels
    domains = ["source"] * 36 + ["target"] * 4
    tests = [rng.standard_normal((313, 128)).astype(np.float32) - 60 for _ in range(20)]
    emb = rng.standard_normal((1000, 768)).astype(np.float32)
    queries = rng.standard_normal((1000, 768)).astype(np.float32)
    out = {}
    local = LocalFeatureBank(bank_size=2048, calibration_clips=40)
    out["local_fit_40_clips"] = best(lambda: local.fit(clips, domains=domains), repeat)
    out["local_score_20_clips"] = best(lambda: local.score(tests), repeat)
    knn = MemoryBank(k=3).fit(emb)
    out["knn_score_1000_queries"] = best(lambda: knn.score(queries), repeat)
    out["knn_score_8_queries"] = best(lambda: knn.score(queries[:8]), repeat)
    out["knn_loo_1000_members"] = best(lambda: knn.loo_scores(), repeat)
    ae = AEDetector(score_kind="maha", epochs=3)
    out["ae_fit_40_clips_3_epochs"] = best(lambda: ae.fit(clips, domains=domains), repeat)
    out["ae_score_20_clips"] = best(lambda: ae.score(tests), repeat)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_info

    import asd_ray.bank.local_bank as local_bank
    import asd_ray.models.autoencoder as autoencoder
    import asd_ray.threads as threads

    load_before = os.getloadavg()
    pinned = measure(args.repeat)
    original = threads.one_thread
    free = contextlib.nullcontext
    threads.one_thread = local_bank.one_thread = autoencoder.one_thread = free
    try:
        unpinned = measure(args.repeat)
    finally:
        threads.one_thread = local_bank.one_thread = autoencoder.one_thread = original
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "blas": [f"{p['internal_api']} {p.get('version')} {p.get('architecture', '')} {p['num_threads']} threads"
                 for p in threadpool_info()],
        "torch_threads_free": torch.get_num_threads(),
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "seconds_pinned": pinned, "seconds_free": unpinned,
        "pinned_over_free": {k: round(pinned[k] / unpinned[k], 2) for k in pinned},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
