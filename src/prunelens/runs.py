"""Run directories: results.json + figures/ + report.html, written atomically.

A run directory either holds a complete result or does not exist: everything is written into a
hidden temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prunelens.errors import PrunelensError


def json_safe(x: Any) -> Any:
    """Replace NaN/inf with None and numpy scalars with Python numbers (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON, atomically (concurrent writers of one file each use their own temp file)."""
    atomic_write_text(Path(path), json.dumps(json_safe(obj), indent=1, allow_nan=False))


def check_writable_parent(out: Path) -> None:
    """The directory that will hold ``out`` exists or can be made, and a file can be created there
    (probed, then removed): an unwritable --out fails before any work, in one line."""
    probe_writable_dir(Path(out).absolute().parent, f".{Path(out).name}", f"cannot write '{out}'")


def probe_writable_dir(folder: Path, stem: str, failure: str) -> None:
    """Make ``folder`` if needed and create then remove a probe file in it; an ``OSError`` becomes one
    line starting with ``failure``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f"{stem}.probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise PrunelensError(f"{failure}: {e.strerror or e}") from None


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Fail early (before any model work) if the run directory cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunelensError(f"'{out}' exists and is not a directory")
    if out.exists() and not overwrite:
        raise PrunelensError(f"output directory '{out}' already exists (use --overwrite)")
    if out.exists() and not (out / "results.json").exists():
        raise PrunelensError(f"'{out}' exists and is not a prunelens run directory; not overwriting it")
    check_writable_parent(out)


def check_out_file(out: Path, overwrite: bool) -> None:
    """The same for a single output file (eval/ppl --out, report --out)."""
    out = Path(out)
    if out.is_dir():
        raise PrunelensError(f"'{out}' is a directory; --out takes a file")
    if out.exists() and not overwrite:
        raise PrunelensError(f"output file '{out}' already exists (use --overwrite)")
    check_writable_parent(out)


def default_run_dir(model: str, label: str, root: str | Path = "runs") -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.@+" else "-" for c in f"{Path(model).name}-{label}")
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}"


def write_run(result: dict[str, Any], out_dir: str | Path, overwrite: bool = False, *,
              figures: Callable[[dict[str, Any], Path], list[Path]],
              html: Callable[[dict[str, Any], list[Path]], str]) -> Path:
    """Write results.json, figures/*.png and report.html into ``out_dir`` atomically.

    The caller's analysis draws the run: ``figures`` writes the PNGs into the folder it is given
    and returns them, ``html`` makes the page from the result and those figures.
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    with atomic_dir(out) as tmp:
        write_json(tmp / "results.json", result)
        figs = figures(result, tmp / "figures")
        (tmp / "report.html").write_text(html(result, figs), encoding="utf-8")
    return out


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """The one writer of whole folders (run folders, saved checkpoints): yields a hidden temporary
    sibling of ``out`` that is renamed into place only when the block ends without error, so an
    interrupted or killed writer leaves nothing at ``out`` (a previous ``out`` stays whole until the
    new one is in place, and is put back on failure). Temporaries of killed writers are removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporaries of ``out`` left by a killed run (their process is gone): removed, and an old run
    that a killed --overwrite had set aside is put back if nothing replaced it."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name.rpartition("-")
        if not (pid.isdigit() and kind.endswith((".tmp", ".old"))) or _alive(int(pid)):
            continue
        if kind.endswith(".old") and not out.exists():
            os.replace(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json(path: Path) -> Any:
    """A saved JSON file, with a one-line error naming it when it is unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrunelensError(f"'{path}' is not valid JSON: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise PrunelensError(f"cannot read '{path}': {e.strerror or e}") from None


def is_write_temp(name: str, target: str) -> bool:
    """Whether a file name is ``atomic_write_text``'s temp file for ``target`` (another writer's,
    mid-write), so directory checks can tell it from a foreign file."""
    return name.startswith(f".{target}.") and name.endswith(".tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file in the same directory + os.replace, so readers never see half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # see is_write_temp
    # os.open with 0o666 honours the umask (mkstemp would leave the report readable by its owner only)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temp file beside ``path``, then os.replace: a file another library writes
    (safetensors) is never seen half-written under its final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # see is_write_temp
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
