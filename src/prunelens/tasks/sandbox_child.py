"""What runs inside a sandboxed program's process before its own code: the shell that builds the
namespaces' filesystem, the Python guard that sets the limits and reports the verdict, and the
seccomp filter the guard installs. Kept apart from ``sandbox.py`` (the evaluator's side) because
every line here runs on the far side of the boundary.
"""

from __future__ import annotations

import errno
import functools
import platform
import struct

# The line the guard writes on its verdict pipe once the program's last line has run; the
# evaluator passes a program only when this, and nothing else, arrives and the exit status is 0.
VERDICT = b"prunelens: the program ran to its end\n"

# Runs before everything else, as the caller: puts this shell into the program's cgroup(s) (the
# arguments up to "--" are cgroup.procs files), then becomes the rest of the command.
JOIN_CGROUP = r'''
while [ "$1" != "--" ]; do echo $$ > "$1" || { echo "prunelens sandbox: cannot join $1" >&2; exit 97; }; shift; done
shift
exec "$@"
'''

# Inside the namespaces, before Python: a fresh size-capped tmpfs on /tmp (the working directory
# is /tmp/work), empty ones over the other places local sockets live, a private devpts instance
# capped at a few ptys over /dev/pts (and /dev/ptmx), no further user namespaces (each would give
# mount rights back), no list of the keys the caller may view, every other mount read-only
# (deepest first), then Python with no capabilities and no way to regain them, as a child of this
# shell (the namespace's first process, so a signal that kills Python comes back as 128 + signal).
# Guard and program come in as inherited file descriptors, so nothing of the host's /tmp stays visible.
SETUP = r'''
disk="$1"; ptys="$2"; shift 2
mount -t tmpfs -o "size=${disk}m,mode=1777,nosuid,nodev" prunelens-work /tmp || exit 97
mkdir -m 0777 /tmp/work || exit 97
for d in /run /var/run /var/tmp /dev/shm /dev/mqueue; do
  if [ -d "$d" ] && [ ! -L "$d" ]; then mount -t tmpfs -o size=1m,mode=0755,nosuid,nodev,noexec prunelens-mask "$d"; fi
done
if [ -d /dev/pts ] && [ ! -L /dev/pts ]; then
  if mount -t devpts -o "newinstance,ptmxmode=0666,mode=0600,max=$ptys" prunelens-pts /dev/pts; then
    if [ -e /dev/ptmx ] && [ ! -L /dev/ptmx ]; then mount --bind /dev/pts/ptmx /dev/ptmx || exit 97; fi
  else
    mount -t tmpfs -o size=1m,mode=0755,nosuid,nodev,noexec prunelens-mask /dev/pts || exit 97
    if [ -e /dev/ptmx ] && [ ! -L /dev/ptmx ]; then mount --bind /dev/null /dev/ptmx || exit 97; fi
  fi
fi
if [ -e /proc/sys/user/max_user_namespaces ]; then echo 0 > /proc/sys/user/max_user_namespaces || exit 97; fi
for f in /proc/keys /proc/key-users; do if [ -e "$f" ]; then mount --bind /dev/null "$f" || exit 97; fi; done
for m in $(awk '{print $2}' /proc/self/mounts | sort -r); do
  case "$m" in /tmp|/proc|/proc/*) continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null
done
cd /tmp/work || exit 97
setpriv --no-new-privs --bounding-set=-all --inh-caps=-all "$@"
exit $?
'''

# Runs inside the child before the untrusted program; the program's source is read from a file so
# that its line numbers in tracebacks are its own. Arguments: program path, CPU seconds, address
# space, file size, processes, the verdict pipe's descriptor, the keyctl syscall number (-1: none),
# the seccomp filter in hex ("" for none), then descriptors to close once read.
GUARD = r'''
import builtins, ctypes, faulthandler, os, resource, shutil, socket, subprocess, sys
_cpu, _mem, _fsize, _nproc, _verdict, _keyctl = (int(x) for x in sys.argv[2:8])
_filter = bytes.fromhex(sys.argv[8])
with open(sys.argv[1]) as _f:
    _code = compile(_f.read(), "program.py", "exec")
del _f
for _fd in sys.argv[9:]:
    os.close(int(_fd))
_libc = ctypes.CDLL(None, use_errno=True)
if _keyctl >= 0:  # a fresh anonymous session keyring: the evaluator's is no longer possessed
    _libc.syscall(ctypes.c_long(_keyctl), ctypes.c_long(1), ctypes.c_void_p(None))
if _filter:
    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    _buf = ctypes.create_string_buffer(_filter, len(_filter))
    _prog = _Prog(len(_filter) // 8, ctypes.addressof(_buf))
    _zero = ctypes.c_ulong(0)
    if (_libc.prctl(38, ctypes.c_ulong(1), _zero, _zero, _zero) != 0
            or _libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(_prog), _zero, _zero) != 0):
        sys.stderr.write("prunelens sandbox: the seccomp filter was refused (errno %d)\n" % ctypes.get_errno())
        os._exit(97)
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
sys.argv = ["program.py"]
_close, _write = os.close, os.write
try:
    exec(_code, {"__name__": "__main__", "__builtins__": builtins})
except BaseException:
    _close(_verdict)  # first: no hook, finalizer or thread of the program can report a pass from now on
    raise
_write(_verdict, VERDICT)
_close(_verdict)
'''.replace("VERDICT", repr(VERDICT))

# The calls the seccomp filter refuses (EPERM), per machine: (audit arch, {name: number}).
# memfd_create/memfd_secret/shmget make memory that no address-space limit counts and that can
# outlive the process that made it; add_key/keyctl/request_key reach the kernel keyrings.
DENIED_SYSCALLS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {"memfd_create": 319, "memfd_secret": 447, "shmget": 29,
                            "add_key": 248, "request_key": 249, "keyctl": 250}),
    "aarch64": (0xC00000B7, {"memfd_create": 279, "memfd_secret": 447, "shmget": 194,
                             "add_key": 217, "request_key": 218, "keyctl": 219}),
}
_X32_BIT = 0x40000000  # x86_64's x32 ABI: the same calls under other numbers, refused wholesale


@functools.cache  # depends on the machine only; built once, not per program
def seccomp_filter(machine: str | None = None) -> bytes:
    """The classic-BPF program (``struct sock_filter[]``) that refuses ``DENIED_SYSCALLS`` with EPERM,
    and every call of another ABI; empty where this machine's numbers are not known."""
    machine = machine or platform.machine()
    if machine not in DENIED_SYSCALLS:
        return b""
    arch, calls = DENIED_SYSCALLS[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    ins = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny), (ld, 0, 0, 0)]  # seccomp_data.arch, .nr
    if machine == "x86_64":
        ins += [(jge, 0, 1, _X32_BIT), (ret, 0, 0, deny)]
    for nr in calls.values():
        ins += [(jeq, 0, 1, nr), (ret, 0, 0, deny)]
    ins.append((ret, 0, 0, allow))
    return b"".join(struct.pack("=HBBI", *i) for i in ins)


@functools.cache
def keyctl_number(machine: str | None = None) -> int:
    """keyctl's syscall number here, or -1."""
    calls = DENIED_SYSCALLS.get(machine or platform.machine())
    return calls[1]["keyctl"] if calls else -1
