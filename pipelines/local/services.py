"""What every service of the local platform shares: a process of its own started in a session
of its own, tracked by a pid file, waited for until healthy, stopped by a signal."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.errors import PipelineError

log = logging.getLogger(__name__)


class PlatformError(PipelineError):
    """A service of the local platform cannot be installed, started or reached."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    detail: str = ""

    def line(self) -> str:
        state = f"running (pid {self.pid})" if self.running else "stopped"
        return f"{self.name:<14} {state:<22} {self.address}  {self.detail}".rstrip()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as stopped, once all its threads
    # are gone: a multi-threaded process's first thread shows Z while the others still exit,
    # holding its files and sockets (a JVM's listening port) a moment longer.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().split(") ", 1)[1][:1] != "Z":
                return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:  # gone since the signal check (or no /proc on this system: alive, as it answered)
        return os.path.exists(f"/proc/{pid}") or not os.path.isdir("/proc")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs, and so on (from ``/proc/<pid>/stat``).
    A job's Spark JVM runs in a session of its own below its driver: a process group's signal
    does not reach it, this does."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(stat.parent.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def find_java() -> str:
    """``$JAVA_HOME/bin/java`` when set, else ``java`` on PATH (Java 17+ for Kafka 4)."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise PlatformError("no Java runtime found (set JAVA_HOME or put java on PATH)")
    return java


def java_version(java_home: Path) -> int | None:
    """The feature version (17, 21, 25, ...) of the JDK or JRE at ``java_home``; None if there is
    no runnable ``bin/java`` there."""
    java = java_home / "bin" / "java"
    if not java.exists():
        return None
    release = java_home / "release"
    text = release.read_text(errors="replace") if release.exists() else ""
    match = re.search(r'^JAVA_VERSION="(\d+)(?:\.(\d+))?', text, re.MULTILINE)
    if not match:
        result = subprocess.run([str(java), "-XshowSettings:properties", "-version"],
                                capture_output=True, text=True)
        match = re.search(r"java\.specification\.version = (\d+)(?:\.(\d+))?", result.stderr)
        if not match:
            return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major  # 1.8 -> 8


def find_jdk(minimum: int, configured: str | None = None) -> Path:
    """A Java home of version ``minimum`` or newer: ``configured`` if given (it must qualify),
    else the newest of ``$JAVA_HOME``, the ``java`` on PATH and the JDKs under ``/usr/lib/jvm``
    and ``/opt/java``. PlatformError naming what was found when none qualifies."""
    if configured:
        version = java_version(Path(configured))
        if version is None or version < minimum:
            raise PlatformError(
                f"local.registry_java_home: {configured} is Java {version or '(no bin/java)'}, need {minimum}+"
            )
        return Path(configured)
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve().parent.parent)
    for folder in (Path("/usr/lib/jvm"), Path("/opt/java")):
        if folder.is_dir():
            candidates += sorted(p for p in folder.iterdir() if p.is_dir())
    found = {home.resolve(): java_version(home) for home in candidates}
    usable = sorted(((v, str(h)) for h, v in found.items() if v is not None and v >= minimum), reverse=True)
    if not usable:
        seen = ", ".join(f"Java {v} at {h}" for h, v in found.items() if v is not None) or "no JDK at all"
        raise PlatformError(
            f"the schema registry needs a Java {minimum}+ JDK; found {seen}. Install one (e.g. "
            f"`apt-get install openjdk-{minimum}-jdk-headless`) or set local.registry_java_home"
        )
    return Path(usable[0][1])


class Service:
    """A process started by the platform, tracked by a pid file."""

    name = ""
    #: The signal that stops the service cleanly.
    stop_signal = signal.SIGTERM

    def __init__(self, root: Path):
        self.root = root
        self.pid_file = root / "service.pid"
        self.log_file = root / "service.out"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def _spawn(self, command: list[str], env: dict[str, str] | None = None, user: int | None = None,
               group: int | None = None) -> int:
        """Starts ``command`` in a session of its own (as ``user``/``group`` when given: the
        process itself, no wrapper, so that the pid file names it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=self.root, user=user, group=group,
                extra_groups=[] if user is not None else None,
            )
        self.pid_file.write_text(str(process.pid))
        return process.pid

    def stop(self, timeout: float = 60.0) -> None:
        stop_together([self], timeout)

    def stop_now(self) -> None:
        """SIGKILL: the process ends at once, with nothing flushed (a crash, for tests)."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def stop_together(services: list[Service], timeout: float = 60.0) -> None:
    """Signal every one of ``services`` to stop, then wait for each to exit (SIGKILL after
    ``timeout``). Together, not one after the other: the nodes of a cluster (a KRaft quorum)
    stopped one by one leave the last ones waiting for peers that are gone."""
    running = []
    for service in services:
        pid = service.pid()
        if pid is None:
            service.pid_file.unlink(missing_ok=True)
            continue
        log.info("stopping %s (pid %d)", service.name, pid)
        os.kill(pid, service.stop_signal)
        running.append((service, pid))
    deadline = time.monotonic() + timeout
    for service, pid in running:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            log.warning("%s did not stop within %.0fs: killing it", service.name, timeout)
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.1)
        service.pid_file.unlink(missing_ok=True)


def megabytes(size: str) -> int:
    units = {"k": 1 / 1024, "m": 1, "g": 1024}
    return int(float(size[:-1]) * units[size[-1].lower()]) if size[-1].lower() in units else int(size) // 2**20


def wait_healthy(service, timeout: float) -> None:
    """Block until ``service`` answers; PlatformError (with its log's tail) if it exits or
    ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not service.healthy():
        if service.pid() is None:
            raise PlatformError(f"{service.name} exited during start-up:\n{service.tail()}")
        if time.monotonic() > deadline:
            raise PlatformError(f"{service.name} not healthy after {timeout:.0f}s:\n{service.tail()}")
        time.sleep(0.5)
    log.info("%s is up", service.name)


def ensure_debian_package(package: str, binaries: list[str]) -> str:
    """The first of ``binaries`` (a name on PATH or an absolute path) that exists; installs
    Debian's ``package`` when none does (needs root), and returns it then."""
    def found() -> str | None:
        for binary in binaries:
            path = shutil.which(binary) if "/" not in binary else (binary if Path(binary).exists() else None)
            if path:
                return path
        return None

    binary = found()
    if binary:
        return binary
    if os.geteuid() != 0:
        raise PlatformError(f"{binaries[0]} is not installed: run `sudo apt-get install -y {package}`")
    log.info("installing %s from Debian's packages", package)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise PlatformError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    binary = found()
    if binary is None:
        raise PlatformError(f"{binaries[0]} still missing after apt-get install {package}")
    return binary
