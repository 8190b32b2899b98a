"""Runs untrusted Python in a sandboxed child process and reports what it did.

    result = await run_python("print(6 * 7)", timeout_s=10)
    result.stdout, result.stderr, result.exit_code, result.timed_out, result.killed_by

The program runs as ``python -I program.py`` in a fresh temporary directory, with a
minimal environment (no ``CHORUS_*``, no keys, ``HOME`` = its working directory) and
``resource`` limits on CPU time, address space, file size, processes and open files.
On Linux, when the process may create namespaces (root, or unprivileged user
namespaces), it also gets:

- a private network namespace with no interfaces up: no network at all;
- a private PID namespace under a small init: when the program ends or is killed, the
  kernel kills everything it started, fork bombs and ``setsid`` escapees included;
- a private root file system: a size-limited tmpfs holding only the program's working
  directory, ``/tmp``, a few devices and read-only binds of the interpreter, ``/usr``
  and the virtual environment; nothing else of the host (``data/keys`` included) exists;
- when started as root, a throwaway unprivileged uid, so ``RLIMIT_NPROC`` holds.

``SandboxResult.isolation`` lists what was applied; ``docs/agents-coder.md`` says what
each layer guarantees and what it does not.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil
from anyio.abc import ByteReceiveStream

from runtime.errors import ChorusError

PROGRAM = "program.py"
# a throwaway uid per run when started as root: high, unused, no passwd entry
SANDBOX_UIDS = range(2_000_000_000, 2_100_000_000)
# what the child may see of the parent's environment
ENV_ALLOWLIST = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")
# read-only in the jail besides the interpreter's own prefixes
SYSTEM_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class SandboxUnavailable(ChorusError):
    """``strict=True`` was asked for, but this OS or user cannot build the jail."""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed program did."""

    stdout: str
    stderr: str
    exit_code: int  # negative: killed by that signal (as in ``subprocess``)
    timed_out: bool  # the wall-clock limit ran out and the sandbox killed it
    killed_by: str | None  # "timeout", "cpu", "file_size" or a signal name; None if it exited
    isolation: tuple[str, ...] = ()  # the layers applied: see the module docstring
    duration_s: float = 0.0
    truncated: tuple[str, ...] = ()  # "stdout" / "stderr" when output was cut

    @property
    def ok(self) -> bool:
        """The program ran to the end and exited with status 0."""
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """One line on how the program ended, for people and for prompts."""
        if self.timed_out:
            return f"timed out after {self.duration_s:.1f} s and was killed"
        if self.killed_by == "cpu":
            return "was killed: it used up its CPU time limit"
        if self.killed_by == "file_size":
            return "was killed: it wrote a file past the size limit"
        if self.killed_by is not None:
            return f"was killed by {self.killed_by}"
        return f"exited with status {self.exit_code}"


@dataclass(frozen=True)
class _Plan:
    """Everything the bootstrap needs, sent to it as JSON on its command line."""

    python: str
    status_fd: int
    cpu_s: int
    memory_mb: int
    file_mb: int
    disk_mb: int
    nproc: int
    uid: int | None  # drop to this uid (started as root), or stay
    binds: list[str]
    devices: list[str]
    strict: bool


async def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    file_mb: int = 16,
    disk_mb: int = 64,
    max_procs: int = 16,
    output_bytes: int = 64 * 1024,
    env: dict[str, str] | None = None,
    strict: bool = False,
) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox and return its output and status.

    ``timeout_s`` is wall-clock time, ``cpu_s`` CPU time, ``memory_mb`` the address space
    of each process, ``file_mb`` the largest file it may write, ``disk_mb`` all it may
    write in the jail, ``max_procs`` its processes and threads, ``output_bytes`` what is
    kept of stdout and of stderr each. ``env`` adds variables to the minimal environment.
    With ``strict``, raise :class:`SandboxUnavailable` instead of running with rlimits
    only where the OS cannot build the jail. Cancelling the call kills the program.
    """
    uid = SANDBOX_UIDS[secrets.randbelow(len(SANDBOX_UIDS))] if os.geteuid() == 0 else None
    plan = _Plan(
        python=sys.executable,
        status_fd=-1,  # set once the pipe exists
        cpu_s=cpu_s,
        memory_mb=memory_mb,
        file_mb=file_mb,
        disk_mb=disk_mb,
        # as root the uid is fresh; otherwise RLIMIT_NPROC counts all the user's tasks,
        # the bootstrap and the namespace's init among them
        nproc=max_procs if uid is not None else _own_processes() + 2 + max_procs,
        uid=uid,
        binds=_binds(),
        devices=_devices(),
        strict=strict,
    )
    workdir = _prepare(code, uid)  # a few small files: not worth a thread
    try:
        return await _run(plan, workdir, timeout_s, output_bytes, _child_env(env))
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, workdir, True)


async def _run(
    plan: _Plan, workdir: Path, timeout_s: float, output_bytes: int, env: dict[str, str]
) -> SandboxResult:
    """Start the bootstrap, collect output until the program ends or time runs out, and
    leave nothing running whatever happens (cancellation included)."""
    status_read, status_write = os.pipe()
    plan = dataclasses.replace(plan, status_fd=status_write)
    started = anyio.current_time()
    try:
        process = await anyio.open_process(
            [plan.python, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(dataclasses.asdict(plan))],
            stdin=subprocess.DEVNULL,  # the program reads no input
            cwd=workdir,
            env=env,
            start_new_session=True,  # its own process group, killed as one
            pass_fds=(status_write,),
        )
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)
    stdout, stderr = _Capture(output_bytes), _Capture(output_bytes)
    timed_out = False
    try:
        async with anyio.create_task_group() as readers:
            assert process.stdout is not None and process.stderr is not None
            readers.start_soon(stdout.drain, process.stdout)
            readers.start_soon(stderr.drain, process.stderr)
            with anyio.move_on_after(timeout_s):
                await process.wait()
            timed_out = process.returncode is None
            _kill_group(process.pid)
            await process.wait()
            # outside a jail a stray child may hold the pipes open: wait for it a little
            with anyio.move_on_after(1.0) as grace:
                await stdout.done.wait()
                await stderr.done.wait()
            if grace.cancelled_caught:
                readers.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            _kill_group(process.pid)  # cancelled or failed: nothing may outlive the call
            await process.aclose()
            reports = _read_reports(status_read)
            isolation = tuple(next((r["isolation"] for r in reports if "isolation" in r), ()))
            if plan.uid is not None and "pid" not in isolation:
                _kill_uid(plan.uid)  # setsid escapees; a PID namespace took them already
    setup_error = next((r["error"] for r in reports if "error" in r), None)
    if setup_error is not None and plan.strict:
        raise SandboxUnavailable(
            f"the sandbox could not isolate the program: {setup_error}; run as root or "
            "enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 "
            "or user.max_user_namespaces > 0), or pass strict=False to run it with "
            "resource limits only"
        )
    if setup_error is not None:
        stderr.add(f"\nsandbox: {setup_error}\n".encode())
    raw = next((r["exit"] for r in reports if "exit" in r), None)
    exit_code, signum = _exit_status(raw, process.returncode)
    return SandboxResult(
        stdout=stdout.text(),
        stderr=stderr.text(),
        exit_code=exit_code,
        timed_out=timed_out,
        killed_by="timeout" if timed_out else _signal_reason(signum),
        isolation=isolation,
        duration_s=anyio.current_time() - started,
        truncated=tuple(n for n, c in (("stdout", stdout), ("stderr", stderr)) if c.dropped),
    )


# -- the parent's side -------------------------------------------------------------------


class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0
        self.done = anyio.Event()

    def add(self, chunk: bytes) -> None:
        room = max(0, self.limit - len(self.data))
        self.data += chunk[:room]
        self.dropped += len(chunk) - min(room, len(chunk))

    async def drain(self, stream: ByteReceiveStream) -> None:
        try:
            async for chunk in stream:  # keep reading past the cap so the child never blocks
                self.add(chunk)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            self.done.set()

    def text(self) -> str:
        text = self.data.decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[... {self.dropped} more bytes not kept]\n"
        return text


def _prepare(code: str, uid: int | None) -> Path:
    """The run's directory: ``program.py``, ``root/`` (the jail's mount point) and
    ``work/`` (the working directory when there is no jail)."""
    workdir = Path(tempfile.mkdtemp(prefix="chorus-sandbox-"))
    workdir.chmod(0o711)  # the sandbox uid may pass through, not list
    (workdir / PROGRAM).write_text(code, encoding="utf-8")
    (workdir / PROGRAM).chmod(0o644)
    (workdir / "root").mkdir()
    (workdir / "work").mkdir(0o700)
    if uid is not None:  # without a jail the program runs in work/ as that uid
        os.chown(workdir / "work", uid, uid)
    return workdir


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    """A minimal environment: nothing of the parent's but locale, no secrets."""
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    env.setdefault("LANG", "C.UTF-8")
    env |= {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/sandbox",  # the jail's working directory (the bootstrap fixes it otherwise)
        "TMPDIR": "/tmp",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        # numeric libraries start one thread per core, each counted by RLIMIT_NPROC
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return env | (extra or {})


@functools.cache
def _devices() -> list[str]:
    """The device nodes the jail gets (those this host has)."""
    return [d for d in DEVICES if os.path.exists(d)]


@functools.cache
def _binds() -> list[str]:
    """Paths the jail shows read-only: system libraries and the interpreter's prefixes."""
    wanted = [*SYSTEM_BINDS, sys.base_prefix, sys.prefix, os.path.realpath(sys.base_prefix)]
    wanted.append(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    kept: list[str] = []
    for path in sorted({os.path.abspath(p) for p in wanted if os.path.lexists(p)}, key=len):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _own_processes() -> int:
    """How many tasks this uid runs now: RLIMIT_NPROC counts them all, not just ours."""
    uid = os.getuid()
    count = 0
    for proc in psutil.process_iter(["uids", "num_threads"]):
        try:
            if proc.info["uids"] is not None and proc.info["uids"].real == uid:
                count += proc.info["num_threads"] or 1
        except psutil.Error:
            continue
    return count


def _kill_group(pgid: int) -> None:
    """SIGKILL the program's process group (in a jail, its death takes the rest along)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of the throwaway uid until none is left (e.g. ``setsid``
    escapees outside a PID namespace); RLIMIT_NPROC bounds how many there can be."""
    for _ in range(100):
        found = False
        for proc in psutil.process_iter(["uids"]):
            try:
                if proc.info["uids"] is not None and proc.info["uids"].real == uid:
                    proc.kill()
                    found = True
            except psutil.Error:
                continue
        if not found:
            return


def _read_reports(fd: int) -> list[dict[str, Any]]:
    """The bootstrap's JSON lines: what it isolated, setup errors, the program's status."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    reports: list[dict[str, Any]] = []
    for line in data.splitlines():
        try:
            reports.append(json.loads(line))
        except ValueError:
            continue
    return reports


def _exit_status(raw: int | None, returncode: int | None) -> tuple[int, int | None]:
    """(exit code, signal) from the program's wait status, else from the bootstrap's."""
    if raw is not None:
        if os.WIFSIGNALED(raw):
            return -os.WTERMSIG(raw), os.WTERMSIG(raw)
        return os.WEXITSTATUS(raw), None
    code = returncode if returncode is not None else -signal.SIGKILL
    return code, -code if code < 0 else None


def _signal_reason(signum: int | None) -> str | None:
    if signum is None:
        return None
    if signum == signal.SIGXCPU:
        return "cpu"
    if signum == signal.SIGXFSZ:
        return "file_size"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# -- the child's side --------------------------------------------------------------------


def _bootstrap() -> None:  # pragma: no cover - runs in the sandbox's first process
    """Isolate, limit, drop privileges, then exec the program.

    Runs as ``python -I -S -c <this function's source> PLAN``: standard library only,
    nothing from outside this function. Reports JSON lines on ``plan["status_fd"]``.
    """
    import ctypes
    import json
    import os
    import platform
    import resource
    import select
    import sys

    plan = json.loads(sys.argv[1])
    status_fd: int = plan["status_fd"]
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, clone_newuts, clone_newipc = 0x20000, 0x4000000, 0x8000000
    clone_newuser, clone_newpid, clone_newnet = 0x10000000, 0x20000000, 0x40000000
    ms_rdonly, ms_nosuid, ms_nodev, ms_noexec = 1, 2, 4, 8
    ms_remount, ms_bind, ms_rec, ms_private = 32, 4096, 16384, 1 << 18
    st_locked = ms_rdonly | ms_nosuid | ms_nodev | ms_noexec  # statvfs f_flag uses MS_ values
    pivot_root_nr = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(platform.machine())

    def report(**fields: object) -> None:
        os.write(status_fd, (json.dumps(fields) + "\n").encode())

    def check(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(
        source: str | None, target: str, fstype: str | None, flags: int, data: str = ""
    ) -> None:
        check(
            libc.mount(
                source.encode() if source else None,
                target.encode(),
                fstype.encode() if fstype else None,
                ctypes.c_ulong(flags),
                data.encode() if data else None,
            ),
            f"mount {target}",
        )

    def bind(path: str, target: str, readonly: bool) -> None:
        if os.path.islink(path):  # e.g. /lib -> usr/lib on merged-/usr systems
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
            return
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        mount(path, target, None, ms_bind | ms_rec)
        # a remount may add flags but, in a user namespace, must keep the locked ones
        locked = os.statvfs(path).f_flag & st_locked
        flags = ms_remount | ms_bind | ms_nosuid | locked | (ms_rdonly if readonly else 0)
        mount(None, target, None, flags)

    def build_root(root: str) -> None:
        """A tmpfs root with read-only binds, a working directory and /tmp; pivot into it."""
        mount(None, "/", None, ms_rec | ms_private)  # nothing we mount leaks to the host
        mount("tmpfs", root, "tmpfs", ms_nosuid | ms_nodev, f"size={plan['disk_mb']}m,mode=755")
        for path in plan["binds"]:
            bind(path, root + path, readonly=True)
        for device in plan["devices"]:
            bind(device, root + device, readonly=False)
        for scratch in ("/tmp", "/dev/shm"):
            os.makedirs(root + scratch, exist_ok=True)
            os.chmod(root + scratch, 0o1777)
        os.makedirs(root + "/sandbox")  # fails loudly if a bind made it
        with open("program.py", "rb") as src, open(root + "/sandbox/program.py", "wb") as dst:
            dst.write(src.read())
        if plan["uid"] is not None:
            os.chown(root + "/sandbox", plan["uid"], plan["uid"])
        os.makedirs(root + "/proc")
        try:  # this PID namespace's own /proc: the program sees only its processes
            mount("proc", root + "/proc", "proc", ms_nosuid | ms_nodev | ms_noexec)
        except OSError:
            os.rmdir(root + "/proc")
        if pivot_root_nr is None:
            raise OSError(0, f"pivot_root: unknown system call number on {platform.machine()}")
        os.chdir(root)
        check(libc.syscall(pivot_root_nr, b".", b"."), "pivot_root")
        check(libc.umount2(b".", 2), "detach the old root")  # MNT_DETACH: host fs is gone
        os.chdir("/sandbox")

    def set_limits() -> None:
        mb = 1024 * 1024
        limits = {
            resource.RLIMIT_CPU: (plan["cpu_s"], plan["cpu_s"] + 1),  # SIGXCPU, then SIGKILL
            resource.RLIMIT_AS: (plan["memory_mb"] * mb,) * 2,
            resource.RLIMIT_FSIZE: (plan["file_mb"] * mb,) * 2,
            resource.RLIMIT_CORE: (0, 0),
            resource.RLIMIT_NPROC: (plan["nproc"],) * 2,
            resource.RLIMIT_NOFILE: (256, 256),
        }
        for which, (soft, hard) in limits.items():
            try:
                resource.setrlimit(which, (soft, hard))
            except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS; the rest still apply
                continue

    def drop_privileges() -> None:
        uid = plan["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if hasattr(libc, "prctl"):  # PR_SET_NO_NEW_PRIVS: no setuid binary gives them back
            libc.prctl(38, 1, 0, 0, 0)

    def run_program(isolation: list[str]) -> None:
        set_limits()
        drop_privileges()
        if plan["uid"] is not None:
            isolation.append("uid")
        isolation.append("rlimits")
        report(isolation=isolation)
        os.set_inheritable(status_fd, False)
        argv = [plan["python"], "-I", "program.py"]
        try:
            os.execv(plan["python"], argv)
        except OSError as exc:
            report(error=f"cannot start {plan['python']}: {exc}")
            os._exit(126)

    # 1. namespaces: root makes them directly, anyone else through a user namespace
    uid, gid = os.getuid(), os.getgid()
    root = os.geteuid() == 0
    flags = clone_newns | clone_newnet | clone_newpid | clone_newipc | clone_newuts
    try:
        check(libc.unshare(flags | (0 if root else clone_newuser)), "unshare")
        if not root:  # map only ourselves; exec then drops the namespace's capabilities
            for name, text in (
                ("setgroups", "deny"),
                ("uid_map", f"{uid} {uid} 1"),
                ("gid_map", f"{gid} {gid} 1"),
            ):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    except (OSError, AttributeError) as exc:  # AttributeError: no unshare in this libc
        if plan["strict"]:
            report(error=f"no namespaces: {exc}")
            os._exit(125)
        report(unisolated=str(exc))
        os.chdir("work")
        os.environ["HOME"] = os.getcwd()
        with open("../program.py", "rb") as src, open("program.py", "wb") as dst:
            dst.write(src.read())
        run_program([])
        return

    # 2. fork the namespace's init: it builds the jail, starts the program and reaps
    alive_read, alive_write = os.pipe()
    init = os.fork()
    if init == 0:
        try:
            os.close(alive_write)
            libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: the bootstrap's death ends it
            if select.select([alive_read], [], [], 0)[0]:
                os._exit(125)  # the bootstrap died before that was set
            os.close(alive_read)
            build_root(os.path.join(os.getcwd(), "root"))
            # 3. the program is pid 2, not init: init ignores signals it has no handler for
            program = os.fork()
            if program == 0:
                run_program(["net", "pid", "fs"] + ([] if root else ["userns"]))
            while True:  # reap orphans until the program ends; its end kills the rest
                pid, status = os.waitpid(-1, 0)
                if pid == program:
                    report(exit=status)
                    os._exit(0)
        except BaseException as exc:
            report(error=f"setup failed: {exc}")
            os._exit(125)
    os.close(alive_read)
    _, status = os.waitpid(init, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0x7F)


_BOOTSTRAP = textwrap.dedent(inspect.getsource(_bootstrap)) + "\n_bootstrap()\n"
