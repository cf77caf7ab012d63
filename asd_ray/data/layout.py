"""DCASE directory layouts -> typed clip records.

Reads roots laid out as DCASE 2021-2025 Task 2 (``<root>/{dev,eval}_data/raw/<machine>/{train,test,
supplemental}/section_...wav``), DCASE 2020 (``normal_id_00_00000000.wav``) and MIMII / MIMII DG
(``<machine>/id_XX/{normal,abnormal}/*.wav``). Every wav file found becomes a record; a name that
parses in no known form is a record with label ``unknown`` and its ``parse_error`` set, so nothing
is dropped silently.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

DEV_MACHINES = ("ToyCar", "ToyTrain", "bearing", "fan", "gearbox", "slider", "valve")
EVAL_MACHINES = (
    "ToyRCCar", "ToyPet", "HomeCamera", "AutoTrash", "Polisher", "ScrewFeeder", "BandSealer", "CoffeeGrinder",
)
# DCASE 2026 Task 2: two-channel clips (near, far microphone), no supplemental clips
# the synthetic 2026 corpus's noise styles (data/synth_2026.py), the first the default
NOISE_STYLES_2026 = ("direct", "diffuse")
DEV_MACHINES_2026 = ("ToyCar", "ToyCarEmu", "bearingEmu", "fan", "gearboxEmu", "sliderEmu", "valveEmu")
EVAL_MACHINES_2026 = ("ToyDrone", "ToothBrush", "SewingMachine", "BlowerDustCollector", "Sander")
SPLITS = ("train", "test", "supplemental")

_SECTION_FORM = re.compile(
    r"^section_(?P<section>\d{2})_(?P<domain>source|target)_(?P<split>train|test)_"
    r"(?P<label>normal|anomaly)_(?P<index>\d{4,})(?:_(?P<attrs>.+))?\.wav$"
)
_SUPPLEMENTAL_FORM = re.compile(
    r"^section_(?P<section>\d{2})_(?P<domain>source|target)_supplemental_"
    r"(?P<kind>clean|noise)_(?P<index>\d{4,})(?:_(?P<attrs>.+))?\.wav$"
)
_UNLABELED_FORM = re.compile(r"^section_(?P<section>\d{2})_(?P<index>\d{4,})\.wav$")
_DCASE2020_FORM = re.compile(r"^(?P<label>normal|anomaly)_id_(?P<section>\d{2})_(?P<index>\d+)\.wav$")
_MIMII_ID = re.compile(r"^id_(?P<section>\d{2})$")


class LayoutError(ValueError):
    """A root, machine directory or ground-truth file that is missing or malformed."""


@dataclass(frozen=True)
class ClipRecord:
    """One audio file of a corpus, with everything its path tells.

    ``label`` is ``normal`` / ``anomaly`` / ``unknown`` (eval test clips, unparsed names);
    ``domain`` is ``source`` / ``target`` / ``unknown``; ``kind`` is ``clean`` / ``noise`` for
    supplemental clips and empty otherwise; ``parse_error`` is empty when the name parsed.
    """

    path: str
    machine: str
    section: str
    domain: str
    split: str
    label: str
    index: int
    attributes: str = ""
    dataset: str = "dev"  # dev / eval / other (MIMII, 2020)
    kind: str = ""
    parse_error: str = ""

    @property
    def filename(self) -> str:
        return Path(self.path).name

    @property
    def is_normal_train(self) -> bool:
        """A clip known to be a normal training clip: the only kind that feeds banks and fine-tuning."""
        return self.split == "train" and self.label == "normal" and not self.parse_error

    def to_row(self) -> dict:
        return dataclasses.asdict(self)


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(ClipRecord))


def attribute_dict(attributes: str) -> dict[str, str]:
    """``"car_A1_spd_28V"`` -> ``{"car": "A1", "spd": "28V"}``; ``noAttribute`` -> ``{}``."""
    if not attributes or attributes == "noAttribute":
        return {}
    parts = attributes.split("_")
    if len(parts) % 2:
        return {"attr": attributes}
    return dict(zip(parts[0::2], parts[1::2]))


def parse_clip_name(path: Path, machine: str, split: str, dataset: str) -> ClipRecord:
    """Parse one DCASE 2020-2025 file name into a record (``parse_error`` set when no form fits)."""
    name = path.name
    base = dict(path=str(path), machine=machine, split=split, dataset=dataset)
    if m := _SECTION_FORM.match(name):
        if m["split"] != split and split in ("train", "test"):
            return ClipRecord(**base, section="", domain="unknown", label="unknown", index=-1,
                              parse_error=f"name says split {m['split']!r} but the file is in {split}/")
        return ClipRecord(**base, section=m["section"], domain=m["domain"], label=m["label"],
                          index=int(m["index"]), attributes=m["attrs"] or "")
    if m := _SUPPLEMENTAL_FORM.match(name):
        return ClipRecord(**{**base, "split": "supplemental"}, section=m["section"], domain=m["domain"],
                          label="normal" if m["kind"] == "clean" else "unknown", index=int(m["index"]),
                          attributes=m["attrs"] or "", kind=m["kind"])
    if m := _UNLABELED_FORM.match(name):
        return ClipRecord(**base, section=m["section"], domain="unknown", label="unknown", index=int(m["index"]))
    if m := _DCASE2020_FORM.match(name):
        return ClipRecord(**base, section=m["section"], domain="source", label=m["label"], index=int(m["index"]))
    return ClipRecord(**base, section="", domain="unknown", label="unknown", index=-1,
                      parse_error="file name matches no DCASE naming form")


def _wavs(directory: Path) -> list[Path]:
    """Every entry named ``*.wav``, files or not: one that is no file (a directory named like a clip, a
    dangling link) still becomes a record, whose ``not_a_file`` reason lists it instead of dropping it."""
    return sorted(p for p in directory.iterdir() if p.suffix.lower() == ".wav")


def not_a_file(path: Path) -> str:
    """Why an entry named like a clip cannot be one ("" for a regular file, or a link to one)."""
    if path.is_file():
        return ""
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link (points to {os.readlink(path)})"
    if path.is_dir():
        return "a directory named like a clip, not a sound file"
    return "not a regular file"


def _machine_dirs(root: Path) -> list[tuple[str, Path]]:
    """(dataset, machine dir) pairs of a DCASE root (2021+: ``*_data/raw/<m>``; 2020: ``*_data/<m>``)."""
    found = []
    for dataset in ("dev", "eval"):
        base = root / f"{dataset}_data"
        if (base / "raw").is_dir():
            base = base / "raw"
        if base.is_dir():
            found += [(dataset, d) for d in sorted(base.iterdir())
                      if d.is_dir() and any((d / s).is_dir() for s in SPLITS)]
    return found


def _mimii_records(root: Path) -> list[ClipRecord]:
    records = []
    for machine_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for id_dir in sorted(d for d in machine_dir.iterdir() if d.is_dir() and _MIMII_ID.match(d.name)):
            section = _MIMII_ID.match(id_dir.name)["section"]
            for label_dir, label in (("normal", "normal"), ("abnormal", "anomaly")):
                for i, p in enumerate(_wavs(id_dir / label_dir) if (id_dir / label_dir).is_dir() else []):
                    records.append(ClipRecord(path=str(p), machine=machine_dir.name, section=section,
                                              domain="source", split="train" if label == "normal" else "test",
                                              label=label, index=i, dataset="other", parse_error=not_a_file(p)))
    return records


def _machine_records(dataset: str, machine_dir: Path, normals_only: bool) -> list[ClipRecord]:
    records = []
    for split in SPLITS:
        d = machine_dir / split
        if not d.is_dir():
            continue
        for p in _wavs(d):
            rec = parse_clip_name(p, machine_dir.name, split, dataset)
            if reason := not_a_file(p):
                rec = dataclasses.replace(rec, parse_error=reason)
            elif rec.parse_error and normals_only and split == "train":
                rec = dataclasses.replace(rec, label="normal", domain="source", section="00",
                                          parse_error="")
            records.append(rec)
    return records


def discover_root(root: str | Path, machines: Iterable[str] | None = None, normals_only: bool = False
                  ) -> list[ClipRecord]:
    """All clip records under one root, sorted by path.

    ``machines`` restricts to those machine directories (a missing one is a LayoutError);
    ``normals_only`` trusts unparsed names under ``train/`` as normal train clips.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"data root not found: {root}")
    pairs = _machine_dirs(root)
    if pairs:
        records = [r for ds, d in pairs for r in _machine_records(ds, d, normals_only)]
    else:
        records = _mimii_records(root)
    if not records and not pairs:
        raise LayoutError(f"{root}: no DCASE (dev_data/eval_data/raw/<machine>) or MIMII layout found")
    if machines is not None:
        wanted = list(machines)
        present = {r.machine for r in records} | {d.name for _, d in pairs}
        missing = [m for m in wanted if m not in present]
        if missing:
            raise LayoutError(f"{root}: machine director{'y' if len(missing) == 1 else 'ies'} not found: {missing}")
        records = [r for r in records if r.machine in set(wanted)]
    return sorted(records, key=lambda r: r.path)


def discover(roots: Iterable[str | Path], machines: Iterable[str] | None = None,
             normals_only_roots: Iterable[str | Path] = ()) -> list[ClipRecord]:
    """Records of a corpus (a list of roots). Roots in ``normals_only_roots`` are trusted to hold normals."""
    trusted = {Path(r).resolve() for r in normals_only_roots}
    machines = list(machines) if machines is not None else None
    out: list[ClipRecord] = []
    for root in roots:
        out.extend(discover_root(root, machines, normals_only=Path(root).resolve() in trusted))
    return out


def summarise(records: Iterable[ClipRecord]) -> dict:
    """Counts per (dataset, machine, split, domain, label) and the list of unparsed files with reasons."""
    records = list(records)
    counts = Counter((r.dataset, r.machine, r.split, r.domain, r.label) for r in records)
    return {
        "clips": len(records),
        "counts": {"/".join(k): v for k, v in sorted(counts.items())},
        "unparsed": [{"path": r.path, "reason": r.parse_error} for r in records if r.parse_error],
        "unlabeled": sum(1 for r in records if r.label == "unknown" and not r.parse_error and r.split == "test"),
    }


def read_attributes_csv(path: str | Path) -> dict[str, str]:
    """``attributes_00.csv`` -> {file name: attribute string as in the file name suffix}."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"attributes file not found: {path}")
    out = {}
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or header[0] != "file_name":
            raise LayoutError(f"{path}: first column must be file_name, got {header}")
        for row in reader:
            if not row:
                continue
            values = [v for v in row[1:] if v != ""]
            out[Path(row[0]).name] = "_".join(values) if values else "noAttribute"
    return out


TRUTH_TABLES = ("ground_truth_data", "ground_truth_domain", "ground_truth_attributes")


def ground_truth_paths(root: str | Path, machine: str, section: str = "00", dataset: str = "eval"
                       ) -> tuple[Path, Path, Path]:
    """Where the official evaluator's label, domain and attribute tables of a machine live under a root:
    ``<root>/<dataset>_data/{ground_truth_data,ground_truth_domain,ground_truth_attributes}/
    ground_truth_<machine>_section_<ss>_test.csv``. Rows, no header: ``<test file name>,<0 normal | 1 anomaly>``,
    ``<test file name>,<0 source | 1 target>`` and ``<test file name>,<its labelled name without .wav>``."""
    base = Path(root) / f"{dataset}_data"
    name = f"ground_truth_{machine}_section_{section}_test.csv"
    return tuple(base / table / name for table in TRUTH_TABLES)  # type: ignore[return-value]
