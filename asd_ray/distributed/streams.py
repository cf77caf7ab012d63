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
from asd_ray.detectors import load_detector
from asd_ray.distributed.bank_actors import saved_banks
from asd_ray.distributed.fleet import Request, Result, Router, fleet_router
from asd_ray.distributed.simulation import FleetStats, simulate_fleet
from asd_ray.progress import advance, stage
from asd_ray.results import Reject
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
