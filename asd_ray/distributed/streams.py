"""The fleet scoring job (``asd-ray serve-fleet``, ``jobs/score_stream.py``): bank actors + router over
a folder of incoming clips, DCASE test folders, or a simulated fleet of machine streams."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from asd_ray.bank.memory_bank import BankError
from asd_ray.config import RunConfig
from asd_ray.data.layout import discover, not_a_file
from asd_ray.detectors import SCORE_SETTINGS, fit_time_keys, given_score_settings, load_detector
from asd_ray.distributed.fleet import (FleetStats, Request, Result, Router, saved_banks, start_banks, start_embedders,
                                       start_frame_embedders)
from asd_ray.progress import advance, stage
from asd_ray.results import Reject
from asd_ray.distributed.session import ensure_ray, gpu_wanted
from asd_ray.scoring.files import write_results

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")


def stream_requests(roots: Sequence[str | Path] = (), clips: str | Path | None = None,
                    machine: str | None = None) -> tuple[list[Request], list[Reject]]:
    """Requests in stream order, and clips that cannot be requests (with the reason).

    ``roots``: DCASE roots; each machine's test clips form one stream (``<machine>_section_<ss>``) in
    file-name order. ``clips``: a folder of incoming clips of ``machine``, one stream named after the
    folder, in file-name order. Every other entry of a test folder or of ``clips`` is listed with the reason,
    not dropped: files that are not audio, sub-folders (one named like a clip too), dangling links.
    """
    requests, skipped = [], []
    if roots:
        for r in sorted((r for r in discover(roots) if r.split == "test"), key=lambda r: (r.machine, r.filename)):
            if r.parse_error:
                skipped.append(Reject(r.path, r.machine, r.parse_error))
            else:
                requests.append(Request(r.machine, f"{r.machine}_section_{r.section}", path=r.path))
    if clips is not None:
        folder = Path(clips)
        if not folder.is_dir():
            raise FileNotFoundError(f"clip folder not found: {folder}")
        if not machine:
            raise ValueError("--clips needs --machine: the machine type whose bank scores them")
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in AUDIO_SUFFIXES:
                what = "a folder" if f.is_dir() else f"not an audio file ({f.suffix or 'no suffix'})"
                skipped.append(Reject(str(f), machine, what))
            elif reason := not_a_file(f):
                skipped.append(Reject(str(f), machine, reason))
            else:
                requests.append(Request(machine, folder.name, path=str(f)))
    return requests, skipped


def write_stream_results(out_dir: str | Path, results: Sequence[Result], skipped: Sequence[Reject] = ()) -> Path:
    """``streams.csv`` (one row per scored clip, stream order) and ``rejects.csv`` (clips without a score).

    Streams of DCASE test folders also get the official CSV pair, so ``asd-ray evaluate`` reads them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "streams.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["stream_id", "machine", "clip", "raw_score", "score", "decision"])
        for r in results:
            if not r.error:
                w.writerow([r.stream_id, r.machine, r.path or "", repr(r.raw_score), repr(r.score), r.decision])
    with (out / "rejects.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        w.writerows([(s.path, s.reason) for s in skipped])
        w.writerows([(r.path or f"{r.machine}/{r.stream_id}", r.error) for r in results if r.error])
    by_stream: dict[str, list[Result]] = {}
    for r in results:
        if not r.error and r.path and re.fullmatch(rf"{re.escape(r.machine)}_section_\d\d", r.stream_id):
            by_stream.setdefault(r.stream_id, []).append(r)
    for stream, rows in by_stream.items():
        machine, section = rows[0].machine, stream.rsplit("_", 1)[1]
        write_results(out, machine, [Path(r.path).name for r in rows], np.array([r.score for r in rows]),
                      np.array([r.decision for r in rows]), section)
    return out


def settings_lines(stats: dict[str, dict], config: RunConfig, given: Iterable[str] = ()) -> list[str]:
    """Where each scoring setting of a fleet came from, for people: per machine its detector's score-time
    settings (the config where given, else the saved bank), the post-processing (the config: never saved
    with a bank), and given keys that no bank took (fixed when the banks were fitted, or of another kind)."""
    given = set(given)
    lines = ["scoring settings (config: given in --config/--set; saved bank: as `asd-ray run` saved it):"]
    applied = set()
    for machine, st in sorted(stats.items()):
        parts = [f"{key}={value} ({source})" for key, (value, source) in sorted(st["settings"].items())]
        applied |= {key.split(".", 1)[1] if key.startswith("member_") else key for key in st["settings"]}
        lines.append(f"  {machine}: {st['kind']}, {st['size']} members, version {st['version']}"
                     + (f"; {', '.join(parts)}" if parts else "; no score-time settings"))
    post = [f"post.{k}={v} ({'config' if f'post.{k}' in given else 'default'})"
            for k, v in dataclasses.asdict(config.post).items()]
    lines.append(f"  post-processing: {', '.join(post)}")
    unused = sorted(k for k in given if k in SCORE_SETTINGS and k not in applied)
    if unused:
        lines.append(f"  not applied: {', '.join(unused)} (no saved detector here takes it)")
    fixed = fit_time_keys(given)
    if fixed:
        lines.append(f"  not applied: {', '.join(fixed)} (fixed when the banks were fitted: the saved banks' "
                     f"values are used; refit with asd-ray run to change them)")
    return lines


def fleet_banks(bank_root: str | Path, config: RunConfig, machines=None, given: Iterable[str] = (),
                detached: bool = False) -> tuple[dict[str, list], dict[str, dict]]:
    """Start (or find) the bank actors of the banks saved under ``bank_root``, taking the score-time settings
    among the ``given`` config keys, and log where each setting came from. -> (actors, stats by machine)."""
    import ray

    ensure_ray(num_cpus=config.ray.num_cpus or None)
    banks = start_banks(bank_root, machines=machines, replicas=config.fleet.replicas,
                        namespace=config.fleet.namespace, faiss_threads=config.bank.faiss_threads,
                        settings=given_score_settings(config, given), detached=detached)
    stats = dict(zip(banks, ray.get([actors[0].stats.remote() for actors in banks.values()])))
    for line in settings_lines(stats, config, given):
        log.info(line)
    return banks, stats


def fleet_router(bank_root: str | Path, config: RunConfig, machines=None, with_embedders: bool = False,
                 given: Iterable[str] = (), detached: bool = False, decode_limit_s: float = 0.0) -> Router:
    """``fleet_banks``, embedding actors when clips are to be scored, and the router over them.
    ``decode_limit_s`` > 0: the embedding actors refuse longer sound files while decoding them."""
    banks, kinds = fleet_banks(bank_root, config, machines, given, detached)
    embedders = None
    frames = {s["features"] == "frames" for s in kinds.values()}
    if with_embedders and len(frames) > 1:
        raise BankError(f"{bank_root}: banks of clip and frame detectors mixed ({kinds}); serve one kind at a time")
    if with_embedders and frames == {True}:
        embedders = start_frame_embedders(config.frames, config.preprocess, num_actors=config.ray.embed_actors,
                                          actor_cpus=config.ray.actor_cpus, decode_limit_s=decode_limit_s)
    elif with_embedders:
        embedders = start_embedders(config.embed, config.preprocess, num_actors=config.ray.embed_actors,
                                    actor_cpus=config.ray.actor_cpus,
                                    use_gpu=gpu_wanted(config.ray.use_gpu, config.embed.device),
                                    decode_limit_s=decode_limit_s)
    return Router(banks, post=config.post, fleet=config.fleet, embedders=embedders)


def score_streams(bank_root: str | Path, config: RunConfig, out_dir: str | Path, *,
                  roots: Sequence[str | Path] = (), clips: str | Path | None = None,
                  machine: str | None = None, given: Iterable[str] = ()) -> list[Result]:
    """Score clips as streams through the bank actors saved under ``bank_root`` (``asd-ray run`` writes
    ``<out>/banks``); every clip ends up in ``streams.csv`` or in ``rejects.csv`` with its reason.
    ``given``: the config keys the user set (``config.given_keys``); score-time settings among them
    (``bank.k``, ``bank.metric`` ...) override what the banks were saved with."""
    requests, skipped = stream_requests(roots, clips, machine)
    if not requests:
        raise ValueError(f"no clips to score ({len(skipped)} skipped)")
    with stage("fleet", total=1, unit="start"):  # bank and embedding actors: their imports take seconds
        router = fleet_router(bank_root, config, with_embedders=True, given=given)
        advance()

    async def score_all() -> list[Result]:
        futures = [router.submit(r) for r in requests]  # in order: a stream's clips keep their order
        for done in asyncio.as_completed(futures):
            await done
            advance()
        return [f.result() for f in futures]

    with stage("scoring", total=len(requests)):
        results = asyncio.run(score_all())
    write_stream_results(out_dir, results, skipped)
    return results


QUERY_CLIPS = 50  # test clips per machine whose features a simulation draws its queries from


def query_pools(router: Router, roots: Sequence[str | Path], clips_per_machine: int = QUERY_CLIPS
                ) -> tuple[dict[str, list], list[Reject]]:
    """The features of up to ``clips_per_machine`` test clips (file-name order) of each machine of the fleet in
    ``roots``, computed by the router's embedding actors before a simulation (clip embeddings, or log-mel matrices
    for frame detectors). -> ({machine: [features]}, clips left out with the reason)."""
    requests, skipped = stream_requests(roots)
    chosen: dict[str, list[str]] = {}
    for r in requests:
        if r.machine in router.banks and len(chosen.setdefault(r.machine, [])) < clips_per_machine:
            chosen[r.machine].append(r.path)
    missing = sorted(set(router.banks) - set(chosen))
    if missing:
        raise ValueError(f"no test clips for {missing} under {[str(r) for r in roots]}: a simulation draws its "
                         f"queries from each machine's test clips")

    async def embed_all() -> list:
        return await asyncio.gather(*[router.embed(p) for paths in chosen.values() for p in paths])

    outcomes = iter(asyncio.run(embed_all()))
    pools: dict[str, list] = {}
    for machine, paths in chosen.items():
        for path, (features, reason) in zip(paths, outcomes):
            if reason:
                skipped.append(Reject(path, machine, reason))
            else:
                pools.setdefault(machine, []).append(features)
    return pools, skipped


def bank_members(bank_root: str | Path) -> dict[str, np.ndarray]:
    """{machine: its clip bank's members} of every bank saved under ``bank_root``; a bank of another kind (one that
    eats log-mel frames) is a ``BankError``: a simulation over it needs real clips for its queries."""
    root, machines = saved_banks(bank_root)
    members = {}
    for machine in machines:
        bank = load_detector(root / machine)
        try:
            members[machine] = bank.clip_members()
        except BankError as err:
            raise BankError(f"{machine}: {err}: give --data ROOT, whose test clips are the simulation's queries "
                            f"(without, they are clip-bank members)") from None
    return members


def simulate(bank_root: str | Path, config: RunConfig, out_dir: str | Path | None = None, *, streams: int = 1000,
             rate_hz: float = 5.0, seconds: float = 10.0, seed: int = 0, given: Iterable[str] = (),
             roots: Sequence[str | Path] = ()) -> FleetStats:
    """A simulated fleet over the saved banks, its queries' features computed before it starts: with ``roots``,
    those of real test clips of each machine (``query_pools``: log-mel matrices for frame detectors such as the
    default ``fusion``, clip embeddings otherwise); without, clip-bank members plus noise (frame detectors need
    ``roots``)."""
    from asd_ray.distributed.fleet import simulate_fleet

    rng = np.random.default_rng(seed)
    members = {} if roots else bank_members(bank_root)  # before any actor starts: a frame bank needs roots
    router = fleet_router(bank_root, config, with_embedders=bool(roots), given=given)
    skipped: list[Reject] = []
    if roots:
        pools, skipped = query_pools(router, roots)
    else:
        pools = {machine: (m + 0.05 * m.std() * rng.standard_normal(m.shape)).astype(np.float32)
                 for machine, m in members.items() if machine in router.banks}
    stats, results = asyncio.run(simulate_fleet(router, pools, streams=streams, rate_hz=rate_hz,
                                                seconds=seconds, seed=seed))
    if out_dir is not None:
        write_stream_results(out_dir, results, skipped)
        (Path(out_dir) / "fleet_stats.json").write_text(json.dumps(dataclasses.asdict(stats), indent=2))
    return stats
