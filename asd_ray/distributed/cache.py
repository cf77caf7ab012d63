"""The feature cache: one Parquet folder per content key under ``ray.cache_dir``, for clip embeddings
(``embedding`` column) and for log-mel frame matrices (``logmel``, each flattened, with ``frames``).

The key covers everything the features depend on (backbone and its files, or the log-mel settings; embedding
and pre-processing parameters, each input file's path, size and mtime). Writers never share a folder: each writes
``<key>.partial-<host>-<pid>-<random>`` and publishes it with one ``os.rename`` once it is complete (its
``_COMPLETE`` manifest inside), so a reader sees a whole cache or none. When another writer of the same key
published first, its folder is kept if it checks out, else replaced. A folder read back is checked against the
clips it claims (one row per clip, each path once, each file's size and mtime as in the key); one that does not
match is reported, naming the folder and what is wrong, and embedded again. No Ray here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from asd_ray.config import EmbedConfig, PreprocessConfig
from asd_ray.data.layout import RECORD_FIELDS, ClipRecord

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"  # the manifest of a published folder (Parquet readers skip names starting with "_")
STALE_AFTER_S = 24 * 3600  # a writer's folder untouched this long is left over, whoever wrote it
IDENTITY_COLUMNS = ("size", "mtime_ns")  # each row's file as it was when the key was made

Identities = Mapping[str, tuple[int, int]]  # clip path -> (size in bytes, mtime in ns); -1, -1 when unreadable


def file_identity(path: str) -> tuple[str, int, int]:
    """(path, size in bytes, mtime in ns) of a file; sizes and times of -1 when it cannot be stat'ed."""
    try:
        st = os.stat(path)
        return path, st.st_size, st.st_mtime_ns
    except OSError:
        return path, -1, -1


def clip_identities(records: Sequence[ClipRecord]) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime_ns)} of every record's file, stat'ed now."""
    return {p: (size, mtime) for p, size, mtime in (file_identity(r.path) for r in records)}


def repeated_clips(records: Sequence[ClipRecord]) -> dict[str, int]:
    """{path: how many records list it} for the paths listed more than once (a root given twice)."""
    return {p: n for p, n in Counter(r.path for r in records).items() if n > 1}


def _backbone_identity(backbone: str) -> list:
    p = Path(backbone).expanduser()
    if backbone != "logmel" and p.is_file():  # a BEATs checkpoint: one file
        return [backbone, file_identity(str(p))]
    if backbone == "logmel" or not p.is_dir():
        return [backbone]
    return [backbone] + [file_identity(str(f)) for f in sorted(p.iterdir()) if f.is_file()]


FRAMES_VERSION = 1  # of the log-mel frame features' computation: a change that alters them raises it


def cache_key(records: Sequence[ClipRecord], embed: EmbedConfig | Mapping[str, object], preprocess: PreprocessConfig,
              identities: Identities | None = None) -> str:
    """Hex digest of everything the features depend on (not batch size, device or actor count). ``embed``: the
    ``EmbedConfig`` of clip embeddings, or the ``LogMelFrames`` keywords of log-mel frames (n_mels, n_fft, hop,
    power, sample rate). ``identities``: the records' files as ``clip_identities`` gave them (stat'ed here when
    not given)."""
    ids = clip_identities(records) if identities is None else identities
    if isinstance(embed, EmbedConfig):
        decisive = {k: v for k, v in dataclasses.asdict(embed).items() if k not in ("batch_size", "device")}
        what = {"embed": decisive, "backbone": _backbone_identity(embed.backbone)}
    else:
        what = {"frames": {k: v for k, v in dict(embed).items() if k != "device"}, "frames_version": FRAMES_VERSION}
        if "backbone" in embed:  # a backbone's frames: its files too (not the device they were computed on)
            what["backbone"] = _backbone_identity(str(embed["backbone"]))
    body = json.dumps({**what, "preprocess": dataclasses.asdict(preprocess),
                       "files": [(r.path, *ids[r.path]) for r in records]}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:24]


def cache_folder(records: Sequence[ClipRecord], embed: EmbedConfig | Mapping[str, object],
                 preprocess: PreprocessConfig, cache_dir: str | Path, identities: Identities | None = None) -> Path:
    """Where the features of ``records`` are cached (``cache_key``): published when it holds ``_COMPLETE``."""
    return Path(cache_dir).expanduser().resolve() / cache_key(records, embed, preprocess, identities)


def _examples(paths) -> str:
    paths = sorted(paths)
    return ", ".join(paths[:2]) + (f" and {len(paths) - 2} more" if len(paths) > 2 else "")


def verify_rows(columns: Mapping[str, list], identities: Identities, repeats: Mapping[str, int] | None = None,
                feature: str = "embedding") -> str:
    """"" when the rows ``columns`` (``read_columns``) are exactly the clips of ``identities``:
    one row per clip (``repeats[path]`` rows for a clip listed that many times: a root given twice), no other
    path, each row's ``size`` and ``mtime_ns`` those of its clip, and a ``feature`` column. Else what is wrong,
    in words."""
    missing_columns = [c for c in ("path", feature, "error", "flags", *IDENTITY_COLUMNS) if c not in columns]
    if missing_columns:
        return f"no {', '.join(missing_columns)} column(s) (written by an older asd-ray?)"
    paths = columns["path"]
    seen = Counter(paths)
    problems = []
    want = {p: (repeats or {}).get(p, 1) for p in identities}
    if len(paths) != sum(want.values()):
        problems.append(f"{len(paths)} rows for {sum(want.values())} clips")
    twice = [p for p, n in seen.items() if n > want.get(p, 1)]
    if twice:
        problems.append(f"{len(twice)} clip(s) in more than one row ({_examples(twice)})")
    missing = identities.keys() - seen.keys()
    if missing:
        problems.append(f"{len(missing)} clip(s) missing ({_examples(missing)})")
    other = seen.keys() - identities.keys()
    if other:
        problems.append(f"{len(other)} row(s) of clips not in this run ({_examples(other)})")
    changed = {p for p, size, mtime in zip(paths, columns["size"], columns["mtime_ns"])
               if p in identities and identities[p] != (size, mtime)}
    if changed:
        problems.append(f"{len(changed)} clip(s) whose size or mtime differ from the key's ({_examples(changed)})")
    return "; ".join(problems)


def table_parts(columns: Mapping[str, list]) -> tuple[np.ndarray, list[ClipRecord], list[dict], list[list[str]]]:
    """A cache's columns -> (embeddings, records, rejects, flags), rows sorted by path."""
    order = sorted(range(len(columns["path"])), key=lambda i: columns["path"][i])
    emb, records, rejects, flags = [], [], [], []
    for i in order:
        rec = ClipRecord(**{f: columns[f][i] for f in RECORD_FIELDS})
        if columns["error"][i]:
            rejects.append({"path": rec.path, "machine": rec.machine, "reason": columns["error"][i]})
            continue
        records.append(rec)
        emb.append(np.asarray(columns["embedding"][i], dtype=np.float32))
        flags.append([f for f in columns["flags"][i].split(";") if f])
    dim = len(emb[0]) if emb else 0
    return (np.stack(emb) if emb else np.zeros((0, dim), np.float32)), records, rejects, flags


def matrix_column(mats: Sequence[np.ndarray]):
    """Float32 matrices -> one Arrow large_binary array (row i: matrix i's float32 bytes, row-major), the rows in
    one buffer. Raw bytes, not list<float>: Parquet writes such a column 4-5 times faster and reads it 4 times
    faster (no repetition levels per value), and a block of them is written in the driver."""
    import pyarrow as pa

    values = (np.concatenate([np.ascontiguousarray(m, np.float32).ravel() for m in mats]) if len(mats)
              else np.zeros(0, np.float32))
    offsets = 4 * np.concatenate([[0], np.cumsum([m.size for m in mats], dtype=np.int64)])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(mats),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(values)])


def matrix_rows(column) -> list[np.ndarray]:
    """A column of ``matrix_column`` (chunked or not; or list<float>, as asd-ray wrote it before) -> a float32
    view per row, without a Python object per value (``to_pydict`` made one per log-mel value: seconds for a
    corpus)."""
    import pyarrow as pa

    rows = []
    for chunk in getattr(column, "chunks", [column]):
        if pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type):
            _, offsets, data = chunk.buffers()
            width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
            offsets = np.frombuffer(offsets, dtype=width)[chunk.offset:chunk.offset + len(chunk) + 1] // 4
            values = (np.frombuffer(data, dtype=np.float32, count=data.size // 4) if data is not None
                      else np.zeros(0, np.float32))  # count: a buffer may be padded past its last value
        else:
            values = chunk.values.to_numpy(zero_copy_only=False)
            offsets = chunk.offsets.to_numpy()
        rows.extend(values[offsets[i]:offsets[i + 1]] for i in range(len(chunk)))
    return rows


ARRAY_COLUMNS = ("logmel",)  # read back as numpy rows, not Python lists


def read_columns(folder: str | Path) -> dict[str, list]:
    """Every row of a Parquet folder, as columns (``ARRAY_COLUMNS`` as a float32 array per row)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(folder))
    arrays = [c for c in ARRAY_COLUMNS if c in table.column_names]
    columns = table.drop_columns(arrays).to_pydict()
    for c in arrays:
        columns[c] = matrix_rows(table.column(c))
    return columns


def read_table(folder: str | Path) -> tuple[np.ndarray, list[ClipRecord], list[dict], list[list[str]]]:
    """Read a pipeline's Parquet folder back: (embeddings, records, rejects, flags), rows sorted by path."""
    return table_parts(read_columns(folder))


def check_folder(folder: Path, identities: Identities, repeats: Mapping[str, int] | None = None,
                 feature: str = "embedding") -> tuple[dict | None, str]:
    """A published cache folder -> (its columns, "") when its rows are the clips of ``identities``, else
    (None, what is wrong); (None, "") when nothing is published there."""
    if not (folder / COMPLETE).is_file():
        return None, f"no {COMPLETE} manifest in it (a write that never finished)" if folder.exists() else ""
    try:
        columns = read_columns(folder)
    except Exception as err:  # noqa: BLE001 - a torn or foreign folder: reported, then embedded again
        return None, f"cannot be read: {type(err).__name__}: {err}"
    problem = verify_rows(columns, identities, repeats, feature)
    return (None, problem) if problem else (columns, "")


def read_cached(folder: Path, identities: Identities, repeats: Mapping[str, int] | None = None,
                feature: str = "embedding") -> dict | None:
    """The columns cached in ``folder`` when it is published and its rows are the clips of ``identities`` with a
    ``feature`` column; None otherwise, with a warning naming the folder and what is wrong when there is a folder
    that does not match."""
    columns, problem = check_folder(folder, identities, repeats, feature)
    if problem:
        log.warning("embedding cache %s does not match its clips: %s; embedding them again", folder, problem)
    return columns


_HOST = socket.gethostname().replace("-", "_")


def _writer_name() -> str:
    return f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_left_over(entry: Path, now: float | None = None) -> bool:
    """Whether ``entry`` of a cache folder is a writer's folder (``<key>.partial-...`` or ``<key>.stale-...``)
    that nobody will finish: its writer, a process of this host, has ended, or it is untouched for a day."""
    for mark in (".partial", ".stale-"):
        if mark in entry.name:
            owner = entry.name.split(mark, 1)[1].lstrip("-")
            break
    else:
        return False
    parts = owner.rsplit("-", 2)
    if len(parts) == 3 and parts[0] == _HOST and parts[1].isdigit() and not _pid_alive(int(parts[1])):
        return True
    try:
        age = (time.time() if now is None else now) - entry.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile
        return False
    return age > STALE_AFTER_S


def remove_left_overs(cache_dir: Path) -> int:
    """Remove writers' folders in ``cache_dir`` that nobody will finish (``is_left_over``). Returns how many."""
    removed = 0
    for entry in cache_dir.iterdir() if cache_dir.is_dir() else ():
        if entry.is_dir() and is_left_over(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d folder(s) of cache writers that ended before publishing, in %s", removed, cache_dir)
    return removed


class CacheWriter:
    """Writes one cache folder under a name of its own, then publishes it (``publish``) or drops it (``discard``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_left_overs(folder.parent)
        self.partial = folder.with_name(f"{folder.name}.partial-{_writer_name()}")
        self.partial.mkdir()

    def write(self, index: int, table) -> None:
        """One Arrow table of rows as part ``index``."""
        import pyarrow.parquet as pq

        # no dictionary pages or column statistics: the columns are float vectors and matrices, which neither
        # helps (a dictionary attempt on them cost 2.8x the write, in the driver, during the embedding stage)
        pq.write_table(table, self.partial / f"part-{index:05d}.parquet", use_dictionary=False,
                       write_statistics=False)

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def publish(self, manifest: dict, key_identities: Identities, repeats: Mapping[str, int] | None = None,
                feature: str = "embedding") -> dict:
        """Publish the rows written, with ``manifest`` as ``_COMPLETE``, and return them (columns).

        Rows that are not exactly the clips of ``key_identities`` (the records' files when the key was made) are
        an error. Files changed since (stat'ed again here) leave the rows unpublished, with a warning. When
        another writer has published this key already, its folder is kept if it checks out (its rows are then
        returned), else replaced."""
        (self.partial / COMPLETE).write_text(json.dumps(manifest))
        ours = read_columns(self.partial)
        problem = verify_rows(ours, key_identities, repeats, feature)
        if problem:
            self.discard()
            raise RuntimeError(f"embedding pipeline lost or repeated clips: {problem}")
        problem = verify_rows(ours, {p: file_identity(p)[1:] for p in key_identities}, repeats, feature)
        if problem:
            log.warning("clip files changed while they were embedded (%s): embeddings not cached in %s",
                        problem, self.folder)
            self.discard()
            return ours
        for _ in range(3):
            try:
                os.rename(self.partial, self.folder)  # atomic; fails when another writer published first
                return ours
            except OSError:
                if not self.folder.exists():
                    continue  # moved away meanwhile: try again
            theirs, problem = check_folder(self.folder, key_identities, repeats, feature)
            if theirs is not None:  # embedded from the same files: theirs serve every later run as ours would
                self.discard()
                return theirs
            # said once already when this run read it, unless a writer of an older asd-ray published it meanwhile
            log.info("embedding cache %s does not match its clips (%s): replacing it", self.folder, problem)
            aside = self.folder.with_name(f"{self.folder.name}.stale-{_writer_name()}")
            try:
                os.rename(self.folder, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
        log.warning("embedding cache %s: other writers kept replacing it; these embeddings are not cached",
                    self.folder)
        self.discard()
        return ours
