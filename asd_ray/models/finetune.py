"""Self-supervised masked-prediction fine-tuning of a HuBERT backbone (SPEC §5): the maths, no ray.

The student sees the clip with 30 % of its frames masked (HuBERT's span masking, ``masked_spec_embed``
at the masked frames); a teacher (an EMA or a frozen copy of the student, no gradient) sees the clean
clip; the loss is the MSE between student and teacher features at the masked frames. The targets come
from another network state than the prediction and the inputs differ, so the loss cannot be
minimised by a constant output of one network. Augmentation (noise mixing at a random SNR,
phase-vocoder time-stretch) runs on waveforms before batching.

Every random draw of a run is a function of the seed and where it is drawn: a clip's augmentation of
(seed, epoch, clip), a worker's masks and dropout at a step of (seed, rank, step) (``row_generator``,
``step_generators``), so that a run resumed from a checkpoint draws what the unbroken run drew.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from asd_ray.errors import CheckpointError
from asd_ray.models.backbones import pool_frames

# What a fine-tuning checkpoint's training_state.pt holds beside the student (saved with save_pretrained).
TRAINING_STATE_KEYS = ("teacher", "optimizer", "scheduler", "step", "epoch", "batches_in_epoch")


# Tags that keep the seed sequences of a clip's augmentation and of a step's masks apart (both are 3 integers).
_ROW, _STEP = 1, 2


def row_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one clip's augmentation (crops, stretch, noise) in one epoch: a function of the run's
    ``seed``, the ``epoch`` and the clip's ``index`` alone, not of the process or batch that draws it."""
    return np.random.default_rng([seed, _ROW, epoch, index])


def step_generators(seed: int, rank: int, step: int) -> tuple[np.random.Generator, int]:
    """One worker's random state for one training step: (numpy generator of its span masks, torch seed of its
    dropout), a function of (``seed``, ``rank``, ``step``) alone, so that a run resumed at a step draws what the
    unbroken run drew there."""
    masks, dropout = np.random.SeedSequence([seed, _STEP, rank, step]).spawn(2)
    return np.random.default_rng(masks), int(dropout.generate_state(1, np.uint64)[0] >> 1)


def crop_or_tile(waveform: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``samples``-long window of a clip; a shorter clip is repeated to fill it (machine
    sounds are stationary enough, and padding would leak through HuBERT-Base's GroupNorm)."""
    w = np.asarray(waveform, dtype=np.float32)
    if len(w) < samples:
        w = np.tile(w, math.ceil(samples / len(w)))
    start = int(rng.integers(0, len(w) - samples + 1))
    return np.ascontiguousarray(w[start:start + samples])


def time_stretch(waveform: np.ndarray, rate: float, n_fft: int = 512, hop_length: int = 128) -> np.ndarray:
    """Phase-vocoder time-stretch (torchaudio): ``rate`` > 1 is faster (shorter), pitch kept."""
    import torchaudio.functional as AF

    x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
    window = torch.hann_window(n_fft)
    spec = torch.stft(x, n_fft, hop_length, window=window, return_complex=True)
    advance = torch.linspace(0, math.pi * hop_length, spec.shape[-2])[..., None]
    stretched = AF.phase_vocoder(spec, rate, advance)
    length = int(round(len(x) / rate))
    return torch.istft(stretched, n_fft, hop_length, window=window, length=length).numpy()


def mix_noise(waveform: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``waveform`` plus ``noise`` (tiled or cut to its length) scaled to ``snr_db`` (torchaudio.add_noise)."""
    import torchaudio.functional as AF

    n = np.asarray(noise, dtype=np.float32)
    if len(n) < len(waveform):
        n = np.tile(n, math.ceil(len(waveform) / len(n)))
    x, n = torch.from_numpy(np.asarray(waveform, np.float32))[None], torch.from_numpy(n[:len(waveform)].copy())[None]
    if float(n.pow(2).sum()) == 0.0:
        return np.asarray(waveform, np.float32)  # silent noise: nothing to mix (and no division by zero)
    return AF.add_noise(x, n, torch.tensor([snr_db], dtype=torch.float32))[0].numpy()


def augment(waveform: np.ndarray, rng: np.random.Generator, noise: np.ndarray | None = None, *,
            noise_prob: float = 0.5, snr_low: float = -5.0, snr_high: float = 15.0, stretch_prob: float = 0.5,
            stretch_low: float = 0.8, stretch_high: float = 1.2) -> np.ndarray:
    """One clip's augmentation (SPEC §5): time-stretch by U[stretch_low, stretch_high] with ``stretch_prob``,
    then noise at SNR U[snr_low, snr_high] dB with ``noise_prob`` (when a noise clip is given)."""
    w = np.asarray(waveform, dtype=np.float32)
    if stretch_prob > 0 and rng.random() < stretch_prob:
        w = time_stretch(w, float(rng.uniform(stretch_low, stretch_high)))
    if noise is not None and noise_prob > 0 and rng.random() < noise_prob:
        w = mix_noise(w, noise, float(rng.uniform(snr_low, snr_high)))
    return w.astype(np.float32)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear from 0 to 1 over ``warmup_steps``, then cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def span_mask(batch: int, frames: int, mask_prob: float, mask_length: int, rng: np.random.Generator) -> torch.Tensor:
    """HuBERT's span mask (``_compute_mask_indices``): B x F bool, about ``mask_prob`` of the frames in
    spans of ``mask_length`` (at least one span per clip)."""
    from asd_ray.private_apis import hubert_span_mask

    state = np.random.get_state()  # transformers draws from numpy's global generator
    np.random.seed(int(rng.integers(0, 2**31 - 1)))
    try:
        mask = hubert_span_mask((batch, frames), mask_prob, mask_length, min_masks=1)
    finally:
        np.random.set_state(state)
    return torch.from_numpy(mask)


def prepare_student(model: torch.nn.Module) -> torch.nn.Module:
    """Training settings a DDP fine-tuning needs: no layer drop (DDP needs every parameter every step),
    span masking applied by the caller only (``MaskedPrediction.loss`` passes ``mask_time_indices``; the model's own
    time masking runs only without them, and feature masking is off).

    The mask embedding (``masked_spec_embed``) is kept, and ``mask_time_prob`` stays positive in the config that is
    saved with each checkpoint: transformers builds that parameter only when it is, so a student saved with 0 came
    back from its checkpoint without it, and a resumed run failed to load its teacher ("Unexpected key(s) in
    state_dict: masked_spec_embed") or to mask. A model built without one gets one, drawn as transformers draws it."""
    model.config.layerdrop = 0.0
    model.config.apply_spec_augment = True
    model.config.mask_feature_prob = 0.0
    if model.config.mask_time_prob <= 0.0:
        model.config.mask_time_prob = 0.05  # transformers' default: only decides that the parameter is built
    if getattr(model, "masked_spec_embed", None) is None:
        model.masked_spec_embed = torch.nn.Parameter(torch.empty(model.config.hidden_size).uniform_())
    if hasattr(model, "encoder") and hasattr(model.encoder, "layerdrop"):
        model.encoder.layerdrop = 0.0
    return model


class MaskedPrediction:
    """Student/teacher pair and the masked-prediction loss. ``student`` may be wrapped in DDP."""

    def __init__(self, student: torch.nn.Module, *, teacher: str = "ema", ema_decay: float = 0.999,
                 mask_prob: float = 0.3, mask_length: int = 10, seed: int = 0):
        if teacher not in ("ema", "frozen"):
            raise ValueError(f"teacher {teacher!r}: use 'ema' or 'frozen'")
        self.student = student
        self.teacher_kind, self.ema_decay = teacher, ema_decay
        self.teacher = copy.deepcopy(self.module).eval().requires_grad_(False)
        self.mask_prob, self.mask_length = mask_prob, mask_length
        self.rng = np.random.default_rng(seed)

    def seed_step(self, seed: int, rank: int, step: int) -> None:
        """Draw the next loss's masks and dropout from (``seed``, ``rank``, ``step``) (``step_generators``).
        torch's seed is the process's: nothing else in a training worker draws from it."""
        self.rng, torch_seed = step_generators(seed, rank, step)
        torch.manual_seed(torch_seed)

    @property
    def module(self) -> torch.nn.Module:
        """The student without a DDP wrapper (what is saved and copied)."""
        return getattr(self.student, "module", self.student)

    def loss(self, waveforms: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Equal-length B x T waveforms -> scalar MSE between student and teacher features at masked frames."""
        frames = int(self.module._get_feat_extract_output_lengths(torch.tensor(waveforms.shape[1])))
        mask = span_mask(waveforms.shape[0], frames, self.mask_prob, self.mask_length, self.rng).to(waveforms.device)
        with torch.autocast(waveforms.device.type, dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                target = self.teacher(waveforms).last_hidden_state
            pred = self.student(waveforms, mask_time_indices=mask).last_hidden_state
        return torch.nn.functional.mse_loss(pred[mask].float(), target[mask].float())

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA: teacher <- d * teacher + (1 - d) * student; a frozen teacher stays as it started."""
        if self.teacher_kind != "ema":
            return
        # t + (1 - d) (s - t) = d t + (1 - d) s, as one multi-tensor kernel rather than two per parameter
        torch._foreach_lerp_(list(self.teacher.parameters()), [s.detach() for s in self.module.parameters()],
                             1.0 - self.ema_decay)

    @torch.no_grad()
    def collapse_monitor(self, waveforms: torch.Tensor) -> float:
        """Mean over dimensions of the across-clip std of pooled (L2-normalised, mean) student embeddings
        of a held-out batch: near 0 when every clip maps to the same point."""
        model = self.module
        was_training = model.training
        model.eval()
        frames = model(waveforms).last_hidden_state
        model.train(was_training)
        lengths = torch.full((frames.shape[0],), frames.shape[1], device=frames.device)
        pooled = pool_frames(frames, lengths, l2_normalise=True, pooling="mean")
        return float(pooled.std(dim=0).mean())


def load_training_state(path: str | Path, *, mmap: bool = False) -> dict:
    """A fine-tuning checkpoint's ``training_state.pt`` ({teacher state_dict, optimizer and scheduler state_dicts,
    step, epoch, batches_in_epoch}: tensors, numbers and containers only) read with ``weights_only=True``, so that
    a checkpoint folder from elsewhere cannot run code when a run resumes from it: a file that would unpickle
    anything else is refused with a ``CheckpointError`` naming it, as is one that cannot be read or lacks a part.
    ``mmap``: tensors stay on disk (a check that reads the file without loading the weights)."""
    p = Path(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise CheckpointError(f"{p}: refused: it holds pickled objects other than tensors and plain data, which could "
                              f"run code when loaded{' (it calls ' + found.group(1) + ')' if found else ''}; only a "
                              f"training state saved by asd-ray finetune can be resumed from") from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{p}: cannot be read as a training state ({' '.join(str(err).split())[:160]})") from None
    missing = [k for k in TRAINING_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{p}: not a fine-tuning training state (no {', '.join(missing)})")
    return state
