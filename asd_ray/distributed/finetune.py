"""Ray Train DDP masked-prediction fine-tuning (SPEC §5) of a waveform backbone (HuBERT, wav2vec2, WavLM,
data2vec-audio): Ray Data feeds augmented crops of the normal
train clips of a corpus to ``train_loop_per_worker``, run by ``TorchTrainer`` on N workers.

Checkpoints (every epoch and every ``checkpoint_every`` steps) hold the student in ``save_pretrained``
format, so a checkpoint directory is a backbone for ``asd-ray run --backbone PATH``, plus the teacher,
optimizer and scheduler state in ``training_state.pt``; after a worker (or its node) dies, Ray Train restarts the
group from the last checkpoint (``FailureConfig(max_failures)``).

A run is reproducible for a given seed and number of workers, and a resumed run ends with the weights of the
unbroken one: each rank reads a dataset of its own, ``train_<rank>``, whose rows (clip, epoch) over the whole run
are fixed in the driver (``rank_rows``) and come in order; a clip's augmentation draws from (seed, epoch, clip), a
worker's masks and dropout at a step from (seed, rank, step). Resuming at step s reads the rank's rows again and
trains from batch s on. Rank 0 appends every step's loss,
learning rate and collapse monitor to ``steps.jsonl`` in the run folder; the same metrics go to
``ray.train.report``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from asd_ray.config import FinetuneConfig, RunConfig
from asd_ray.data.audio import try_preprocess
from asd_ray.data.layout import discover
from asd_ray.distributed.finetune_feed import check_clips, data_config, plan_finetune, training_datasets
from asd_ray.distributed.session import ensure_ray, gpu_wanted
from asd_ray.models.finetune import crop_or_tile

log = logging.getLogger(__name__)


def default_run_name() -> str:
    return time.strftime("finetune-%Y%m%d-%H%M%S")


def run_dir(finetune: FinetuneConfig) -> Path:
    """The run's folder: ``storage_path/name`` (``finetune-<time>`` when no name is given)."""
    return Path(finetune.storage_path).expanduser().resolve() / (finetune.name or default_run_name())


def _save_checkpoint(mp, state: dict, init_dir: Path | None) -> str:
    """Student as save_pretrained (safetensors) + training_state.pt, in a fresh local folder."""
    import torch

    d = Path(tempfile.mkdtemp(prefix="asd-ray-ckpt-"))
    mp.module.save_pretrained(d)
    if init_dir is not None and (init_dir / "preprocessor_config.json").is_file():
        shutil.copy(init_dir / "preprocessor_config.json", d)  # keeps do_normalize for the embedding stage
    torch.save({**state, "teacher": mp.teacher.state_dict()}, d / "training_state.pt")
    return str(d)


def train_loop_per_worker(cfg: dict) -> None:
    """The DDP training loop (each worker): ``cfg`` holds ``finetune`` (FinetuneConfig fields),
    ``steps_per_epoch``, ``heldout`` (H x samples float32) and ``log_path``. Rank r reads ``train_<r>``
    (``training_datasets``): batch i of the run is step i, in epoch i // steps_per_epoch."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModel

    from asd_ray.distributed.pipeline import prompt_ray_data
    from asd_ray.models.backbones import native_bf16
    from asd_ray.models.finetune import MaskedPrediction, load_training_state, prepare_student, warmup_cosine

    ft = FinetuneConfig(**cfg["finetune"])
    torch.manual_seed(ft.seed)  # what building the student draws (prepare_student's mask embedding) is the seed's
    per_epoch = cfg["steps_per_epoch"]
    total = per_epoch * ft.epochs
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    state: dict = {}
    init_dir = Path(ft.init) if Path(ft.init).is_dir() else None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            student = AutoModel.from_pretrained(d)
            state = load_training_state(Path(d) / "training_state.pt")  # weights only: no pickled code runs
    else:
        student = AutoModel.from_pretrained(ft.init)
    student = ray.train.torch.prepare_model(prepare_student(student).train())
    mp = MaskedPrediction(student, teacher=ft.teacher, ema_decay=ft.ema_decay, mask_prob=ft.mask_prob,
                          mask_length=ft.mask_length, seed=ft.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, ft.warmup_steps, total))
    if state:
        mp.teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    step = start = state.get("step", 0)
    heldout = torch.from_numpy(np.asarray(cfg["heldout"], dtype=np.float32)).to(device)
    bf16 = device.type == "cuda" and (ft.precision == "bf16" or (ft.precision == "auto" and native_bf16(device)))
    dtype = torch.bfloat16 if bf16 else None
    prompt_ray_data()  # this worker's process runs its dataset's executor
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    collapse = float("nan")
    steps_log = StepLog(cfg["log_path"] if rank == 0 else None)

    def report(metrics: dict, with_checkpoint: bool) -> None:
        # Every worker reports at the same steps (a checkpoint report is a barrier); a report waits for the
        # controller's next poll, so it happens at checkpoints and every ``report_every`` steps, not every step.
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        path = None
        if rank == 0:
            path = _save_checkpoint(mp, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                                         "epoch": step // per_epoch, "batches_in_epoch": step % per_epoch}, init_dir)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path) if path else None)
        if path:
            shutil.rmtree(path, ignore_errors=True)

    metrics: dict = {"step": step}
    pin = device.type == "cuda"
    ready = time.perf_counter()
    batches = shard.iter_torch_batches(batch_size=ft.batch_size, dtypes=torch.float32, device=device,
                                       prefetch_batches=ft.prefetch_batches, pin_memory=pin) if step < total else ()
    read = 0
    for i, batch in enumerate(batches):
        read = i + 1
        if i < step:
            continue  # trained on before the failure this run resumed from: read again, so that every later row
            # comes where the unbroken run had it
        t0 = time.perf_counter()
        epoch = i // per_epoch
        mp.seed_step(ft.seed, rank, step)  # masks and dropout as the unbroken run drew them at this step
        loss = mp.loss(batch["waveform"], dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        mp.update_teacher()
        step += 1
        if ft.monitor_every and (step % ft.monitor_every == 0 or math.isnan(collapse)):
            collapse = mp.collapse_monitor(heldout)  # at a (re)start, then every monitor_every steps
        steps_log.add({"step": step, "start_step": start, "epoch": epoch, "loss": loss.detach(), "lr": sched.get_last_lr()[0],
                       "collapse_std": collapse, "clips": int(batch["waveform"].shape[0]),
                       "step_s": time.perf_counter() - t0, "wait_s": t0 - ready, "time": time.time()})
        epoch_end = step % per_epoch == 0
        checkpoint_due = epoch_end or (bool(ft.checkpoint_every) and step % ft.checkpoint_every == 0)
        if checkpoint_due or (ft.report_every and step % ft.report_every == 0):
            metrics = steps_log.flush() or metrics
            report({**metrics, "epoch_end": epoch} if epoch_end else metrics, checkpoint_due)
        ready = time.perf_counter()
    if step != total:
        raise RuntimeError(f"fine-tuning worker {rank}: its data feed gave {read} batches, {total} expected")


class StepLog:
    """Rank 0's per-step metrics, appended to ``steps.jsonl`` in groups: a step's loss stays a tensor until
    the group is written (one device sync per group, not per step). ``path`` None keeps nothing."""

    def __init__(self, path: str | None, *, every_s: float = 2.0, most: int = 64):
        self.path, self.every_s, self.most = path, every_s, most
        self.pending: list[dict] = []
        self.last = time.perf_counter()

    def add(self, record: dict) -> None:
        if self.path is None:
            return
        self.pending.append(record)
        if len(self.pending) >= self.most or time.perf_counter() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> dict:
        """Write what is pending; returns the latest step's metrics as plain numbers ({} when none)."""
        if not self.pending:
            return {}
        import torch

        losses = torch.stack([r["loss"].float() for r in self.pending]).tolist()
        records = [{**r, "loss": v} for r, v in zip(self.pending, losses)]
        with open(self.path, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        self.pending, self.last = [], time.perf_counter()
        return records[-1]


@dataclass
class FinetuneResult:
    """Where the fine-tuned backbone is, and what the run saw."""

    checkpoint: Path  # a save_pretrained directory: --backbone PATH
    run_dir: Path
    metrics: dict
    steps: list[dict]
    rejects: list[dict]  # normal train clips that failed pre-processing, with the reason
    clips: int
    unused: list[dict] = dataclasses.field(default_factory=list)  # every other entry, with the reason


def fit_keeping_ctrl_c(trainer):
    """``trainer.fit()`` in a thread of its own, the calling thread waiting: Ctrl-C stays a ``KeyboardInterrupt``
    of the caller. From the main thread, Ray Train installs its own SIGINT handler, which aborts the run and lets
    ``fit`` return as if it had ended (or, the second time, exits with status 0)."""
    out: dict = {}

    def fit() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            out["error"] = err

    thread = threading.Thread(target=fit, name="asd-ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in out:
        raise out["error"]
    return out["result"]


@contextlib.contextmanager
def step_progress(path: Path, total: int, every_s: float = 2.0) -> Iterator[None]:
    """A bar of the run's steps (steps/s, ETA) with the latest loss while the block runs, fed from rank 0's
    ``steps.jsonl`` (which it writes every 2 s) by a thread of the driver, which otherwise waits in ``fit``."""
    from asd_ray.progress import advance, note, stage

    stop = threading.Event()
    seen = {"offset": path.stat().st_size if path.is_file() else 0, "step": 0}

    def read() -> None:
        if not path.is_file():
            return
        with open(path, "rb") as fh:
            fh.seek(seen["offset"])
            text = fh.read()
        whole = text[:text.rfind(b"\n") + 1]  # a line being written waits for the next look
        seen["offset"] += len(whole)
        for line in whole.splitlines():
            record = json.loads(line)
            if record["step"] > seen["step"]:  # steps after a resume's checkpoint run again: counted once
                advance(record["step"] - seen["step"])
                seen["step"] = record["step"]
            note(f"loss {record['loss']:.4g}, epoch {record['epoch'] + 1}")

    def follow() -> None:
        while not stop.wait(every_s):
            read()

    with stage("finetune", total=total, unit="step"):
        thread = threading.Thread(target=follow, name="asd-ray-finetune-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            read()


def read_steps(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def check_resume_states(folder: Path) -> None:
    """Before Ray starts: the training state of every checkpoint a run in ``folder`` could resume from reads as
    weights only (``load_training_state``, tensors left on disk); one that would unpickle code, or cannot be read,
    is a ``CheckpointError`` naming it, not a failure inside a Ray Train worker."""
    from asd_ray.models.finetune import load_training_state

    for path in sorted(Path(folder).glob("checkpoint_*/training_state.pt")):
        load_training_state(path, mmap=True)


def finetune(roots: Sequence[str | Path], config: RunConfig, machines: Iterable[str] | None = None) -> FinetuneResult:
    """Fine-tune ``config.finetune.init`` on the normal train clips of ``roots`` with Ray Train.

    Joins or starts Ray. The run lives under ``storage_path/name``; the same name resumes it. ``finetune.json``
    there counts every entry found (trained on, held out, rejected, noise for augmentation, unused) and lists the
    rejected and unused ones with their reasons. A checkpoint of a
    family without masked prediction (a spectrogram model) is a ``BackboneError`` before anything starts.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from asd_ray.distributed.resources import finetune_resources
    from asd_ray.models.encoders import check_finetunable

    check_finetunable(config.finetune.init)
    check_resume_states(run_dir(config.finetune))
    started = ensure_ray(num_cpus=config.ray.num_cpus or None)
    ft, pre = config.finetune, config.preprocess
    use_gpu = gpu_wanted(ft.use_gpu)
    have = ray.cluster_resources()
    # workers and their data feed sized to fit together (or a ConfigError naming the setting) before anything starts
    plan = finetune_resources(ft, have.get("CPU", 0.0), have.get("GPU", 0.0), use_gpu, strict=started)
    log.info("fine-tuning plan: %d worker(s) x %g CPU%s + data-feed tasks of %g CPU", plan.workers, plan.worker_cpus,
             " + 1 GPU" if use_gpu else "", plan.feed_cpus)
    records = discover(roots, machines, normals_only_roots=config.normals_only_roots)
    train, noise, unused = plan_finetune(records)
    if len(train) < ft.heldout_clips + ft.workers * ft.batch_size:
        raise ValueError(f"{len(train)} normal train clips: too few for {ft.workers} workers x batch "
                         f"{ft.batch_size} plus {ft.heldout_clips} held out")
    ok, rejects = check_clips(train, pre)
    rng = np.random.default_rng(ft.seed)
    order = rng.permutation(len(ok))
    held, fit = [ok[i] for i in order[:ft.heldout_clips]], [ok[i] for i in order[ft.heldout_clips:]]
    samples = int(round(ft.crop_seconds * pre.sample_rate))
    heldout = np.stack([crop_or_tile(try_preprocess(r.path, **dataclasses.asdict(pre))[0].waveform, samples, rng)
                        for r in held])
    steps_per_epoch = len(fit) // ft.workers // ft.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(fit)} usable training clips: not one batch of {ft.batch_size} per worker")
    folder = run_dir(ft)
    name, storage = folder.name, folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "steps.jsonl"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"finetune": dataclasses.asdict(ft), "steps_per_epoch": steps_per_epoch,
                           "heldout": heldout, "log_path": str(log_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=ft.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": plan.worker_cpus,
                                                                     **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ft.keep_checkpoints),
                                       failure_config=ray.train.FailureConfig(max_failures=ft.max_failures)),
        datasets=training_datasets(fit, noise, pre, ft, steps_per_epoch), dataset_config=data_config())
    with step_progress(log_path, steps_per_epoch * ft.epochs):
        result = fit_keeping_ctrl_c(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning {name} ended without a checkpoint: {result.error}")
    counts = {"entries": len(records), "trained_on": len(fit), "heldout": len(held), "rejected": len(rejects),
              "noise_clips": len(noise), "unused": len(unused)}
    if counts["entries"] != sum(v for k, v in counts.items() if k != "entries"):
        raise RuntimeError(f"clip accounting broken: {counts}")
    summary = {"checkpoint": result.checkpoint.path, "clips": len(fit), "heldout": len(held), "noise_clips": len(noise),
               "counts": counts, "rejected": rejects, "unused": unused, "steps_per_epoch": steps_per_epoch,
               "metrics": result.metrics, "config": dataclasses.asdict(ft), "resources": dataclasses.asdict(plan)}
    (folder / "finetune.json").write_text(json.dumps(summary, indent=2, default=str))
    return FinetuneResult(checkpoint=Path(result.checkpoint.path), run_dir=folder, metrics=result.metrics or {},
                          steps=read_steps(log_path), rejects=rejects, clips=len(fit), unused=unused)
