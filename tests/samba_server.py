"""A throw-away Samba server on loopback, for tests of the SMB backend.

Debian's ``smbd`` runs self-contained as root on an unprivileged port: every
state, lock, cache and private directory and the log live under one temporary
folder, so nothing on the machine is touched except a local user (created with
``useradd -M`` if missing) that Samba maps its SMB user to. Guest logins do
not work with smbprotocol, so the share is reached as that user.

Usage, e.g. in a session-scoped pytest fixture::

    @pytest.fixture(scope="session")
    def samba(tmp_path_factory):
        with samba_server(tmp_path_factory.mktemp("samba")) as info:
            yield info

    store = SMBStore(info.url, password=info.password)

When ``smbd`` is missing this raises RuntimeError naming the fix: SMB tests
must fail with the reason, never be skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SambaInfo", "samba_server", "ensure_samba_installed", "NOT_INSTALLED"]

NOT_INSTALLED = "samba (smbd) is not installed: run `apt-get install -y samba` or `make test`, which installs it"
SHARE = "fedfs"
USER = "fedfs"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class SambaInfo:
    """Where the test server listens and how to log in (``url`` carries no password)."""

    host: str
    port: int
    share: str
    username: str
    password: str
    url: str
    #: The local folder exported as the share (to inspect or corrupt files behind SMB's back).
    root: str


def ensure_samba_installed() -> str:
    """Return the path of ``smbd``, or raise RuntimeError telling how to install it."""
    for candidate in (shutil.which("smbd"), "/usr/sbin/smbd", "/usr/local/sbin/smbd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(NOT_INSTALLED)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        raise RuntimeError(NOT_INSTALLED + f" ({name} not found)")
    return path


def _ensure_unix_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        done = subprocess.run([useradd, "-M", name], capture_output=True, text=True)
        # A parallel test process may have created it in the meantime.
        if done.returncode != 0 and done.returncode != 9:
            raise RuntimeError(f"useradd -M {name} failed: {done.stderr.strip()}")


def _write_config(base: Path, port: int, share_root: Path) -> Path:
    dirs = {name: base / name for name in ("state", "lock", "private", "cache", "pid", "ncalrpc", "binddns")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    dirs["private"].chmod(0o700)
    conf = base / "smb.conf"
    conf.write_text(
        f"""[global]
   smb ports = {port}
   interfaces = 127.0.0.1
   bind interfaces only = yes
   disable netbios = yes
   server min protocol = SMB2
   server role = standalone server
   passdb backend = tdbsam
   map to guest = never
   state directory = {dirs["state"]}
   lock directory = {dirs["lock"]}
   private dir = {dirs["private"]}
   cache directory = {dirs["cache"]}
   pid directory = {dirs["pid"]}
   ncalrpc dir = {dirs["ncalrpc"]}
   binddns dir = {dirs["binddns"]}
   log file = {base / "smbd.log"}
   log level = 1
   max log size = 0
   load printers = no
   printing = bsd
   printcap name = /dev/null
   disable spoolss = yes
   usershare path =

[{SHARE}]
   path = {share_root}
   read only = no
   force user = root
   browseable = yes
"""
    )
    return conf


def _log_tail(base: Path, lines: int = 40) -> str:
    log = base / "smbd.log"
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no smbd log)"


def _wait_for_port(proc: subprocess.Popen, port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM smbd if the test process dies without cleaning up."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    """End smbd and the per-connection children it forked (its own process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Children may outlive the parent for a moment; they are in the same group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def samba_server(tmpdir: str | os.PathLike[str], *, timeout: float = START_TIMEOUT) -> Iterator[SambaInfo]:
    """Run smbd on 127.0.0.1 on a free port under ``tmpdir``; stop it on exit.

    Raises RuntimeError if smbd is not installed or does not accept connections
    within ``timeout`` seconds (the message carries the tail of the smbd log).
    """
    smbd = ensure_samba_installed()
    smbpasswd = _tool("smbpasswd")
    base = Path(tmpdir).resolve()
    share_root = base / "share"
    share_root.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    _ensure_unix_user(USER)

    last_error = ""
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = _free_port()
        conf = _write_config(base, port, share_root)
        added = subprocess.run(
            [smbpasswd, "-c", str(conf), "-s", "-a", USER],
            input=f"{password}\n{password}\n",
            capture_output=True,
            text=True,
        )
        if added.returncode != 0:
            raise RuntimeError(f"smbpasswd -a {USER} failed: {added.stderr.strip() or added.stdout.strip()}")
        out = open(base / "smbd.stdout", "ab")  # noqa: SIM115 - closed in finally
        proc = subprocess.Popen(
            [smbd, f"--configfile={conf}", "--foreground", "--no-process-group"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, no locks
        )
        try:
            if _wait_for_port(proc, port, time.monotonic() + timeout):
                host = "127.0.0.1"
                yield SambaInfo(
                    host=host,
                    port=port,
                    share=SHARE,
                    username=USER,
                    password=password,
                    url=f"smb://{USER}@{host}:{port}/{SHARE}",
                    root=str(share_root),
                )
                return
            exited = proc.poll()
            last_error = (
                f"smbd exited with status {exited}" if exited is not None else f"smbd did not listen within {timeout}s"
            )
        finally:
            _stop(proc)
            out.close()
        if exited is None:  # a hang is not a port clash: do not retry
            break
    raise RuntimeError(
        f"{last_error} on 127.0.0.1:{port}; tail of {base / 'smbd.log'}:\n{_log_tail(base)}"
    )
