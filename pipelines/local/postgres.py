"""The local platform's operational database: PostgreSQL from Debian's packages, on loopback, with
``wal_level=logical`` so that Debezium reads its write-ahead log through the built-in ``pgoutput``
plugin.

The cluster lives under ``local.postgres_dir`` (default ``<local.root>/postgres``: ``data``, its
Unix socket in ``socket``) and
runs as the ``postgres`` system user when the platform runs as root (``initdb`` refuses root).
Local connections through the socket are trusted (the platform's bootstrap and the generator);
TCP connections, which is how the connector logs in, need a password. The connector's role is
``cdc.database.user`` with ``REPLICATION`` and ``SELECT`` on the captured tables; its password
comes from the environment variable ``cdc.database.password_env`` (on the local platform, when it
is unset, a random one generated once and kept in ``cdc.password`` in that folder, mode
0600, beside the data it protects).
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import secrets
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import psycopg
from psycopg import sql

from pipelines.local.services import PlatformError, Service, ensure_debian_package, port_open

log = logging.getLogger(__name__)

#: The server's settings beyond initdb's defaults (``%(port)s`` and ``%(socket)s`` filled in).
_CONF = """
listen_addresses = '127.0.0.1'
port = %(port)s
unix_socket_directories = '%(socket)s'
wal_level = logical
max_replication_slots = 8
max_wal_senders = 8
# A slot whose connector is gone holds WAL forever: past this much the slot is invalidated
# (the connector then fails loudly and re-snapshots) instead of the disk filling up.
max_slot_wal_keep_size = 1GB
"""


def postgres_bin_dir() -> Path:
    """The ``bin`` folder of the newest PostgreSQL under ``/usr/lib/postgresql``; installs
    Debian's ``postgresql`` package when there is none (needs root)."""
    def newest() -> Path | None:
        found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
        return max(found, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0), default=None)

    folder = newest()
    if folder is None:
        ensure_debian_package("postgresql", ["pg_ctlcluster", "/usr/bin/pg_ctlcluster"])
        folder = newest()
    if folder is None:
        raise PlatformError("PostgreSQL is not installed under /usr/lib/postgresql: "
                            "run `sudo apt-get install -y postgresql`")
    return folder


class PostgresServer(Service):
    """A PostgreSQL cluster of its own (``initdb`` on first start), run as the ``postgres``
    process itself so that the pid file names it; stopped by SIGINT (a fast shutdown: a smart
    one would wait for the connector's replication connection to go away)."""

    name = "postgres"
    stop_signal = signal.SIGINT
    SUPERUSER = "postgres"

    def __init__(self, folder: Path, port: int):
        super().__init__(folder)
        self.port = port
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.password_file = self.root / "cdc.password"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _owner(self) -> tuple[int | None, int | None]:
        """The uid and gid to run as: the ``postgres`` system user when we are root."""
        if os.geteuid() != 0:
            return None, None
        try:
            user = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise PlatformError("running as root, and there is no `postgres` user to run PostgreSQL as "
                                "(Debian's postgresql package creates it)") from exc
        return user.pw_uid, user.pw_gid

    def _check_reachable(self, uid: int) -> None:
        """PlatformError naming the first folder above :attr:`root` the ``postgres`` user cannot
        pass through (PostgreSQL would fail to start with a less clear message)."""
        for folder in reversed(self.root.resolve().parents):
            mode = folder.stat()
            if mode.st_uid != uid and not mode.st_mode & 0o001:
                raise PlatformError(f"PostgreSQL runs as the postgres user, who cannot reach {folder} (mode "
                                    f"{oct(mode.st_mode & 0o777)}): set local.postgres_dir to a folder it can reach")

    def _own(self, *paths: Path) -> None:
        uid, gid = self._owner()
        if uid is None:
            return
        for path in paths:
            os.chown(path, uid, gid)
            for parent, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(parent, name), uid, gid)

    def _initdb(self, bin_dir: Path) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        self._own(self.data_dir, self.socket_dir)
        uid, gid = self._owner()
        if uid is not None:
            self._check_reachable(uid)
        log.info("initdb %s", self.data_dir)
        result = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.SUPERUSER, "-E", "UTF8",
             "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256"],
            capture_output=True, text=True, user=uid, group=gid, extra_groups=[] if uid is not None else None,
            cwd=self.root,
        )
        if result.returncode != 0:
            raise PlatformError(f"initdb failed:\n{result.stdout}{result.stderr}")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(_CONF % {"port": self.port, "socket": self.socket_dir})

    def start(self) -> None:
        if self.pid() is not None:
            return
        if port_open(self.port):
            raise PlatformError(f"port {self.port} is taken by another process: set local.postgres_port")
        bin_dir = postgres_bin_dir()
        self._initdb(bin_dir)
        uid, gid = self._owner()
        pid = self._spawn([str(bin_dir / "postgres"), "-D", str(self.data_dir)], user=uid, group=gid)
        log.info("postgres starting (pid %d) on %s", pid, self.address)

    def connect(self, dbname: str = "postgres", user: str | None = None, **options) -> psycopg.Connection:
        """A connection through the Unix socket (trusted), as the superuser unless ``user``."""
        return psycopg.connect(host=str(self.socket_dir), port=self.port, dbname=dbname,
                               user=user or self.SUPERUSER, connect_timeout=3, **options)

    def healthy(self) -> bool:
        if self.pid() is None:
            return False
        try:
            with self.connect() as conn:
                return conn.execute("select 1").fetchone() == (1,)
        except psycopg.Error:
            return False

    def cdc_password(self, env: str) -> str:
        """The connector role's password: ``$env`` when set, else the platform's own (generated
        once, kept in :attr:`password_file`)."""
        if os.environ.get(env):
            return os.environ[env]
        if not self.password_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(24))
        return self.password_file.read_text().strip()

    def bootstrap(self, dbname: str, owner: str, cdc_user: str, cdc_password: str, ddl: Sequence[str],
                  tables: Sequence[str], publication: str, signal_table: str) -> None:
        """Idempotently: the application's role ``owner`` and database ``dbname`` with ``ddl``
        run in it, the connector's role (LOGIN, REPLICATION, SELECT on ``tables``, SELECT and
        INSERT on ``signal_table``: an incremental snapshot writes its watermarks there; the
        password set anew), and the publication ``publication`` of exactly ``tables`` and
        ``signal_table`` (created up front: the connector's role does not own the tables, so it
        could not create it; the connector reads its signals from the write-ahead log)."""
        with self.connect(autocommit=True) as conn:
            for role, extra in ((owner, sql.SQL("")), (cdc_user, sql.SQL(" REPLICATION"))):
                if conn.execute("select 1 from pg_roles where rolname = %s", [role]).fetchone() is None:
                    conn.execute(sql.SQL("create role {} login{}").format(sql.Identifier(role), extra))
            conn.execute(sql.SQL("alter role {} password {}").format(sql.Identifier(cdc_user), sql.Literal(cdc_password)))
            if conn.execute("select 1 from pg_database where datname = %s", [dbname]).fetchone() is None:
                conn.execute(sql.SQL("create database {} owner {}").format(sql.Identifier(dbname), sql.Identifier(owner)))
        with self.connect(dbname, owner, autocommit=False) as conn:
            for statement in ddl:
                conn.execute(statement)
            conn.commit()
        with self.connect(dbname, autocommit=True) as conn:
            names = [sql.Identifier(*table.split(".", 1)) for table in tables]
            for name in names:
                conn.execute(sql.SQL("grant select on {} to {}").format(name, sql.Identifier(cdc_user)))
            signals = sql.Identifier(*signal_table.split(".", 1))
            conn.execute(sql.SQL("grant select, insert on {} to {}").format(signals, sql.Identifier(cdc_user)))
            listed = sql.SQL(", ").join([*names, signals])
            if conn.execute("select 1 from pg_publication where pubname = %s", [publication]).fetchone() is None:
                conn.execute(sql.SQL("create publication {} for table {}").format(sql.Identifier(publication), listed))
            else:
                conn.execute(sql.SQL("alter publication {} set table {}").format(sql.Identifier(publication), listed))

    def drop_slot(self, slot: str) -> bool:
        """Drops the replication slot ``slot`` if it exists and no connector holds it (a slot
        nobody reads keeps WAL on disk); True if it was dropped."""
        with self.connect(autocommit=True) as conn:
            row = conn.execute("select active from pg_replication_slots where slot_name = %s", [slot]).fetchone()
            if row is None or row[0]:
                return False
            conn.execute("select pg_drop_replication_slot(%s)", [slot])
            return True
