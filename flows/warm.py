"""The warm runner, the caller's side: run a `fishmerge` command in the runner instead of in this process.

A small `fishmerge` command spends most of its time importing (torch, transformers, datasets, Prefect,
matplotlib: 4–6 s of CPU on the 2-core machine, docs/benchmarks.md). `fishmerge server start` therefore
also starts the warm runner (`flows.warm_runner`), which imports all of it once and then, like
multiprocessing's forkserver with preloaded modules, forks a child for each command. The `fishmerge`
console command (`flows.cli.run`) connects to its Unix socket beside the shared server's record (mode
0600; each side checks that the other runs as the same user) and passes its arguments, working folder,
umask, environment and its standard input, output and error (the descriptors themselves). The child runs
the same `flows.cli.run` in the caller's folder with the caller's environment and streams; the runner
sends back its exit status. Ctrl-C, SIGTERM, SIGHUP and Ctrl-Z/fg of the caller are passed on to the
child, and the signals the caller ignores (`nohup`) are ignored there too; a caller that dies interrupts it.

A command runs in its own process instead, exactly as without a runner, when:
- no runner is listening (none started, still importing, reloading or stopping), FISHMERGE_NO_WARM is set,
  or one of its standard streams is closed;
- fishmerge's code or the installed packages changed since the runner started (it reloads itself as soon
  as no command of its runs), or the caller is another fishmerge installation;
- a setting read when libraries are imported differs between the caller and the runner (the environment
  variables named by `IMPORT_TIME_PREFIXES` and `IMPORT_TIME_NAMES`, a `matplotlibrc` in the working
  folder): a `fishmerge: note:` line on stderr says which.

Only the standard library is imported here: the caller's side costs milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import sysconfig
from typing import BinaryIO

from fishmerge.flows.server import runner_listening, runner_log_path, runner_socket_path

PROTOCOL = 2
HANDSHAKE_TIMEOUT_S = 10.0
MAX_REPLY_BYTES = 64 * 1024
GO = b"G"  # the caller's word that it is still there: only then does the child run the command

# Environment variables that libraries read once, when imported (Hugging Face's cache and offline mode,
# torch's and BLAS's threads, fsspec's and zarr's configuration, locale, time zone, temporary folder...):
# a caller must agree with the runner on them.
IMPORT_TIME_PREFIXES = (
    "PREFECT_",
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "DATASETS_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "NCCL_",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "DNNL_",
    "ONEDNN_",
    "DASK_",
    "FSSPEC_",
    "ZARR_",
    "MLFLOW_",
    "MPL",
    "FISHMERGE_",
    "PYTHON",
    "LD_",
    "XDG_",
    "LC_",
)
IMPORT_TIME_NAMES = ("HOME", "TMPDIR", "LANG", "LANGUAGE", "TZ", "DO_NOT_TRACK")
IMPORT_TIME_FILES = ("matplotlibrc",)  # read from the working folder when matplotlib is imported


def code_fingerprint() -> str:
    """sha256 over the interpreter, fishmerge's source files (path, size, modification time) and the
    modification times of the site-packages folders (they change when a package is installed or removed):
    a runner whose fingerprint differs from its caller's would run other code than the caller's."""
    import importlib.util

    import fishmerge

    roots = list(fishmerge.__path__)
    for name in ("fishmerge.flows", "fishmerge.tasks"):
        spec = importlib.util.find_spec(name)
        roots += list(spec.submodule_search_locations or []) if spec else []
    h = hashlib.sha256(f"{sys.executable}\0{sys.version}\0".encode())
    for root in sorted(set(roots)):
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for key in ("purelib", "platlib"):
        folder = sysconfig.get_paths()[key]
        with contextlib.suppress(OSError):
            h.update(f"{folder}\0{os.stat(folder).st_mtime_ns}\0".encode())
    return h.hexdigest()


def import_time_settings(env: dict[str, str]) -> dict[str, str]:
    """The variables of `env` that libraries read when imported, after the CLI's own defaults."""
    from fishmerge.flows.cli import ENV_DEFAULTS

    env = {**ENV_DEFAULTS, **env}
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES) or k in IMPORT_TIME_NAMES}


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a connected Unix socket."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


def read_message(stream: BinaryIO) -> dict | None:
    """One JSON line from the other side (bounded), None at its end or on anything else."""
    line = stream.readline(MAX_REPLY_BYTES)
    try:
        message = json.loads(line) if line else None
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _standard_streams_open() -> bool:
    """Whether descriptors 0, 1 and 2 are all open (a closed one is run here: Python itself then sees no
    stream, which a passed stand-in would not reproduce)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            return False
    return True


IGNORABLE = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM)


def _ignored_signals() -> list[int]:
    """The signals this process ignores (`nohup`, a background job of a script): the command ignores them too."""
    return [int(s) for s in IGNORABLE if signal.getsignal(s) is signal.SIG_IGN]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run_in_runner(argv: list[str]) -> int | None:
    """Run `fishmerge argv` in the warm runner and return its exit status; None when this process must
    run it itself (see the module's docstring)."""
    if not runner_listening() or not _standard_streams_open():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            request = {
                "protocol": PROTOCOL,
                "code": code_fingerprint(),
                "argv": [sys.argv[0], *argv],
                "cwd": os.getcwd(),
                "umask": _current_umask(),
                "env": dict(os.environ),
                "ignored_signals": _ignored_signals(),
            }
            payload = json.dumps(request).encode()
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            sock.connect(str(runner_socket_path()))
            if peer_uid(sock) != os.getuid():  # a socket of another user's process: tell it nothing
                return None
            socket.send_fds(sock, [b"F"], [0, 1, 2])
            sock.sendall(struct.pack(">I", len(payload)) + payload)
            replies = sock.makefile("rb")
            answer = read_message(replies)
            pid = answer.get("pid") if answer and answer.get("ok") else None
            if not isinstance(pid, int) or pid <= 1:
                note = (answer or {}).get("why")
                if note and isinstance(note, str):
                    print(f"fishmerge: note: {note}; running in this process", file=sys.stderr)
                return None
            sock.sendall(GO)
        except OSError:  # no runner after all, a closed working folder, a runner that went away: run here
            return None
        except KeyboardInterrupt:  # before the command started anywhere
            print("fishmerge: interrupted", file=sys.stderr)
            return 130
        sock.settimeout(None)  # the command runs as long as it runs
        return _wait_for(pid, replies)
    finally:
        sock.close()


def _wait_for(pid: int, replies: BinaryIO) -> int:
    """Pass Ctrl-C, SIGTERM, SIGHUP and Ctrl-Z / fg on to the command's process until the runner sends
    its status; a command that a signal ended ends this process by the same signal."""

    def forward(signum: int, _frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def suspend(_signum: int, _frame) -> None:
        forward(signal.SIGTSTP, None)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until `fg` …
        signal.signal(signal.SIGTSTP, suspend)
        forward(signal.SIGCONT, None)  # … then the command goes on too

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored here, ignored by the command too
            signal.signal(signum, forward)
    signal.signal(signal.SIGTSTP, suspend)
    try:
        done = read_message(replies)
    except OSError:
        done = None
    status = (done or {}).get("status")
    if not isinstance(status, int):
        print(
            f"fishmerge: error: the warm runner ended while the command ran, so its outcome is unknown (it may "
            f"still have finished: look at its output; see {runner_log_path()}); rerun it, or set "
            "FISHMERGE_NO_WARM=1 to run commands in their own process",
            file=sys.stderr,
        )
        return 1
    killed_by = done.get("signal")
    if isinstance(killed_by, int) and 0 < killed_by < signal.NSIG:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP keep their default anyway
            signal.signal(killed_by, signal.SIG_DFL)
        sys.stdout.flush()
        os.kill(os.getpid(), killed_by)
    return status
