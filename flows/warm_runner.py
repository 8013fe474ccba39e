"""The warm runner, the runner's side: import fishmerge's stack once, then fork a child per command.

Started by `fishmerge server start` (`python -P -m fishmerge.flows.warm_runner`, in `/`, with the starting
command's environment); the caller's side and the rules for when a command runs here are in `flows.warm`.
One thread, one loop: accept a caller (same user only), read its request (bounded, with a short timeout),
check it, fork. The child takes the caller's descriptors, folder, umask and environment, waits for the
caller's word that it is still there, and runs `flows.cli.run`, whose exit ends it as a command in its own
process ends. The runner reaps each child and sends its caller the exit status. SIGTERM (`server stop`):
no new callers, and the runner ends once its children have. A caller with another code fingerprint
makes it reload (exec itself) once idle, if its own files changed.

Exit handlers that libraries registered while the runner imported them are moved, in each child, behind
the CLI's fast exit, where they would be had the command imported them itself.
"""

from __future__ import annotations

import atexit
import contextlib
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
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fishmerge.flows.server import refresh_prefect_settings, runner_socket_path
from fishmerge.flows.warm import (
    GO,
    IGNORABLE,
    IMPORT_TIME_FILES,
    PROTOCOL,
    code_fingerprint,
    import_time_settings,
    peer_uid,
)

HANDSHAKE_TIMEOUT_S = 2.0  # a caller sends its request at once; a slow one must not hold up the others
MAX_REQUEST_BYTES = 4 * 1024 * 1024

# Imported before serving: every fishmerge module but those importing MLflow (its telemetry starts a
# thread at import, and a process with threads must not fork), and what the commands import lazily.
PRELOAD_PACKAGES = ("fishmerge", "fishmerge.tasks", "fishmerge.flows")
PRELOAD_SKIP = ("fishmerge.registry", "fishmerge.flows.warm_runner")
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
)

ExitHandler = tuple[Callable, tuple, dict]


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} warm runner {os.getpid()}: {message}", file=sys.stderr, flush=True)


def preload() -> list[ExitHandler]:
    """Import fishmerge's modules and what its commands import lazily (a missing optional one is skipped);
    returns the exit handlers registered meanwhile, in order."""
    handlers: list[ExitHandler] = []
    register = atexit.register

    def recording(func: Callable, *args, **kwargs) -> Callable:
        handlers.append((func, args, kwargs))
        return register(func, *args, **kwargs)

    atexit.register = recording
    try:
        names = []
        for package in PRELOAD_PACKAGES:
            module = importlib.import_module(package)
            names += [m.name for m in pkgutil.walk_packages(module.__path__, f"{package}.")]
        for name in [n for n in names if not n.startswith(PRELOAD_SKIP)] + list(PRELOAD_MODULES):
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 (optional: the command imports it itself, or fails there)
                _log(f"not preloaded: {name} ({type(exc).__name__}: {exc})")
    finally:
        atexit.register = register
    return handlers


def fork_hazard() -> str | None:
    """Why forking this process now would be unsafe (None: safe): another thread (its locks would stay
    held in the child), or CUDA initialised (a forked child cannot use it)."""
    if threading.active_count() > 1:
        return f"threads started while importing: {[t.name for t in threading.enumerate()]}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised while importing"
    with contextlib.suppress(OSError):
        if "libcuda.so" in Path("/proc/self/maps").read_text():
            return "the CUDA driver was loaded while importing"
    return None


def _valid(request: object) -> bool:
    """Whether a request has every field, of the right type (checked before anything is forked)."""
    if not isinstance(request, dict):
        return False
    argv, env, umask = request.get("argv"), request.get("env"), request.get("umask")
    return (
        isinstance(argv, list)
        and len(argv) >= 1
        and all(isinstance(a, str) for a in argv)
        and isinstance(request.get("cwd"), str)
        and isinstance(umask, int)
        and 0 <= umask <= 0o777
        and isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        and isinstance(request.get("ignored_signals"), list)
        and all(s in IGNORABLE for s in request["ignored_signals"])
    )


class Runner:
    """The serving loop: accepts callers, forks a child per command, reports each child's exit status."""

    def __init__(self) -> None:
        self.code = code_fingerprint()  # taken before importing: a file changed meanwhile shows as a change
        self.environ = dict(os.environ)  # as started: a reload starts from it again
        self.settings = import_time_settings(self.environ)
        self.set_by_imports: dict[str, str] = {}  # what the imports put into the environment
        self.exit_handlers: list[ExitHandler] = []
        self.children: dict[int, socket.socket] = {}
        self.stale = False
        self.stopping = False
        self.path = runner_socket_path()
        self.socket_id: tuple[int, int] | None = None  # (device, inode) of the socket this runner placed
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
        self.exit_handlers = preload()
        self.set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
        hazard = fork_hazard()
        if hazard:
            _log(f"not serving: {hazard}; commands run in their own process")
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
        os.execve(sys.executable, [sys.executable, "-P", "-m", "fishmerge.flows.warm_runner"], self.environ)

    def _listen(self) -> socket.socket:
        """Bind aside and rename into place (a caller never meets a half-ready socket); only the owner may
        connect; never replaces anything but a socket."""
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
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                aside.unlink()
                raise FileExistsError(f"{self.path} exists and is not a socket: move it away and restart the server")
        os.replace(aside, self.path)
        st = os.lstat(self.path)
        self.socket_id = (st.st_dev, st.st_ino)
        return listener

    def _unlisten(self, listener: socket.socket) -> None:
        """Close, and remove the socket if it is still the one this runner placed (once: a later runner's
        socket may reuse the inode)."""
        listener.close()
        if self.socket_id is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.socket_id:
                self.path.unlink()
        self.socket_id = None

    def _stop(self, _signum: int, _frame: object) -> None:
        if not self.stopping:
            _log("stopping (SIGTERM): no new commands; ending when the running ones have ended")
        self.stopping = True

    def _accept(self, listener: socket.socket, wake_r: int, wake_w: int) -> None:
        """One caller: checked, its request read and checked, then refused with a note or forked."""
        fds: list[int] = []
        conn: socket.socket | None = None
        try:
            conn, _ = listener.accept()
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S  # for the whole request, however it trickles in
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            if peer_uid(conn) != os.getuid():
                raise ConnectionError("a caller of another user")
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            if len(fds) != 3:
                raise ConnectionError("the caller passed no standard streams")
            request = self._request(conn, deadline)
            why = self._refusal(request)
            if why is not None:
                conn.sendall(json.dumps({"ok": False, "why": why}).encode() + b"\n")
                return
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child_conn, conn = conn, None  # open to the child's end (its `finally` here must not close it)
                self._child(child_conn, fds, request, listener, wake_r, wake_w)  # never returns
            self.children[pid], conn = conn, None  # the child's status goes back on it
            _log(f"command {request['argv'][1] if len(request['argv']) > 1 else '(none)'} in child {pid}")
            self.children[pid].sendall(json.dumps({"ok": True, "pid": pid}).encode() + b"\n")
        except Exception as exc:  # noqa: BLE001 (a caller's fault or a failed fork: turned away, the loop goes on)
            _log(f"a caller was turned away: {type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _request(self, conn: socket.socket, deadline: float) -> dict:
        """The caller's request: a 4-byte length, then that much JSON (bounded), every field checked."""
        (size,) = struct.unpack(">I", self._read_exactly(conn, 4, deadline))
        if size > MAX_REQUEST_BYTES:
            raise ValueError(f"a request of {size} bytes")
        request = json.loads(self._read_exactly(conn, size, deadline))
        if not _valid(request):
            raise ValueError("a malformed request")
        return request

    @staticmethod
    def _read_exactly(conn: socket.socket, size: int, deadline: float) -> bytes:
        chunks, left = [], size
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the caller's request came too slowly")
            conn.settimeout(remaining)
            chunk = conn.recv(min(left, 65536))
            if not chunk:
                raise ConnectionError("the caller hung up")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _refusal(self, request: dict) -> str | None:
        """Why this runner must not run the request, as a note for the caller ("": none to show); None: it
        may. A runner whose own files changed reloads as soon as its running commands end."""
        if request.get("protocol") != PROTOCOL or request.get("code") != self.code:
            if code_fingerprint() != self.code:
                self.stale = True
                return ""  # no note: the caller runs it itself this once, the runner reloads
            return "the warm runner (fishmerge server start) runs another fishmerge installation or version"
        theirs = import_time_settings(request["env"])
        differ = sorted(k for k in theirs.keys() | self.settings.keys() if theirs.get(k) != self.settings.get(k))
        differ += [f for f in IMPORT_TIME_FILES if os.path.lexists(os.path.join(request["cwd"], f))]
        if differ:
            return (
                f"the warm runner (fishmerge server start) was started with other settings ({', '.join(differ[:4])}"
                f"{' …' if len(differ) > 4 else ''} differ); `fishmerge server stop` then `fishmerge server start` "
                "from this environment lets commands use it"
            )
        return None

    def _child(
        self, conn: socket.socket, fds: list[int], request: dict, listener: socket.socket, wake_r: int, wake_w: int
    ) -> None:
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
            for signum in request["ignored_signals"]:  # as the caller does (nohup, a script's background job)
                signal.signal(signum, signal.SIG_IGN)
            os.setpgid(0, 0)  # `server stop` signals the runner, not the commands it started
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            fds.clear()  # closed: the caller's `finally` must not close these numbers again
            conn.settimeout(None)
            if conn.recv(1) != GO:  # the caller gave up meanwhile (it runs the command itself): nothing to do
                os._exit(0)
            os.chdir(request["cwd"])
            os.umask(request["umask"])
            os.environ.clear()
            os.environ.update(request["env"])
            for key, value in self.set_by_imports.items():  # as the imports would have set them in the caller
                os.environ.setdefault(key, value)
            sys.argv = list(request["argv"])
            sys.stdout.reconfigure(line_buffering=os.isatty(1))
            refresh_prefect_settings()  # read in the runner's folder and environment: read the caller's
            _fresh_random_state()
            for func, _args, _kwargs in self.exit_handlers:
                atexit.unregister(func)  # put back behind the fast exit by `run`
            threading.Thread(target=_interrupt_when_gone, args=(conn,), daemon=True).start()
            from fishmerge.flows.cli import run

            run(use_runner=False, exit_handlers=self.exit_handlers)
        except SystemExit:
            raise
        except KeyboardInterrupt:  # before the CLI took over
            with contextlib.suppress(Exception):
                print("fishmerge: interrupted", file=sys.stderr, flush=True)
            os._exit(130)
        except BaseException as exc:  # noqa: BLE001 (the child must never return into the runner's loop)
            with contextlib.suppress(Exception):
                print(f"fishmerge: error: the warm runner could not start the command: {exc}", file=sys.stderr)
            os._exit(2)
        os._exit(0)

    def _reap(self) -> None:
        """Collect ended children and send each caller its command's exit status (128+N and the signal when
        signal N ended it)."""
        while self.children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(wait_status)
            message = {"status": code} if code >= 0 else {"status": 128 - code, "signal": -code}
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(message).encode() + b"\n")
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
    """In the child: when the caller hangs up before the command ends (it died, and so would a command in
    its own process have), end the command: interrupted (it cleans up) unless it ignores SIGINT like its
    caller did, then terminated, then killed."""
    with contextlib.suppress(OSError):
        while conn.recv(4096):
            pass
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            os.kill(os.getpid(), signum)
            return
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    Runner().serve()
