"""Frozen configuration dataclasses, one per stage, and their loader.

A config is built from its dataclass defaults (the one source of defaults), then a YAML file,
then ``key=value`` overrides (``section.key=value`` for nested stages). Unknown keys and values
of the wrong type are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value that cannot be accepted."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Pre-processing of every clip (SPEC §2)."""

    sample_rate: int = 16_000
    target_lufs: float = -23.0
    loudness_normalise: bool = True
    trim: bool = True
    trim_top_db: float = 60.0  # frames this far below the loudest frame count as silence
    trim_frame: int = 1024  # samples per energy frame
    min_seconds: float = 1.0  # clips shorter than this after decoding are rejected; trim keeps at least this
    max_seconds: float = 0.0  # 0 = no cap; else clips are cut to this many seconds
    # a clip of two or more channels (DCASE 2026: channel 0 the near microphone, 1 the far one): mix (the channels'
    # mean, flagged), near (channel 0), far (channel 1), cancel (the near channel with the far one's least-squares
    # prediction of it removed per frequency, data/audio.py: cancel_far), subtract (the far channel's magnitude
    # subtracted per frequency, subtract_far); auto: cancel for two channels (measured best, README), mix for more;
    # mono clips are taken as they are
    channels: Literal["auto", "mix", "near", "far", "cancel", "subtract"] = "auto"


@dataclass(frozen=True)
class EmbedConfig:
    """Backbone and pooling (SPEC §3)."""

    backbone: str = "logmel"  # "logmel", or an audio encoder's checkpoint directory / hub id (models/encoders.py)
    # "last", an index into the hidden states (0: the input embeddings), "average" (of the layers), or several
    # indices "4,8,12" (each layer pooled, side by side)
    layer: str = "last"
    pooling: Literal["auto", "mean", "mean_std"] = "auto"  # auto: mean (encoders, SPEC §3), mean_std (logmel)
    n_mels: int = 128
    n_fft: int = 1024
    hop_length: int = 512
    batch_size: int = 16
    device: str = "auto"  # "auto", "cpu", "cuda"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 on GPUs that have it, else fp16
    # run a checkpoint folder's own model code (config.json's auto_map: EAT's Hugging Face folders); off, such a
    # folder is refused, for its code would run with the user's permissions
    trust_remote_code: bool = False


@dataclass(frozen=True)
class BankConfig:
    """Clip memory bank and k-NN score (SPEC §4)."""

    k: int = 3
    metric: Literal["euclidean", "cosine"] = "euclidean"
    strategy: Literal["seed", "domain_aware"] = "seed"  # one bank, or source/target banks each scaled (min)
    density: bool = False  # local-density normalised k-NN: each member's distance divided by its own k-NN radius
    oversample_target: int = 0  # SMOTE: target normals interpolated up to this many members (0 = off)
    faiss_threads: int = 1  # blocks of 1,024 queries searched at once, each on one BLAS thread: no score depends on it
    seed: int = 0  # of the oversampling


@dataclass(frozen=True)
class PooledConfig:
    """Clip k-NN bank over a clip's log-mel frames pooled over time (``detector=pooled``; bank/pooling.py).

    Defaults are the measured best on the synthetic corpus and the choices of the training-free k-NN
    literature on DCASE 2025: domain-wise banks, local-density-normalised distances, K = 1.
    """

    pooling: Literal["mean", "mean_std", "gem", "reldev", "rhythm"] = "mean_std"  # rhythm: when events come
    gem_p: float = 3.0  # exponent of generalised-mean pooling
    k: int = 1
    strategy: Literal["seed", "domain_aware"] = "domain_aware"
    density: bool = True
    oversample_target: int = 0  # SMOTE: target normals interpolated up to this many members (0 = off)


@dataclass(frozen=True)
class FramesConfig:
    """Log-mel frame features of the frame-level detectors (the AE baseline, the local-feature bank; SPEC §7)."""

    n_mels: int = 128
    n_fft: int = 1024
    hop_length: int = 512
    power: float = 2.0


@dataclass(frozen=True)
class LocalConfig:
    """Local-feature bank: windows of stacked log-mel frames of a machine's normals, coreset-subsampled (PatchCore)."""

    context: int = 5  # consecutive frames stacked into one window vector (5 x 128 = 640-d)
    stride: int = 1  # hop between windows of a clip, in frames
    standardise: bool = True  # z-score each window dimension by the train windows' mean and std
    bank_size: int = 4096  # the most windows a machine's bank keeps (per domain bank)
    coreset: Literal["kcenter", "kmeans", "random"] = "kcenter"
    candidates: int = 32768  # train windows drawn at random before the coreset (bounds its cost; 0 = all)
    projection_dim: int = 128  # k-centre distances in a random projection of this size (0 = full dimension)
    k: int = 1  # nearest bank windows per test window
    clip_score: Literal["max", "topq", "mean"] = "topq"  # clip score from its windows' k-NN distances
    top_q: float = 0.1  # share of a clip's windows, highest distances, averaged by ``topq``
    domain_norm: bool = True  # source and target windows in separate banks, distances over each bank's scale
    # which domain bank scores a clip: the one nearest the bulk of its windows (its domain), or the smaller scaled
    # score ("min", the earlier rule: a bank whose own clips carry extra sounds then scores the other domain low)
    domain_pick: Literal["nearest", "min"] = "nearest"
    pca_dim: int = 128  # windows projected on their first principal axes (0 = off): less noise, cheaper search
    whiten: bool = True  # PCA axes scaled to unit variance (Mahalanobis distance in the subspace)
    calibration_clips: int = 200  # train clips given leave-one-out scores (threshold, fusion); 0 = all
    seed: int = 0
    faiss_threads: int = 1  # clips scored at once, each on one BLAS thread: no score depends on it


@dataclass(frozen=True)
class FusionConfig:
    """Label-free fusion: each member's scores z-normalised by its train (leave-one-out) scores, then combined."""

    # ``detector`` values (not fusion) that eat the same features; () = the members for the frames: local, pooled
    # and rhythm over log-mel frames, local and pooled over a backbone's (rhythm reads log-mel band levels)
    members: tuple[str, ...] = ()
    combine: Literal["min", "mean", "max"] = "mean"  # mean: each member's evidence counts (max: any member alone)


@dataclass(frozen=True)
class BandsConfig:
    """Per-band memory banks (``detector=bands``, as BEAM): a pooled bank per group of log-mel bands, each z-scored
    by its train (leave-one-out) scores, then combined."""

    groups: int = 4  # equal groups of the log-mel bands, low first
    combine: Literal["min", "mean", "max"] = "max"  # max: anomalous when any group finds the clip unusual


@dataclass(frozen=True)
class SupplementalConfig:
    """Supplemental clips (DCASE 2025: noise-only and clean-machine clips of some machines, mostly source domain)."""

    # frame detectors: each machine's noise-only clips' mean mel power, at a clip's own noise level, subtracted
    # from its frames before the detector (bank/noise.py); machines without noise-only clips are left as they are
    noise_profile: bool = False
    floor_db: float = -13.0  # the subtraction keeps at least this much of a bin's power (dB)
    time_quantile: float = 0.1  # a band's floor in a clip: this quantile of its frames
    band_quantile: float = 0.05  # the clip's noise offset: this quantile over bands of (floor - profile)


@dataclass(frozen=True)
class PostConfig:
    """Post-processing and decisions (SPEC §4)."""

    minmax: bool = True
    median_window: int = 1  # 1 = off; 3 = the report's option
    threshold_quantile: float = 0.9


@dataclass(frozen=True)
class RayConfig:
    """How the Ray layer spreads the work (never changes a result)."""

    num_cpus: int = 0  # CPUs of a Ray this command starts itself; 0 = all of this machine's
    embed_actors: int = 1  # embedding actors (one GPU each on GPU nodes)
    actor_cpus: float = 0.5  # CPUs per embedding actor without GPU: fractional, so read tasks never starve
    preprocess_cpus: float = 0.0  # CPUs per pre-processing task; 0 = 1 beside GPU actors, 0.5 otherwise
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    cache_dir: str = "~/.cache/asd-ray/embeddings"  # Parquet embeddings, keyed by content
    detector_cpus: float = 1.0  # CPUs per machine's task fitting a frame detector (an AE: a GPU each if use_gpu allows)


@dataclass(frozen=True)
class AEConfig:
    """The official DCASE autoencoder baseline (SPEC §7); defaults are the baseline's (its log-mel: ``FramesConfig``)."""

    frames: int = 5  # consecutive log-mel frames stacked into one input vector (5 x 128 = 640-d)
    hidden: int = 128
    bottleneck: int = 8
    layers: int = 4  # hidden layers on each side of the bottleneck
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class FleetConfig:
    """Bank actors and the router that scores many machine streams (SPEC §8)."""

    namespace: str = "asd-ray"  # Ray namespace of the named bank actors ("bank:<machine>")
    replicas: int = 1  # bank actors per machine; the router sends each batch to the least busy one
    max_batch: int = 256  # requests of one machine sent to its bank in one call
    max_wait_ms: float = 0.0  # how long a request waits for company when a bank is free (0: send at once)
    max_in_flight: int = 1  # calls outstanding per bank actor; requests arriving meanwhile form the next batch
    embed_batch: int = 16  # clips per call to an embedding actor (requests that carry a clip, not an embedding)


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP scoring service on Ray Serve (``asd-ray serve``): a thin layer over the fleet's bank actors."""

    host: str = "127.0.0.1"  # where Serve's HTTP proxy (and, with direct_ingress, each replica) listens
    port: int = 8000  # the proxy's port; with direct_ingress, replicas listen on port + 1, port + 2 ...
    token: str = ""  # a bearer token every request must carry (Authorization: Bearer <token>); empty: none
    # Without a token, POST /normals (it writes to the banks) is refused unless this is on, and it may be on
    # only with a loopback host (127.x): anyone who reaches the port could otherwise change the banks.
    allow_unauthenticated_writes: bool = False
    replicas: int = 1  # Serve replicas, each with its own router over the shared bank actors
    replica_cpus: float = 0.5  # CPUs reserved per replica (its HTTP parsing and router)
    max_ongoing_requests: int = 1024  # per replica; beyond, Serve answers 503
    # A larger body is answered 413 (a 10 s 16 kHz 16-bit WAV is 320 kB); in a Ray that `asd-ray serve` starts,
    # Serve's own HTTP servers stop reading a body there too (docs/service.md)
    max_body_bytes: int = 16 * 2**20
    # A sound file longer than this is answered 422, refused while it is decoded (never more is read; a few kB
    # of FLAC can hold hours). DCASE clips are 6-18 s. 0: no limit.
    max_audio_seconds: float = 60.0
    timeout_s: float = 30.0  # a request without a score by then is answered 503 (a bank actor restarting)
    follow_s: float = 1.0  # how often a replica hands its counts to the metrics and looks for banks changed by another
    access_log: bool = False  # Serve's log line per request (in the replicas' log files)
    # Each replica also serves HTTP itself (Ray Serve's direct ingress: no hop through the proxy actor, which
    # tops out at a few hundred requests/s on 2 cores). Takes effect when `asd-ray serve` starts Ray itself
    # (on a cluster: RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in the environment of `ray start`).
    direct_ingress: bool = True
    app_name: str = "asd-ray"


@dataclass(frozen=True)
class FinetuneConfig:
    """Masked-prediction fine-tuning of a waveform backbone (HuBERT, wav2vec2, WavLM, data2vec-audio) on Ray Train
    (SPEC §5)."""

    init: str = "facebook/hubert-base-ls960"  # checkpoint directory or hub id the student starts from
    teacher: Literal["ema", "frozen"] = "ema"
    ema_decay: float = 0.999
    mask_prob: float = 0.3  # share of the backbone's frames masked in the student's input
    mask_length: int = 10  # frames per masked span (HuBERT's default)
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 500
    epochs: int = 5
    batch_size: int = 8  # clips per worker and step
    crop_seconds: float = 5.0  # training clips are random windows of this length (shorter clips repeated)
    noise_prob: float = 0.5
    snr_low: float = -5.0
    snr_high: float = 15.0
    stretch_prob: float = 0.5
    stretch_low: float = 0.8
    stretch_high: float = 1.2
    workers: int = 2  # DDP workers (one GPU each with use_gpu)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    # CPUs per worker; 0: an equal share of what the data feed leaves, at most 1 (0.5 each for 2 workers on 2 CPUs).
    # Workers and feed must fit Ray's CPUs together, else the feed waits forever: checked before the run starts
    worker_cpus: float = 0.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPUs that have it (not a T4), else fp32
    checkpoint_every: int = 0  # steps between extra checkpoints (0: only at the end of each epoch)
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker failures survived by resuming from the last checkpoint
    monitor_every: int = 25  # steps between collapse-monitor evaluations (one forward of the held-out batch)
    report_every: int = 0  # steps between ray.train.report calls besides checkpoints (0: at checkpoints only)
    prefetch_batches: int = 2  # batches the Ray Data feed prepares ahead of each worker's step
    feed_cpus: float = 1.0  # CPUs per feed task (pre-processing + augmentation); a whole core, not a share of one
    heldout_clips: int = 8  # clips kept out of training for the collapse monitor
    storage_path: str = "~/asd-ray/finetune"  # Ray Train storage (shared storage on a cluster)
    name: str = ""  # run name; empty: finetune-<time>. The same name resumes that run.
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    """The whole detection run."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    post: PostConfig = field(default_factory=PostConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    frames: FramesConfig = field(default_factory=FramesConfig)
    pooled: PooledConfig = field(default_factory=PooledConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    bands: BandsConfig = field(default_factory=BandsConfig)
    supplemental: SupplementalConfig = field(default_factory=SupplementalConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    # knn: clip k-NN bank over the backbone's embeddings (SPEC §4); pooled: clip k-NN bank over pooled log-mel
    # frames; local: local-feature bank over log-mel windows; ae-mse / ae-maha: the AE baseline's two scores;
    # fusion: the ``fusion.members`` z-normalised and combined
    # The default is the measured best on both synthetic corpus styles (README, "Detectors").
    detector: Literal["knn", "pooled", "rhythm", "bands", "local", "ae-mse", "ae-maha", "fusion"] = "fusion"
    normals_only_roots: tuple[str, ...] = ()  # roots whose unparsed names are trusted as normal train clips
    # eval ground truth from the official baseline repo's single list (datasets/eval_data_list_2025.csv);
    # "": from each root's eval_data/ground_truth_{data,domain}/ tables when present
    eval_list: str = ""


_TRUE_WORDS = ("yes", "true", "on")
_FALSE_WORDS = ("no", "false", "off")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from ``key=value`` are parsed."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML reads yes/no/on/off as booleans: take the choice spelled that way
            spelled = [a for a in allowed if isinstance(a, str) and a in (_TRUE_WORDS if value else _FALSE_WORDS)]
            value = spelled[0] if spelled else value
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} matches no type of {tp}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, key) for v in value)
    if tp is type(None):
        if value is None or value == "null":
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp in (int, float):
        accepted = (int,) if tp is int else (int, float)  # an int field never silently truncates 3.5
        if isinstance(value, accepted) and not isinstance(value, bool):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected {'an int' if tp is int else 'a float'}, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {[prefix + u for u in unknown]} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (lists for tuples) that ``from_dict`` and YAML round-trip."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[leaf] = value


def _given_tree(path: str | Path | None, overrides: typing.Iterable[str]) -> dict[str, Any]:
    """The nested keys and values the YAML file at ``path`` and the ``key=value`` strings give (no defaults)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        tree = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        value = value.strip()
        _set_path(tree, key.strip(), yaml.safe_load(value) if value != "" else "")
    return tree


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Any:
    """Defaults of ``cls``, updated by the YAML file at ``path`` and then by ``key=value`` strings."""
    # YAML parses "3" as int and "true" as bool; strings for str fields are coerced back.
    return from_dict(cls, _given_tree(path, overrides))


def given_keys(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> frozenset[str]:
    """The dotted keys (``bank.k``, ``detector`` ...) that the YAML file and the overrides set, whatever the
    value: what a user asked for, as against a dataclass default."""

    def walk(node: dict[str, Any], prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    return frozenset(walk(_given_tree(path, overrides), ""))


def with_overrides(config: Any, values: dict[str, Any]) -> Any:
    """``config`` with dotted ``key: value`` pairs set (values already parsed); checked like any config."""
    tree = to_dict(config)
    for key, value in values.items():
        _set_path(tree, key, value)
    return from_dict(type(config), tree)


def save_config(config: Any, path: str | Path) -> None:
    """Write ``config`` as YAML that ``load_config`` reads back to an equal object."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
