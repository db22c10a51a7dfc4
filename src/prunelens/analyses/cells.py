"""The resumable cell cache: long runs (sweeps, comparisons, validations) as finished cells on disk.

A cache directory holds a manifest with the run's *identity* — everything that changes a cell's
value: the settings, the model, dtype and device, the content hashes of the data files, and the
package versions — and one JSON file per finished cell, written atomically. Rerunning resumes: the
identity must match (else a one-line error names the first differing setting), finished cells are
read back, and only missing cells are computed.

Several workers (a scheduler's job array, with the directory on shared storage) may fill one cache:
a worker *claims* a cell before computing it (``claim``: a ``.claim`` file created exclusively) and
skips cells another live worker holds, so every cell is computed once and written whole.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError
from prunelens.model.loading import file_sha256
from prunelens.runs import check_writable_parent, is_write_temp, json_safe, read_json, write_json
from prunelens.version import __version__


def environment(device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Versions and numerics that change results: prunelens, torch, transformers, device, dtype."""
    import torch
    import transformers

    return {"prunelens": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "device": device, "dtype": dtype}


def model_fingerprint(model: str) -> dict[str, Any]:
    """What identifies the model's weights without reading them: a preset or hub id by name (a
    preset pins its package version and file), a local directory or .gguf file by the size and
    modification time of its config and weight files (hashing 140 GB for every resume is not
    affordable; a rewritten checkpoint changes them)."""
    p = Path(model).expanduser()
    if not p.exists():
        return {"name": model}
    files = [p] if p.is_file() else sorted(q for q in p.iterdir() if q.is_file() and
                                           q.suffix in (".json", ".safetensors", ".bin", ".gguf"))
    return {"name": model, "files": {q.name: [q.stat().st_size, q.stat().st_mtime_ns] for q in files}}


def data_hashes(paths: Iterable[str | Path]) -> dict[str, str]:
    """Content hashes of data files (a directory: of every file in it), by path."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            out[str(q)] = file_sha256(q)
    return out


def first_difference(a: Any, b: Any, path: str = "", names: tuple[str, str] = ("before", "now")) -> str | None:
    """The dotted path of the first setting where two identities differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), names)
            if d:
                return d
        return None
    return None if a == b else f"{path or 'identity'}: {a!r} {names[0]}, {b!r} {names[1]}"


def cell_name(key: str) -> str:
    """A cell key as a file name: anything but letters, digits and ``-_.@`` becomes ``_``."""
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in key)


class CellCache:
    """Finished cells of one run under ``out``, keyed by strings; see the module docstring.
    ``adopt`` takes over a directory written before it had a manifest (its cells are kept)."""

    def __init__(self, out: str | Path, manifest: str, what: str, identity: dict[str, Any],
                 overwrite: bool = False, cells: str = "cells", adopt: bool = False):
        self.out, self.manifest, self.what, self.cells = Path(out), Path(out) / manifest, what, cells
        self.identity = json.loads(json.dumps(json_safe(identity)))
        if self.out.exists() and not self.out.is_dir():
            raise PrunelensError(f"'{self.out}' exists and is not a directory")
        check_writable_parent(self.out)
        if self.manifest.is_file() and not overwrite:
            old = read_json(self.manifest)
            diff = first_difference(old.get("identity") if isinstance(old, dict) else None, self.identity)
            if diff:
                raise PrunelensError(f"'{self.out}' holds a {what} with different settings ({diff}); for "
                                     "other settings or prompts use another --out, or --overwrite")
        elif self.out.is_dir() and not adopt and not self.manifest.is_file() and self._foreign():
            raise PrunelensError(f"'{self.out}' is not empty and is not a prunelens {what} directory")
        self.overwrite = overwrite

    def _foreign(self) -> bool:
        """Whether ``out`` holds anything but what another worker's ``open`` is writing right now (an
        empty cells folder, the manifest's temp file): racing workers must not refuse each other."""
        for q in self.out.iterdir():
            if q.name == self.cells and q.is_dir() and not any(q.iterdir()):
                continue
            if q.name == self.manifest.name or is_write_temp(q.name, self.manifest.name):
                continue
            return True
        return False

    def open(self, **manifest: Any) -> CellCache:
        """Create the directory (emptied first with ``overwrite``) and write the manifest."""
        if self.overwrite and self.out.is_dir():
            shutil.rmtree(self.out)
        (self.out / self.cells).mkdir(parents=True, exist_ok=True)
        write_json(self.manifest, {**manifest, "identity": self.identity})
        return self

    def path(self, key: str) -> Path:
        return self.out / self.cells / f"{cell_name(key)}.json"

    def run_dir(self, key: str) -> Path:
        """A cell that is a whole run directory (results.json, figures, report) under runs/."""
        return self.out / "runs" / cell_name(key)

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> Any:
        return read_json(self.path(key))

    def save(self, key: str, value: Any) -> None:
        write_json(self.path(key), value)


# --- claims: several workers on one cache directory ---------------------------------------------


def claim_path(cell: Path) -> Path:
    """Where a worker's claim on ``cell`` lies (a job killed on another host leaves it behind)."""
    return cell.with_name(cell.name + ".claim")


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


CLAIM_WRITE_S = 30.0  # a claim file still unreadable after this long was not being written: abandoned


def _holder(lock: Path) -> dict[str, Any] | None:
    try:
        held = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else {}


def _valid(holder: dict[str, Any]) -> bool:
    """A claim names its worker: a host name and a process id (a positive whole number)."""
    pid, host = holder.get("pid"), holder.get("host")
    return isinstance(host, str) and bool(host) and type(pid) is int and 0 < pid < 2**31


def _alive(holder: dict[str, Any]) -> bool:
    """A claim's worker still runs: a process on this host is asked; a worker on another host is
    assumed alive (its claim file says who to check; delete the file if that worker died). A claim
    that names no valid worker is nobody's: dead (``os.kill`` of a missing pid, -1, would ask about
    every process and so keep the cell from ever being computed)."""
    if not _valid(holder):
        return False
    if holder["host"] != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(lock: Path, held: dict[str, Any] | None) -> bool:
    """Whether a claim may be taken over, saying why on stderr (even when quiet: a cell computed
    again, or a claim file that is not one, must not pass unnoticed)."""
    if held is None:  # unreadable: being written right now, unless it has been so for long
        try:
            if time.time() - lock.stat().st_mtime < CLAIM_WRITE_S:
                return False
        except OSError:
            return False
        why = "is unreadable"
    elif not _valid(held):
        why = f"names no valid worker ({json.dumps(held)[:80]})"
    elif _alive(held):
        return False
    else:
        why = f"was left by worker {held['host']}:{held['pid']}, which is gone"
    print(f"prunelens: claim '{lock}' {why}; taking the cell over", file=sys.stderr)
    return True


def claim(cell: Path) -> bool:
    """Take ``cell`` for this worker; False if it is finished or a live worker holds it.

    O_EXCL creation is atomic on local and NFS v3+ file systems. A claim left by a dead worker on
    this host is moved aside (atomically, so of two workers reclaiming it only one wins) and retaken.
    """
    lock = claim_path(cell)
    for _ in range(3):
        if cell.is_file():
            return False
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            held = _holder(lock)
            if not _abandoned(lock, held):
                return False
            aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{secrets.token_hex(3)}")
            try:
                os.rename(lock, aside)
            except FileNotFoundError:
                continue
            if _holder(aside) != held:  # we moved a fresh claim of another worker: put it back
                try:
                    os.link(aside, lock)
                except FileExistsError:
                    pass
                os.unlink(aside)
                return False
            os.unlink(aside)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({**_me(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        if cell.is_file():  # finished by another worker between our check and our claim
            release(cell)
            return False
        return True
    return False


def release(cell: Path) -> None:
    """Drop this worker's claim on ``cell`` (after writing it, or when its computation failed)."""
    lock = claim_path(cell)
    held = _holder(lock)
    if held is not None and {k: held.get(k) for k in ("host", "pid")} == _me():
        lock.unlink(missing_ok=True)


def claimed_by(cell: Path) -> str | None:
    """``host:pid`` of the live worker holding an unfinished cell, else None."""
    held = _holder(claim_path(cell))
    if not held or cell.is_file() or not _alive(held):
        return None
    return f"{held.get('host')}:{held.get('pid')}"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``K/N`` (1 ≤ K ≤ N): this worker takes cells K, K+N, K+2N, … of the grid, in grid order."""
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PrunelensError(f"--shard takes K/N with whole numbers (e.g. 2/4), got '{text}'") from None
    if not 1 <= k <= n:
        raise PrunelensError(f"--shard {text}: K must be between 1 and N")
    return k, n


def in_shard(index: int, shard: tuple[int, int] | None) -> bool:
    return shard is None or index % shard[1] == shard[0] - 1


# Slurm's array variables (sbatch(1), "OUTPUT ENVIRONMENT VARIABLES"): an array --array=MIN-MAX:STEP
# runs COUNT tasks with ids MIN, MIN+STEP, …; a list (--array=1,4,9) has no single step.
SLURM_ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX")


def shard_from_slurm(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """This job's ``(K, N)`` inside a Slurm job array, from its environment; None outside one.

    K counts the array's tasks from 1 in id order, so ``--array=3-8`` and ``--array=0-10:2`` both
    give K = 1 … N. An id the arithmetic does not place (a list array, an id outside MIN–MAX) is a
    one-line error: ``--shard K/N`` then says which share is meant."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    try:
        tid, count, lo, hi = (int(environ[k]) for k in SLURM_ARRAY)
        step = int(environ.get("SLURM_ARRAY_TASK_STEP") or 1)
    except (KeyError, ValueError):
        got = ", ".join(f"{k}={environ.get(k)!r}" for k in SLURM_ARRAY)
        raise PrunelensError(f"a Slurm array job without whole-number array variables ({got}); "
                             "give --shard K/N") from None
    where = f"SLURM_ARRAY_TASK_ID={tid} in an array {lo}-{hi}:{step} of {count} tasks"
    if step < 1 or (hi - lo) // step + 1 != count:
        raise PrunelensError(f"{where}: not an evenly stepped range (a list array?); give --shard K/N")
    if not lo <= tid <= hi or (tid - lo) % step:
        raise PrunelensError(f"{where}: the task id is outside the array; give --shard K/N")
    return (tid - lo) // step + 1, count


# --- a cell that failed leaves its error beside it, in the run folder ---------------------------


def _error_file(cell: Path) -> Path:
    return cell.with_name(cell.name + ".error")


def record_failure(cell: Path, error: BaseException) -> None:
    """Write why computing ``cell`` failed, where ``report`` finds it (a worker's scheduler log may
    be on another machine or gone); the cell itself stays unwritten."""
    write_json(_error_file(cell), {**_me(), "error": f"{type(error).__name__}: {error}",
                                   "traceback": traceback.format_exception(error)[-6:],
                                   "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def clear_failure(cell: Path) -> None:
    _error_file(cell).unlink(missing_ok=True)


def failure(cell: Path) -> str | None:
    """The recorded error of an unfinished cell (one line), else None."""
    path = _error_file(cell)
    if cell.is_file() or not path.is_file():
        return None
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"failed (its error file {path.name} is unreadable)"
    return str(held.get("error", "failed")).splitlines()[0][:200] if isinstance(held, dict) else "failed"
