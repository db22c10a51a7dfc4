"""Hostile programs against the code sandbox (issue 15): each must be contained. Where this kernel
gives no user namespaces the module is skipped (the sandbox then refuses to run code unless
PRUNELENS_UNSAFE_CODE=1; test_code_tasks.py checks that refusal)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from prunelens.tasks.sandbox import Limits, isolation, run_program

pytestmark = pytest.mark.skipif(isolation() != "namespaces", reason="no user namespaces on this machine")
FAST = Limits(timeout=4, cpu_seconds=3, memory_mb=512)


@pytest.mark.parametrize("program", [
    "import sys\nprint(sys.modules['__main__']._nonce)\nimport os\nos._exit(0)",
    "import sys\nprint(sys._getframe(1).f_globals['_nonce'])\nimport os\nos._exit(0)",
    "import sys\nprint(sys.modules['__main__'].__dict__.get('token'))\nraise SystemExit(0)",
])
def test_the_pass_token_is_not_in_memory_while_the_program_runs(program: str) -> None:
    assert run_program(program, FAST).status == "failed"


@pytest.mark.parametrize("how", [
    "open({victim!r}, 'w').write('gone')",                                   # truncate through open
    "import posix\nposix.unlink({victim!r})",                                # the unguarded module
    "import importlib, os\nimportlib.reload(os)\nos.remove({victim!r})",      # the guard undone
    "import posix\nposix.system('rm -f {victim} ; echo x > {outside}')",      # a shell
    "import ctypes\nctypes.CDLL(None).system(b'rm -f {victim}')",            # libc directly
    "__builtins__.__import__('posix').system('rm -f {victim}')",
    "open({outside!r}, 'w').write('x' * 15_000_000)",                        # writing outside
])
def test_files_outside_the_sandbox_cannot_be_changed(how: str, tmp_path: Path) -> None:
    victim, outside = tmp_path / "keep.txt", tmp_path / "new.txt"
    victim.write_text("precious")
    run_program(how.format(victim=str(victim), outside=str(outside)), FAST)
    assert victim.read_text() == "precious"
    assert not outside.exists()


def test_the_filesystem_is_read_only_even_for_a_shell() -> None:
    prog = ("import posix\nrc = posix.system('touch /etc/prunelens-x /usr/prunelens-x /var/prunelens-x "
            "2>/dev/null')\nassert rc != 0")
    assert run_program(prog, FAST).passed
    assert not any(Path(p).exists() for p in ("/etc/prunelens-x", "/usr/prunelens-x", "/var/prunelens-x"))


def test_other_processes_and_the_evaluator_cannot_be_killed() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        prog = f"import posix, signal\nfor pid in ({sleeper.pid}, {os.getpid()}):\n" \
               "    try:\n        posix.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n" \
               "posix.kill(posix.getppid() or 1, signal.SIGKILL)"
        run_program(prog, FAST)
        assert sleeper.poll() is None  # still alive, and so is this process
    finally:
        sleeper.kill()


def test_no_other_process_is_visible() -> None:
    prog = "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nassert len(pids) <= 3, pids"
    assert run_program(prog, FAST).passed


def test_local_sockets_outside_cannot_be_reached(tmp_path: Path) -> None:
    path = Path("/tmp") / f"prunelens-test-{os.getpid()}.sock"
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(6)
    got: list = []

    def accept() -> None:
        try:
            got.append(srv.accept()[0].recv(16))
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        prog = (f"import _socket\ns = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
                f"s.connect({str(path)!r})\ns.send(b'escaped')")
        assert run_program(prog, FAST).status == "failed"
        t.join()
        assert got == []
    finally:
        srv.close()
        path.unlink(missing_ok=True)


def test_tcp_to_this_machine_is_unreachable() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        prog = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))"
        assert run_program(prog, FAST).status == "failed"
    finally:
        srv.close()


def test_the_environment_of_the_evaluator_is_not_readable() -> None:
    os.environ["PRUNELENS_TEST_SECRET"] = "s3cret"
    try:
        prog = ("import os\nassert 'PRUNELENS_TEST_SECRET' not in os.environ\n"
                f"assert not os.path.exists('/proc/{os.getpid()}/environ')")
        assert run_program(prog, FAST).passed
    finally:
        del os.environ["PRUNELENS_TEST_SECRET"]


def test_a_double_forked_daemon_dies_with_the_program(tmp_path: Path) -> None:
    marker = f"prunelens-daemon-{os.getpid()}"
    prog = ("import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    if posix.fork() == 0:\n"
            f"        posix.execv('/bin/sleep', ['/bin/sleep', '30', '{marker}'])\n    posix._exit(0)\n"
            "time.sleep(0.5)")
    t0 = time.perf_counter()
    run_program(prog, FAST)
    assert time.perf_counter() - t0 < FAST.timeout + 3
    time.sleep(0.5)
    alive = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, marker)]
    assert alive == []


def _cmdline_has(pid: str, marker: str) -> bool:
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_output_is_bounded_and_never_held_in_memory() -> None:
    r = run_program("import sys\nfor _ in range(300):\n    sys.stdout.write('x' * 1_000_000)", FAST)
    assert r.status == "failed" and len(r.stderr_tail) <= 600


def test_disk_use_is_capped() -> None:
    prog = "for i in range(200):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))"
    r = run_program(prog, Limits(timeout=10, disk_mb=32))
    assert r.status == "failed" and "No space left" in r.stderr_tail


def test_files_left_in_the_working_directory_do_not_break_cleanup() -> None:
    prog = "import os\nos.makedirs('a/b/c')\nopen('a/b/c/x', 'w').write('x')\nos.mkdir('ro')"
    assert run_program(prog, FAST).passed

