"""One cgroup per sandboxed program: the kernel's bound on its total memory and task count.

Why: rlimits are per process, so a program's processes together, and memory that no address space
holds (memfd, SysV shared memory, tmpfs pages, pipe and socket buffers, kernel objects), escape
them. A memory cgroup charges all of it to the program, and a pids cgroup counts every task
(thread or process) it starts, whatever user or namespace they run as.

Where: cgroup v1 with the ``memory`` and ``pids`` controllers in hierarchies this process may write
(as root, under its own cgroup), or cgroup v2 where this process may create a child group in which
both controllers are already enabled (a delegated subtree, or the hierarchy's root as root). Elsewhere (most
unprivileged callers) ``cgroup_root()`` is None and the sandbox says so in its isolation note.
A cgroup left behind by a killed evaluator is an empty directory named ``prunelens-*``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class CgroupRoot:
    """Where per-program cgroups are made: v1, one parent per controller (memory, pids); v2, one."""

    version: int
    parents: tuple[str, ...]

    def describe(self) -> str:
        return f"cgroup v{self.version} under {', '.join(self.parents)}"


@dataclass(frozen=True)
class Cgroup:
    """A live per-program cgroup: its directories (one per v1 controller, or the one v2 group)."""

    root: CgroupRoot
    dirs: tuple[str, ...]

    @property
    def procs_files(self) -> tuple[str, ...]:
        return tuple(os.path.join(d, "cgroup.procs") for d in self.dirs)

    def kill(self) -> None:
        """SIGKILL every task left in it (v2's ``cgroup.kill`` where present), until none is."""
        kill_file = os.path.join(self.dirs[0], "cgroup.kill")
        if self.root.version == 2 and os.path.exists(kill_file):
            _write(kill_file, "1")
        for _ in range(100):
            pids = {p for f in self.procs_files for p in _read(f).split()}
            if not pids:
                return
            for pid in pids:
                _kill_if_inside(int(pid), os.path.basename(self.dirs[0]))
            time.sleep(0.01)

    def peak_mb(self) -> float | None:
        """The most memory the program held at once (None where the kernel does not say)."""
        name = "memory.max_usage_in_bytes" if self.root.version == 1 else "memory.peak"
        text = _read(os.path.join(self.dirs[0], name)).strip()
        return int(text) / 2**20 if text.isdigit() else None

    def remove(self) -> None:
        """rmdir each directory, waiting briefly for exiting tasks to leave."""
        for d in self.dirs:
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _kill_if_inside(pid: int, name: str) -> None:
    """SIGKILL ``pid`` if it is still in the cgroup ``name``: a pidfd pins the process, so an id
    reused since ``cgroup.procs`` was read is left alone."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # no pidfds (Linux < 5.3): the id was listed a moment ago
        return
    try:
        if f"/{name}" in _read(f"/proc/{pid}/cgroup"):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def create(root: CgroupRoot, memory_mb: int, tasks: int) -> Cgroup:
    """A fresh cgroup under ``root`` holding at most ``memory_mb`` (swap included) and ``tasks`` tasks."""
    name = f"prunelens-{secrets.token_hex(6)}"
    dirs = tuple(os.path.join(p, name) for p in root.parents)
    made: list[str] = []
    try:
        for d in dirs:
            os.mkdir(d, 0o755)
            made.append(d)
        limit = str(memory_mb << 20)
        if root.version == 1:
            _write(os.path.join(dirs[0], "memory.limit_in_bytes"), limit)
            _write(os.path.join(dirs[0], "memory.memsw.limit_in_bytes"), limit, optional=True)  # absent without swap
            _write(os.path.join(dirs[1], "pids.max"), str(tasks))
        else:
            _write(os.path.join(dirs[0], "memory.max"), limit)
            _write(os.path.join(dirs[0], "memory.swap.max"), "0", optional=True)
            _write(os.path.join(dirs[0], "pids.max"), str(tasks))
    except OSError:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    return Cgroup(root, dirs)


@functools.cache
def cgroup_root() -> CgroupRoot | None:
    """Where this process can make a per-program cgroup with memory and pids limits, else None."""
    if not os.path.exists("/proc/self/cgroup"):
        return None
    for root in (*_v1_roots(), *_v2_roots()):
        try:
            create(root, 64, 8).remove()
        except OSError:
            continue
        return root
    return None


def _mounts(fstype: str) -> list[tuple[str, set[str]]]:
    """(mount point, options) of every mount of ``fstype``."""
    out = []
    for line in _read("/proc/self/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == fstype:
            out.append((parts[1].replace("\\040", " "), set(parts[3].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its v2 path."""
    out: dict[str, str] = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _v1_roots() -> list[CgroupRoot]:
    own, parents = _own_paths(), []
    for c in CONTROLLERS:
        mount = next((m for m, opts in _mounts("cgroup") if c in opts), None)
        if mount is None or c not in own:
            return []
        parents.append(os.path.join(mount, own[c].lstrip("/")))
    return [CgroupRoot(1, tuple(parents))]


def _v2_roots() -> list[CgroupRoot]:
    """This process's own v2 group (a delegated subtree), then the hierarchy's root."""
    own = _own_paths().get("")
    mounts = [m for m, _ in _mounts("cgroup2")]
    if own is None or not mounts:
        return []
    out = []
    for parent in dict.fromkeys((os.path.join(mounts[0], own.lstrip("/")), mounts[0])):
        # only where both controllers are already enabled for children: enabling them is the
        # host's decision (and impossible in a group that holds processes, like our own)
        if set(CONTROLLERS) <= set(_read(os.path.join(parent, "cgroup.subtree_control")).split()):
            out.append(CgroupRoot(2, (parent,)))
    return out


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _write(path: str, text: str, optional: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        if not optional:
            raise
