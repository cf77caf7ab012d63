"""The files of a saved bank, read so that any fault names the folder, the file and what is wrong. No ray here.

A saved detector is a folder: ``bank.json`` (its kind, format version and parameters), and per kind FAISS
indices (``index.faiss``), arrays (``calibration.npz``, read without pickle) or model weights; detectors made of
others keep those in sub-folders. Every reader here raises ``BankFolderError(folder, file, what)``: a bank that
was truncated, edited or written by a newer asd-ray is refused at load with one line, never with a
``JSONDecodeError`` or a FAISS assertion that names no file. Beside ``bank.json``, ``preprocess.json`` records how the
clips of the bank were pre-processed (``write_preprocess``): a service that would turn requests into features
another way refuses the bank (``check_preprocess``).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from asd_ray.errors import BankFolderError

# The version of the saved-bank layout this code writes and reads; bank.json files without one are version 1.
BANK_FORMAT = 1

# bank.json field types: what a load can take without a TypeError deep inside the detector's constructor.
NUMBER = (int, float)


def one_line(err: BaseException | str, most: int = 200) -> str:
    """An error's message on one line, at most ``most`` characters (FAISS's messages run over several)."""
    text = " ".join(str(err).split())
    return text if len(text) <= most else text[: most - 3] + "..."


def write_meta(directory: str | Path, kind: str, **fields) -> Path:
    """Write ``bank.json`` ({"kind", "format", **fields}) into ``directory`` (made if missing)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "bank.json").write_text(json.dumps({"kind": kind, "format": BANK_FORMAT, **fields}))
    return d


def _type_name(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
             bool: "true or false", type(None): "null"}
    types = types if isinstance(types, tuple) else (types,)
    if set(types) >= {int, float}:
        types = tuple(t for t in types if t is not int)
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is(value: Any, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is no integer here
    return isinstance(value, types)


def read_meta(directory: str | Path, kind: str | None = None, fields: dict[str, Any] | None = None) -> dict:
    """``bank.json`` of a saved detector as a dict, checked: valid JSON, an object, a format this code reads,
    the ``kind`` wanted (None: any), and each of ``fields`` ({name: type or tuple of types}) present with its type."""
    d = Path(directory)
    p = d / "bank.json"
    if not p.is_file():
        raise BankFolderError(d, "bank.json", "missing: no saved bank here")
    try:
        meta = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BankFolderError(d, "bank.json", f"not valid JSON ({one_line(err)})") from None
    except OSError as err:
        raise BankFolderError(d, "bank.json", f"cannot be read ({one_line(err)})") from None
    if not isinstance(meta, dict):
        raise BankFolderError(d, "bank.json", f"holds a JSON {type(meta).__name__}, not an object")
    fmt = meta.get("format", 1)
    if not _is(fmt, int) or fmt < 1:
        raise BankFolderError(d, "bank.json", f"format version {fmt!r} is not a positive integer")
    if fmt > BANK_FORMAT:
        raise BankFolderError(d, "bank.json", f"format version {fmt}: this asd-ray reads version {BANK_FORMAT} "
                                              f"and older (saved by a newer asd-ray?)")
    if kind is not None and meta.get("kind") != kind:
        raise BankFolderError(d, "bank.json", f"holds a {meta.get('kind')!r}, not a {kind}")
    for name, types in (fields or {}).items():
        if name not in meta:
            raise BankFolderError(d, "bank.json", f"has no {name!r} field")
        if not _is(meta[name], types):
            raise BankFolderError(d, "bank.json", f"{name!r} is {one_line(repr(meta[name]), 60)}, not "
                                                  f"{_type_name(types)}")
    return meta


def choice(directory: str | Path, meta: dict, name: str, allowed) -> Any:
    """``meta[name]`` when it is one of ``allowed``; else a ``BankFolderError`` on ``bank.json``."""
    value = meta.get(name)
    if value not in allowed:
        raise BankFolderError(directory, "bank.json", f"{name!r} is {value!r}: use one of {tuple(allowed)}")
    return value


def read_index(directory: str | Path, name: str = "index.faiss"):
    """The FAISS index saved as ``name`` in ``directory``; missing, truncated or not an index: ``BankFolderError``."""
    import faiss

    d = Path(directory)
    p = d / name
    if not p.is_file():
        raise BankFolderError(d, name, "missing")
    try:
        return faiss.read_index(str(p))
    except RuntimeError as err:  # FAISS's read assertions: a short read, an unknown index type ...
        reason = one_line(str(err).rsplit("Error:", 1)[-1], 120)
        raise BankFolderError(d, name, f"cannot be read: truncated or not a FAISS index ({reason})") from None


def read_npz(directory: str | Path, name: str, keys, what: str = "the bank's calibration") -> dict[str, np.ndarray]:
    """{key: array} of the ``keys`` in ``directory/name`` (an ``np.savez`` archive, read without pickle); the file
    missing, unreadable, holding objects or lacking a key: ``BankFolderError`` (``what`` says what it holds)."""
    d = Path(directory)
    p = d / name
    if not p.is_file():
        raise BankFolderError(d, name, f"missing ({what})")
    try:
        with np.load(p, allow_pickle=False) as archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise BankFolderError(d, name, f"has no {', '.join(map(repr, missing))} array ({what})")
            return {k: archive[k] for k in keys}
    except BankFolderError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise BankFolderError(d, name, f"cannot be read ({one_line(err)})") from None


def finite(directory: str | Path, name: str, label: str, x: np.ndarray, shape: tuple | None = None) -> np.ndarray:
    """``x`` when it is numeric, finite and (with ``shape``; None entries match any size) of that shape."""
    x = np.asarray(x)
    if shape is not None and (x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape))):
        want = " x ".join("*" if s is None else str(s) for s in shape)
        raise BankFolderError(directory, name, f"{label} has shape {x.shape}, expected ({want})")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise BankFolderError(directory, name, f"{label} holds NaN, Inf or non-numbers")
    return x


PREPROCESS_RECORD = "preprocess.json"
# The pre-processing settings that change a clip's features (preprocess.min_seconds and max_seconds only accept or
# cut clips: a service may set its own limits).
PREPROCESS_KEYS = ("sample_rate", "target_lufs", "loudness_normalise", "trim", "trim_top_db", "trim_frame", "channels")


def write_preprocess(directory: str | Path, preprocess: dict) -> None:
    """Record in a saved bank's folder how its clips were pre-processed (``PREPROCESS_KEYS`` of ``preprocess``,
    the run's ``PreprocessConfig`` as a dict)."""
    record = {k: preprocess[k] for k in PREPROCESS_KEYS}
    (Path(directory) / PREPROCESS_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def check_preprocess(directory: str | Path, preprocess: dict) -> None:
    """Refuse a bank whose clips were pre-processed otherwise than ``preprocess`` (the service's settings) would
    pre-process a request: a near/far pair cancelled for the bank and down-mixed for the query, another sample
    rate, no loudness normalisation... would score features of another kind. ``BankFolderError`` naming the file,
    each differing setting and the ``--set`` that serves the bank. A bank without the record (saved before banks
    recorded it, or by the library's ``save`` alone) is taken as it is."""
    d = Path(directory)
    p = d / PREPROCESS_RECORD
    if not p.is_file():
        return
    try:
        record = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BankFolderError(d, PREPROCESS_RECORD, f"not valid JSON ({one_line(err)})") from None
    if not isinstance(record, dict):
        raise BankFolderError(d, PREPROCESS_RECORD, f"holds a JSON {type(record).__name__}, not an object")
    differ = [k for k in PREPROCESS_KEYS if k in record and record[k] != preprocess[k]]
    if differ:
        said = ", ".join(f"preprocess.{k}={_setting(record[k])} (here {_setting(preprocess[k])})" for k in differ)
        sets = " ".join(f"--set preprocess.{k}={_setting(record[k])}" for k in differ)
        raise BankFolderError(d, PREPROCESS_RECORD, f"its clips were pre-processed with {said}: requests would be "
                                                    f"turned into features of another kind (serve it with {sets})")


def _setting(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
