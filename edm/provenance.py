"""What made an output folder, and what a training run's folder holds.

A command claims its output folder with `claim(out, record)` before its first result: the record (provenance.json)
holds every setting that changes the results (edm-sample's: the checkpoint's content hash, solver, time grid,
schedule, guidance, labels, dtype, precision, ...). A later run into the same folder continues it only when its
record is equal; otherwise it is refused with the differing keys and the two ways out. `run_marks` recognizes a
training run's folder by the names below, so that no command takes one for its output folder.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable

from .files import differences, read_record, to_container, write_json

__all__ = ["PROVENANCE_NAME", "ProvenanceError", "claim", "refuse_foreign_folder", "run_marks", "other_records",
           "FOLDER_RECORDS", "CHECKPOINT_FILE", "CHECKPOINT_NAME", "METRICS_NAME", "SNAPSHOT_DIR", "SNAPSHOT_FILE",
           "SNAPSHOT_GLOB", "list_checkpoints"]

# A training run's folder, named once for every command that writes or recognizes one (run_marks): its checkpoints
# checkpoint-<step>.pt, its metrics.jsonl and its power-EMA snapshots phema/snapshot-<cur_nimg>.safetensors.
CHECKPOINT_FILE = "checkpoint-{:08d}.pt"  # of the step
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
METRICS_NAME = "metrics.jsonl"
SNAPSHOT_DIR = "phema"
SNAPSHOT_FILE = "snapshot-{:012d}.safetensors"  # of the training images seen
SNAPSHOT_GLOB = "snapshot-*.safetensors"  # the snapshot files of a folder

PROVENANCE_NAME = "provenance.json"
# Keys a folder's record may lack (its writer did not record them): compared only where the record has them.
MAY_LACK_SUFFIXES = ("_model_json_sha256",)


class ProvenanceError(ValueError):
    """An output folder holds results made with other settings (or of unknown origin): `finding` says what
    was found, the message adds the ways out (which a caller with other options may replace)."""

    def __init__(self, finding: str, ways_out: str):
        super().__init__(finding, ways_out)
        self.finding, self.ways_out = finding, ways_out

    def __str__(self) -> str:
        return f"{self.finding}; {self.ways_out}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint in run_dir, by step; temp files never match."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def run_marks(folder: str | Path) -> list[str]:
    """What makes `folder` a training run's folder, or its power-EMA snapshots' folder: its latest checkpoint's name,
    a metrics.jsonl with records, its snapshots; empty for any other folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    checkpoints = list_checkpoints(folder)
    metrics = folder / METRICS_NAME
    marks = [checkpoints[-1][1].name] if checkpoints else []
    marks += [METRICS_NAME] if metrics.is_file() and metrics.stat().st_size > 0 else []
    for place, name in ((folder / SNAPSHOT_DIR, f"{SNAPSHOT_DIR}/"), (folder, "")):
        if any(place.glob(SNAPSHOT_GLOB)):
            marks.append(f"power-EMA snapshots {name}".rstrip())
    return marks


# The record a command keeps in its output folder: results (edm-sample, edm-study, edm-posthoc, edm-encode) or a
# model (edm-export, edm-convert-nvlabs).
FOLDER_RECORDS = {PROVENANCE_NAME: "results folder", "model.json": "model folder"}


def other_records(folder: str | Path, own: str | None = None) -> list[str]:
    """The FOLDER_RECORDS files in `folder` other than `own`: another kind of command's output folder."""
    return [name for name in FOLDER_RECORDS if name != own and (Path(folder) / name).is_file()]


def refuse_foreign_folder(out_dir: str | Path, own: str = PROVENANCE_NAME, out_key: str = "out",
                          command: str | None = None) -> None:
    """Refuse an output folder that is a training run's (run_marks: its samples, plots, snapshots and .hydra record
    are the run's, and overwrite=true would delete them) or holds another kind of command's record than `own` (a
    model folder for a sampler, a results folder for an export), or, given `command`, a results folder of another
    command (as `claim` does: for a command that claims its folder only after its work)."""
    marks = run_marks(out_dir)
    if marks:
        raise ValueError(f"{out_key}={out_dir} is a training run's folder (it holds {marks[0]}), not an output folder "
                         f"of its own: give another {out_key}=DIR (e.g. {Path(out_dir) / 'samples'})")
    other = other_records(out_dir, own)
    if other:
        raise ValueError(f"{out_key}={out_dir} is a {FOLDER_RECORDS[other[0]]} of another command (it holds {other[0]}), "
                         f"not one for this command's {FOLDER_RECORDS[own].split()[0]}: give another {out_key}=DIR")
    if command is not None:
        _refuse_other_command(Path(out_dir), command, out_key)


def _canonical(record: dict) -> dict:
    """The record as JSON gives it back (tuples become lists, keys strings)."""
    return json.loads(json.dumps(to_container(record)))


def _saved_command(path: Path) -> str | None:
    """The command a provenance.json names (None: no readable record, or one that names none)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("command") if isinstance(saved, dict) else None


def _refuse_other_command(out_dir: Path, command: str, out_key: str) -> None:
    """Refuse a folder whose provenance.json names another command than `command`."""
    other = _saved_command(out_dir / PROVENANCE_NAME)
    if other not in (None, command):
        raise ProvenanceError(f"{out_key}={out_dir} is {other}'s results folder, not {command}'s",
                              f"give {command} another {out_key}=DIR")


LISTED_DIFFERENCES = 6  # a refusal names this many differing settings (by key), then counts the rest


def claim(out_dir: str | Path, record: dict, results: Iterable[Path], *, command: str, overwrite: bool = False,
          overwrite_key: str = "overwrite=true", out_key: str = "out") -> None:
    """Make `out_dir` hold results of `record`, made by `command`, only: a folder whose record names another
    command is refused whatever `overwrite` says (its results are not this command's to delete); with overwrite,
    delete `results` (the folder's earlier outputs) first; else refuse a folder whose provenance.json differs from
    `record` (naming the first LISTED_DIFFERENCES differing keys, counting the rest) or that holds results without one; then write the record with its command.
    A record that names no command, or lacks a MAY_LACK_SUFFIXES key, is compared without that key, then written
    with it."""
    out_dir = Path(out_dir)
    path = out_dir / PROVENANCE_NAME
    _refuse_other_command(out_dir, command, out_key)
    results = [p for p in results if p.exists()]
    if overwrite:
        for p in results:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        path.unlink(missing_ok=True)
        results = []
    record = _canonical({"command": command, **record})
    unrecorded = lambda key: key == "command" or key.endswith(MAY_LACK_SUFFIXES)  # noqa: E731

    def ways_out(what: str = "the old results") -> str:
        return f"write to another {out_key}=DIR, or pass {overwrite_key} to delete {what} first"

    if path.is_file():
        try:
            saved = read_record(path)
        except (OSError, ValueError) as err:
            raise ProvenanceError(f"{path} is unreadable ({err})", ways_out()) from None
        diffs = [(k, a, b) for k, a, b in differences(saved, record) if not (a is None and k not in saved
                                                                              and unrecorded(k))]
        if diffs:
            listed = "; ".join(f"{k}: folder {a!r}, now {b!r}" for k, a, b in diffs[:LISTED_DIFFERENCES])
            if len(diffs) > LISTED_DIFFERENCES:
                listed += f"; and {len(diffs) - LISTED_DIFFERENCES} more"
            raise ProvenanceError(f"{out_dir} holds results made with other settings ({listed})", ways_out())
        if saved.keys() != record.keys():  # keys the folder's record lacked: from here on they are compared too
            write_json(path, record)
        return
    if results:
        raise ProvenanceError(
            f"{out_dir} holds what this command writes ({len(results)}: {', '.join(p.name for p in results[:3])}"
            f"{', ...' if len(results) > 3 else ''}) but no {PROVENANCE_NAME} that says what made it: it may not be "
            "results at all", ways_out("it"))
    write_json(path, record)
