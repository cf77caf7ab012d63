"""P4: training clips/s of the Ray Train loop vs a plain single-process loop of the same step, same device.

    python benchmarks/finetune_throughput.py --steps 12 [--gpu] [--model base|PATH]

A synthetic corpus of exactly the clips needed (one machine, 10 s clips) is generated first.

The plain loop runs ``MaskedPrediction`` steps on batches augmented beforehand and held in memory (the
ideal feed); the Ray Train run is ``asd_ray.distributed.finetune.finetune`` with one worker on the same
device, fed by Ray Data. Throughput skips the first 2 steps (start-up) and is read from the wall-clock
stamps of ``steps.jsonl``. On CPU the plain loop uses as many torch threads as the Ray worker has CPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from asd_ray.config import RunConfig, load_config
from asd_ray.data.audio import try_preprocess
from asd_ray.data.layout import discover
from asd_ray.data.synth import generate_corpus
from asd_ray.distributed.finetune_feed import augmentation
from asd_ray.models.backbones import native_bf16
from asd_ray.models.finetune import MaskedPrediction, augment, crop_or_tile, prepare_student


def base_model(path: Path) -> str:
    """A randomly initialised HuBERT-Base-sized model (no weights can be downloaded here)."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    HubertModel(HubertConfig(layerdrop=0.0)).save_pretrained(path)
    return str(path)


def tiny_model(path: Path) -> str:
    """A tiny random HuBERT (2 layers, hidden 64, 64-channel feature encoder): a step about as short on 2 CPU
    cores as HuBERT-Base's is on an H100, so that the overheads of the Ray layer show as they do there."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    HubertModel(HubertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                             conv_dim=(64,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                             layerdrop=0.0)).save_pretrained(path)
    return str(path)


def plain_loop(init: str, batches: list[np.ndarray], config: RunConfig, device: str) -> float:
    from transformers import AutoModel

    ft = config.finetune
    dev = torch.device(device)
    student = prepare_student(AutoModel.from_pretrained(init)).train().to(dev)
    mp = MaskedPrediction(student, teacher=ft.teacher, ema_decay=ft.ema_decay, mask_prob=ft.mask_prob,
                          mask_length=ft.mask_length)
    opt = torch.optim.AdamW(student.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
    dtype = torch.bfloat16 if native_bf16(dev) else None  # as the Ray Train loop's precision "auto" does
    stamps = []
    for b in batches:
        x = torch.from_numpy(b).to(dev)
        loss = mp.loss(x, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mp.update_teacher()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return (len(batches) - 2) * len(batches[0]) / (stamps[-1] - stamps[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="base", help="'base' (random HuBERT-Base), 'tiny' (see tiny_model) or a checkpoint directory")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop-seconds", type=float, default=5.0)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--worker-cpus", type=float, default=1.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="p4-"))
    makers = {"base": base_model, "tiny": tiny_model}
    init = makers[args.model](tmp / f"hubert-{args.model}-random") if args.model in makers else args.model
    clips = args.steps * args.batch_size
    config = load_config(RunConfig, None, [
        f"finetune.init={init}", "finetune.workers=1", f"finetune.batch_size={args.batch_size}",
        f"finetune.crop_seconds={args.crop_seconds}", f"finetune.use_gpu={'yes' if args.gpu else 'no'}",
        f"finetune.worker_cpus={args.worker_cpus}", "finetune.epochs=1", "finetune.heldout_clips=2",
        "finetune.monitor_every=0", f"finetune.storage_path={tmp / 'store'}", "finetune.name=p4"])
    data = generate_corpus(tmp / "data", dev_machines=("fan",), eval_machines=(), train_source=clips + 2,
                           train_target=0, test_per_cell=1, supplemental=1, seconds=10.0, seed=0)
    records = [r for r in discover([data]) if r.is_normal_train]

    rng = np.random.default_rng(0)
    samples = int(args.crop_seconds * config.preprocess.sample_rate)
    aug = augmentation(config.finetune)
    waves = [try_preprocess(r.path, **dataclasses.asdict(config.preprocess))[0].waveform for r in records[:clips]]
    crops = [crop_or_tile(augment(w, rng, waves[(i + 1) % len(waves)], **aug), samples, rng) for i, w in enumerate(waves)]
    batches = [np.stack(crops[i:i + args.batch_size]) for i in range(0, clips, args.batch_size)]
    device = "cuda" if args.gpu else "cpu"
    if not args.gpu:
        torch.set_num_threads(max(1, int(args.worker_cpus)))  # what Ray gives a worker with that many CPUs
    plain = plain_loop(init, batches, config, device)

    import ray

    from asd_ray.distributed.finetune import finetune

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(include_dashboard=False, log_to_driver=False)
    result = finetune([data], config)
    steps = result.steps
    ray_rate = sum(s["clips"] for s in steps[2:]) / (steps[-1]["time"] - steps[1]["time"])
    gaps = np.diff([s["time"] for s in steps[1:]])  # wall time from one step's end to the next one's
    step_s = np.array([s["step_s"] for s in steps[2:]])
    out = {"device": torch.cuda.get_device_name() if args.gpu else f"cpu ({os.cpu_count()} cores)",
           "model": args.model, "batch_size": args.batch_size, "crop_seconds": args.crop_seconds,
           "plain_clips_per_s": round(plain, 3), "ray_train_clips_per_s": round(ray_rate, 3),
           "ratio": round(ray_rate / plain, 3), "ray_steps": len(steps),
           "ray_median_step_s": round(float(np.median(step_s)), 4), "ray_median_gap_s": round(float(np.median(gaps)), 4),
           "ray_median_wait_for_batch_s": round(float(np.median([s["wait_s"] for s in steps[2:]])), 4),
           "ray_mean_step_s": round(float(step_s.mean()), 4), "ray_mean_gap_s": round(float(gaps.mean()), 4),
           "ray_mean_wait_for_batch_s": round(float(np.mean([s["wait_s"] for s in steps[2:]])), 4)}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
