"""The warm runner: a process that has imported fishmerge's whole stack and forks a copy of itself per command.

A small `fishmerge` command spends most of its time importing (torch, transformers, datasets, Prefect,
matplotlib: 4–6 s of CPU on the 2-core machine, docs/benchmarks.md). `fishmerge server start` therefore
also starts this runner, which imports all of it once and then, like multiprocessing's forkserver with
preloaded modules, forks a child for each command. The `fishmerge` console command (`flows.cli.run`)
connects to its Unix socket beside the shared server's record (mode 0600; the peer's uid is checked) and
passes its arguments, working folder, umask, environment and its standard input, output and error (the
file descriptors themselves). The child runs the same `flows.cli.run` in the caller's folder with the
caller's environment and streams; the runner sends back its exit status. Ctrl-C, SIGTERM and SIGHUP of the
caller are passed on to the child, and a caller that dies interrupts it.

A command runs in its own process instead, exactly as without a runner, when:
- no runner is listening (none started, still warming up, reloading, or FISHMERGE_NO_WARM is set);
- fishmerge's code or the installed packages changed since the runner started (it reloads itself as soon
  as no command of its runs);
- a setting that libraries read when imported differs between the caller and the runner (the environment
  variables named by `IMPORT_TIME_PREFIXES` and `IMPORT_TIME_NAMES`): a note on stderr says which.

Only the standard library is imported at module level: the caller's side costs milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pkgutil
import selectors
import signal
import socket
import stat
import struct
import sys
import sysconfig
import threading
import time

from fishmerge.flows.server import refresh_prefect_settings, runner_listening, runner_log_path, runner_socket_path

PROTOCOL = 1
HANDSHAKE_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_REPLY_BYTES = 64 * 1024

# Environment variables that libraries read once, when imported (Hugging Face's cache and offline mode,
# torch's and BLAS's threads, locale, temporary folder...): a caller must agree with the runner on them.
IMPORT_TIME_PREFIXES = (
    "PREFECT_",
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS_",
    "TOKENIZERS_",
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
    "MLFLOW_",
    "MPL",
    "FISHMERGE_",
    "PYTHON",
    "LD_",
    "XDG_",
    "LC_",
)
IMPORT_TIME_NAMES = ("HOME", "TMPDIR", "LANG", "LANGUAGE")

# Imported by the runner before it serves: what the commands import (most of it lazily).
PRELOAD_PACKAGES = ("fishmerge", "fishmerge.tasks", "fishmerge.flows")
PRELOAD_MODULES = (
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.bert.modeling_bert",
    "transformers.models.roberta.modeling_roberta",
    "transformers.models.distilbert.modeling_distilbert",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2",
    "datasets",
    "datasets.load",
    "datasets.packaged_modules.csv.csv",
    "datasets.packaged_modules.json.json",
    "datasets.packaged_modules.parquet.parquet",
    "matplotlib.pyplot",
    "dask.array",
    "distributed",
    "prefect_dask",
    "mlflow",
    "mlflow.pyfunc",
)


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


# ---------------------------------------------------------------- the caller's side


def _standard_fds() -> list[int]:
    """Descriptors 0, 1, 2 of this process; a closed one is passed as /dev/null."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _read_line(stream) -> dict | None:
    line = stream.readline(MAX_REPLY_BYTES)
    if not line:
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def run_in_runner(argv: list[str]) -> int | None:
    """Run `fishmerge argv` in the warm runner and return its exit status; None when this process must
    run it itself (no runner, another code version or other import-time settings: see the module doc)."""
    if not runner_listening():
        return None
    request = {
        "protocol": PROTOCOL,
        "code": code_fingerprint(),
        "argv": [sys.argv[0], *argv],
        "cwd": os.getcwd(),
        "umask": _current_umask(),
        "env": dict(os.environ),
    }
    payload = json.dumps(request).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            sock.connect(str(runner_socket_path()))
            socket.send_fds(sock, [b"F"], _standard_fds())
            sock.sendall(struct.pack(">I", len(payload)) + payload)
            replies = sock.makefile("rb")
            answer = _read_line(replies)
        except OSError:
            return None
        if not answer or not answer.get("ok"):
            why = (answer or {}).get("why")
            if why:
                print(f"fishmerge: note: {why}; running in this process", file=sys.stderr)
            return None
        sock.settimeout(None)  # the command runs as long as it runs
        return _wait_for(int(answer["pid"]), replies)
    finally:
        sock.close()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _wait_for(pid: int, replies) -> int:
    """Pass Ctrl-C, SIGTERM and SIGHUP on to the command's process until the runner sends its status."""

    def forward(signum: int, _frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        done = _read_line(replies)
    except OSError:
        done = None
    if done is None or not isinstance(done.get("status"), int):
        print(
            f"fishmerge: error: the warm runner ended while the command ran (see {runner_log_path()}); rerun it, "
            "or set FISHMERGE_NO_WARM=1 to run commands in their own process",
            file=sys.stderr,
        )
        return 1
    return done["status"]


# ---------------------------------------------------------------- the runner's side


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} warm runner {os.getpid()}: {message}", file=sys.stderr, flush=True)


def preload() -> None:
    """Import fishmerge's modules and what its commands import lazily (a missing optional one is skipped)."""
    names = []
    for package in PRELOAD_PACKAGES:
        module = importlib.import_module(package)
        names += [m.name for m in pkgutil.walk_packages(module.__path__, f"{package}.")]
    for name in [*names, *PRELOAD_MODULES]:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 (an optional module: the command imports it itself, or fails there)
            _log(f"not preloaded: {name} ({type(exc).__name__}: {exc})")


class Runner:
    """The serving loop: accepts callers, forks a child per command, reports each child's exit status."""

    def __init__(self) -> None:
        self.code = code_fingerprint()  # taken before importing: a file changed meanwhile shows as a change
        self.environ = dict(os.environ)  # as started: a reload starts from it again
        self.settings = import_time_settings(self.environ)
        self.set_by_imports: dict[str, str] = {}  # what the imports put into the environment
        self.children: dict[int, socket.socket] = {}
        self.stale = False
        self.stopping = False
        self.path = runner_socket_path()
        self.inode = -1
        self.pid = os.getpid()

    def serve(self) -> None:
        """Import, listen, and fork a child per caller until stopped (SIGTERM: stop taking commands at once,
        end when the running ones have ended) or stale (reload the same way)."""
        from fishmerge.flows.cli import ENV_DEFAULTS

        for key, value in ENV_DEFAULTS.items():  # as `main` sets them, before the imports that read them
            os.environ.setdefault(key, value)
        # A CUDA check while importing must not initialise CUDA (a fork could not use it): NVML answers it.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        started = time.perf_counter()
        before = dict(os.environ)
        preload()
        self.set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            _log("CUDA was initialised while importing: a forked command could not use it; not serving")
            raise SystemExit(1)
        listener = self._listen()
        _log(f"ready in {time.perf_counter() - started:.1f} s at {self.path}")
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)  # every handled signal wakes the loop
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        try:
            while True:
                if self.stopping and listener.fileno() >= 0:  # new commands run in their own process from now
                    selector.unregister(listener)
                    self._unlisten(listener)
                if (self.stale or self.stopping) and not self.children:
                    break
                for key, _ in selector.select():
                    if key.fileobj is listener:
                        self._accept(listener, wake_r, wake_w)
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 4096)
                self._reap()
        finally:
            if os.getpid() == self.pid:  # a child's exit passes through here: the socket is not its own
                self._unlisten(listener)
        if self.stopping:
            _log("stopped")
            return
        _log("fishmerge's code or packages changed: reloading")
        os.execve(sys.executable, [sys.executable, "-P", "-m", "fishmerge.flows.warm"], self.environ)

    def _listen(self) -> socket.socket:
        """Bind aside and rename into place (a caller never meets a half-ready socket); only the owner may connect."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        aside = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(aside).st_mode):
                aside.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = os.umask(0o077)
        try:
            listener.bind(str(aside))
            os.chmod(aside, 0o600)
        finally:
            os.umask(mask)
        listener.listen(64)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):  # not ours to replace
                aside.unlink()
                raise FileExistsError(f"{self.path} exists and is not a socket: move it away and restart the server")
        os.replace(aside, self.path)
        self.inode = os.lstat(self.path).st_ino
        return listener

    def _unlisten(self, listener: socket.socket) -> None:
        """Close, and remove the socket if it is still this runner's (same inode), nothing else."""
        listener.close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self.inode:
                self.path.unlink()

    def _stop(self, _signum, _frame) -> None:
        if not self.stopping:
            _log("stopping (SIGTERM): no new commands; ending when the running ones have ended")
        self.stopping = True

    def _accept(self, listener: socket.socket, wake_r: int, wake_w: int) -> None:
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                raise ConnectionError(f"a caller of uid {uid}")
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            request = self._request(conn)
            if len(fds) != 3:
                raise ConnectionError("the caller passed no standard streams")
            why = self._refusal(request)
            if why is not None:
                conn.sendall(json.dumps({"ok": False, "why": why}).encode() + b"\n")
                conn.close()
                return
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                self._child(conn, fds, request, listener, wake_r, wake_w)  # never returns
            self.children[pid] = conn
            _log(f"command {' '.join(request['argv'][1:2])} in child {pid}")
            conn.sendall(json.dumps({"ok": True, "pid": pid}).encode() + b"\n")
        except (OSError, ValueError, ConnectionError) as exc:
            _log(f"a caller was turned away: {exc}")
            if not any(c is conn for c in self.children.values()):
                conn.close()
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _request(self, conn: socket.socket) -> dict:
        """The caller's request: a 4-byte length, then that much JSON (bounded)."""
        head = self._read_exactly(conn, 4)
        (size,) = struct.unpack(">I", head)
        if size > MAX_REQUEST_BYTES:
            raise ValueError(f"a request of {size} bytes")
        request = json.loads(self._read_exactly(conn, size))
        if not isinstance(request, dict):
            raise ValueError("a request that is not an object")
        return request

    @staticmethod
    def _read_exactly(conn: socket.socket, size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = conn.recv(min(left, 65536))
            if not chunk:
                raise ConnectionError("the caller hung up")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _refusal(self, request: dict) -> str | None:
        """Why this runner must not run the request, as a note for the caller ("": none to show); None: it
        may. A runner that finds itself stale reloads as soon as its running commands end."""
        if request.get("protocol") != PROTOCOL or request.get("code") != self.code:
            self.stale = True
            return ""  # no note: the caller runs it itself this once, the runner reloads
        env = request.get("env")
        if not isinstance(env, dict) or not isinstance(request.get("argv"), list):
            raise ValueError("a malformed request")
        theirs = import_time_settings(env)
        differ = sorted(k for k in theirs.keys() | self.settings.keys() if theirs.get(k) != self.settings.get(k))
        if differ:
            return (
                f"the warm runner (fishmerge server start) was started with other settings ({', '.join(differ[:4])}"
                f"{' …' if len(differ) > 4 else ''} differ); `fishmerge server stop` then `fishmerge server start` "
                "from this environment lets commands use it"
            )
        return None

    def _child(self, conn, fds, request, listener, wake_r: int, wake_w: int) -> None:
        """In the forked child: become the caller's command and run the CLI's `run`, whose SystemExit ends
        this process as it ends a command in its own (threads joined, exit handlers, the fast exit)."""
        try:
            listener.close()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            for other in self.children.values():
                other.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.setpgid(0, 0)  # `server stop` ends the runner's group, not the commands it started
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            fds.clear()  # closed: the caller's `finally` must not close these numbers again
            os.chdir(request["cwd"])
            os.umask(int(request["umask"]))
            os.environ.clear()
            os.environ.update({str(k): str(v) for k, v in request["env"].items()})
            for key, value in self.set_by_imports.items():  # as the imports would have set them in the caller
                os.environ.setdefault(key, value)
            sys.argv = [str(a) for a in request["argv"]]
            sys.stdout.reconfigure(line_buffering=os.isatty(1))
            refresh_prefect_settings()  # read in the runner's folder and environment: read the caller's
            _fresh_random_state()
            threading.Thread(target=_interrupt_when_gone, args=(conn,), daemon=True).start()
            from fishmerge.flows.cli import run

            run(use_runner=False)
        except SystemExit:
            raise
        except KeyboardInterrupt:
            os._exit(130)
        except BaseException as exc:  # noqa: BLE001 (the child must never return into the runner's loop)
            with contextlib.suppress(Exception):
                print(f"fishmerge: error: the warm runner could not start the command: {exc}", file=sys.stderr)
            os._exit(2)
        os._exit(0)

    def _reap(self) -> None:
        """Collect ended children and send each caller its command's exit status (128+N for signal N)."""
        while self.children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(wait_status)
            status = code if code >= 0 else 128 - code
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"status": status}).encode() + b"\n")
            conn.close()


def _fresh_random_state() -> None:
    """Global random generators seeded anew, as in a process of its own (every fork would otherwise start
    from the runner's state; Python's `random` reseeds itself at fork)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _interrupt_when_gone(conn: socket.socket) -> None:
    """In the child: when the caller hangs up before the command ends (it died), interrupt the command."""
    conn.settimeout(None)
    with contextlib.suppress(OSError):
        while conn.recv(4096):
            pass
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    Runner().serve()
