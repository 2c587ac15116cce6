"""Owns starting MLflow tracking servers: the local default and a local team stack (PostgreSQL, S3, optional auth)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent  # mlflow and weed are console scripts of this environment
REGION = "us-east-1"  # SeaweedFS accepts any region; botocore needs one to sign


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Until `url` answers 200, or fail with the server's log if it exits or the time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s:\n{Path(log).read_text()[-3000:]}")


def stop(*procs: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to all at once, then SIGKILL to any still running after `timeout` seconds (with its children,
    when it leads a process group of its own: `mlflow server` runs uvicorn as a child)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                if os.getpgid(p.pid) == p.pid:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
            except ProcessLookupError:
                pass
            p.wait()


def _popen(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)  # Ctrl-C in a terminal reaches us, we stop it in order


@dataclass
class S3Store:
    """An S3 endpoint, a bucket and the keys that may write it."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """What a process writing to the store needs: the MLflow server (not its clients), boto3, DVC."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=REGION)


def secrets_file(path: Path) -> dict[str, str]:
    """Keys and passwords of a local stack: generated once, kept owner-only in `path`, the same on every restart."""
    if path.exists():
        return json.loads(path.read_text())
    # url-safe tokens behind a letter: one starting with '-' would read as an option on the command lines that
    # carry it (`dvc remote modify --local store secret_access_key ...` failed 1 time in 64)
    values = {"s3_access_key": "mmkd" + secrets.token_hex(8), "s3_secret_key": "k" + secrets.token_urlsafe(30),
              "admin_password": "p" + secrets.token_urlsafe(18), "flask_secret_key": "f" + secrets.token_urlsafe(30)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(values, indent=1))
    return values


# --- PostgreSQL ---------------------------------------------------------------------------------------------------

@contextmanager
def postgres(data_dir: Path) -> Iterator[str]:
    """PostgreSQL from the pgserver wheel on `data_dir` (created if new), reached by a Unix socket only; yields the
    superuser URI and stops the server after. Running as root, pgserver runs it as a system user `pgserver`."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers)
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(Path(data_dir), cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def database(admin_uri: str, name: str) -> str:
    """The URI of database `name` on the server of `admin_uri`, created if missing."""
    import psycopg

    if not name.replace("_", "").isalnum():
        raise ValueError(f"database name {name!r}: letters, digits and _ only")
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    head, _, query = admin_uri.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


# --- SeaweedFS S3 -------------------------------------------------------------------------------------------------

def start_seaweed(data_dir: Path, access_key: str, secret_key: str, bucket: str, host: str = HOST,
                  s3_port: int | None = None) -> tuple[subprocess.Popen, S3Store]:
    """`weed server` (master, volume, filer, S3 gateway) on `data_dir`; S3 on `host`, answering only to the keys.

    Returns at once (use `ready_bucket` to wait). The master, volume and filer ports take no credentials: they
    always bind 127.0.0.1, whatever `host` is."""
    data_dir = Path(data_dir)
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{"name": "mmkd", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                                  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    config = data_dir / "s3.json"
    config.touch(mode=0o600)
    config.write_text(json.dumps(identities))
    s3_port = s3_port or free_port(host)
    ports = [free_port() for _ in range(7)]
    cmd = [str(BIN / "weed"), "server", f"-dir={data_dir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
           f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}", "-master.telemetry=false",
           "-master.volumeSizeLimitMB=256", "-volume.max=0",  # small volumes, as many as the disk holds
           f"-volume.port={ports[2]}", f"-volume.port.grpc={ports[3]}", "-volume.preStopSeconds=0",
           "-filer", f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
           "-s3", f"-s3.ip.bind={host}", f"-s3.port={s3_port}", f"-s3.port.grpc={ports[6]}", f"-s3.config={config}",
           "-s3.port.iceberg=0", "-s3.port.lance=0"]  # catalogs the project does not use: no extra ports
    proc = _popen(cmd, data_dir / "weed.log")
    return proc, S3Store(f"http://{host}:{s3_port}", bucket, access_key, secret_key)


def ready_bucket(store: S3Store, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Until the S3 gateway accepts the keys, then create the bucket if missing."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, t0, error = store.client(), time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            if store.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket=store.bucket)
            return
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500) < 500:  # refused: keys, name
                raise RuntimeError(f"S3 at {store.endpoint}, bucket {store.bucket!r}: {e}") from e
            error = e  # the gateway is up, the filer behind it not yet
            time.sleep(0.3)
        except BotoCoreError as e:  # not listening yet
            error = e
            time.sleep(0.3)
    raise TimeoutError(f"S3 at {store.endpoint} not ready in {timeout:.0f} s ({error}):\n{Path(log).read_text()[-3000:]}")


# --- MLflow -------------------------------------------------------------------------------------------------------

def auth_config(path: Path, database_uri: str, admin_username: str = "admin") -> Path:
    """MLflow's basic-auth ini (users and permissions in `database_uri`); the admin password comes from the env."""
    path.write_text("[mlflow]\n"
                    "default_permission = READ\n"  # every user reads everything; writes need ownership or a grant
                    f"database_uri = {database_uri.replace('%', '%%')}\n"
                    f"admin_username = {admin_username}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                    # a verified password is remembered for 60 s per worker: checking it is a scrypt hash, 0.1-0.2 s
                    # of CPU per request; the price: other workers may accept a changed password for 60 s more
                    "auth_cache_ttl_seconds = 60\n")
    return path


def start_mlflow(backend_uri: str, artifacts_destination: str, log: Path, host: str = HOST, port: int | None = None,
                 env: dict | None = None, workers: int = 2, auth_ini: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`mlflow server` proxying artifacts to `artifacts_destination`; returns at once with its URI (see wait_http)."""
    port = port or free_port(host)
    cmd = [str(BIN / "mlflow"), "server", "--host", host, "--port", str(port), "--workers", str(workers),
           "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_destination]
    # MLflow's job runner serves GenAI jobs the project has none of; without it, one process fewer to start and stop
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    if auth_ini:
        cmd += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_ini)
    return _popen(cmd, log, env), f"http://{host}:{port}"


@dataclass
class Stack:
    """A running tracking server: its URI, the env a client needs, the stores behind it."""

    uri: str
    env: dict
    log: Path
    backend_uri: str
    artifacts: str
    s3: S3Store | None = None
    auth: dict | None = None  # {"username", "password"} of the admin when basic-auth is on
    procs: tuple = ()  # (process, log) of each server started, watched by serve_forever

    def as_dict(self) -> dict:
        pg = self.backend_uri if self.backend_uri.startswith("postgresql") else None
        d = {"uri": self.uri, "env": self.env, "log": self.log, "backend_uri": self.backend_uri, "postgres_uri": pg,
             "artifacts": self.artifacts, "auth": self.auth}
        d["s3"] = asdict(self.s3) if self.s3 else None
        return d


@contextmanager
def team_stack(root: Path, auth: bool = False, host: str = HOST, port: int | None = None,
               s3_port: int | None = None, bucket: str = "mmkd", workers: int = 2,
               stop_timeout: float = 30.0) -> Iterator[Stack]:
    """PostgreSQL + SeaweedFS S3 + MLflow (basic-auth if `auth`) under `root`, started in parallel, stopped after.

    `stop_timeout`: seconds SeaweedFS gets to stop gracefully (its filer waits 15 s for open streams); a
    throwaway stack (tests) can pass a few seconds."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    keys = secrets_file(root / "secrets.json")
    with ExitStack() as stack:
        weed, s3 = start_seaweed(root / "s3", keys["s3_access_key"], keys["s3_secret_key"], bucket, host, s3_port)
        procs = [weed]
        stack.callback(lambda: stop(*procs, timeout=stop_timeout))  # MLflow and SeaweedFS, before PostgreSQL
        admin_uri = stack.enter_context(postgres(root / "postgres"))
        backend = database(admin_uri, "mlflow")
        env, user = dict(s3.env()), None
        ini = None
        if auth:
            ini = auth_config(root / "auth.ini", database(admin_uri, "mlflow_auth"))
            user = {"username": "admin", "password": keys["admin_password"]}
            env |= {"MLFLOW_AUTH_ADMIN_PASSWORD": user["password"], "MLFLOW_FLASK_SERVER_SECRET_KEY": keys["flask_secret_key"]}
        log = root / "mlflow-server.log"
        proc, uri = start_mlflow(backend, f"s3://{bucket}/mlflow", log, host, port, env, workers, ini)
        procs.append(proc)
        ready_bucket(s3, weed, root / "s3" / "weed.log")  # while MLflow starts
        for attempt in range(3):
            try:
                wait_http(uri + "/health", proc, log)
                break
            except RuntimeError:
                # a port picked free can be taken before MLflow binds it (SeaweedFS binds its gRPC ports, at its
                # HTTP ports + 10000, as it starts): pick another, unless the port was the caller's
                if port or attempt == 2 or "address already in use" not in log.read_text():
                    raise
                log.rename(log.with_suffix(f".port-taken-{attempt}.log"))
                proc, uri = start_mlflow(backend, f"s3://{bucket}/mlflow", log, host, port, env, workers, ini)
                procs.append(proc)
        client_env = {"MLFLOW_TRACKING_URI": uri}
        if user:
            client_env |= {"MLFLOW_TRACKING_USERNAME": user["username"], "MLFLOW_TRACKING_PASSWORD": user["password"]}
        yield Stack(uri, client_env, log, backend, f"s3://{bucket}/mlflow", s3, user,
                    ((proc, log), (weed, root / "s3" / "weed.log")))


@contextmanager
def local_server(root: Path, auth: bool = False, host: str = HOST, port: int | None = None,
                 workers: int = 2) -> Iterator[Stack]:
    """The local default: SQLite and artifacts under `root` (basic-auth if `auth`, its users in SQLite too)."""
    root = Path(root).resolve()
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    env, user, ini = {}, None, None
    if auth:
        keys = secrets_file(root / "secrets.json")
        ini = auth_config(root / "auth.ini", f"sqlite:///{root / 'basic_auth.db'}")
        user = {"username": "admin", "password": keys["admin_password"]}
        env = {"MLFLOW_AUTH_ADMIN_PASSWORD": user["password"], "MLFLOW_FLASK_SERVER_SECRET_KEY": keys["flask_secret_key"]}
    log = root / "mlflow-server.log"
    backend = f"sqlite:///{root / 'mlflow.db'}"
    proc, uri = start_mlflow(backend, str(root / "artifacts"), log, host, port, env, workers, ini)
    try:
        wait_http(uri + "/health", proc, log)
        client_env = {"MLFLOW_TRACKING_URI": uri}
        if user:
            client_env |= {"MLFLOW_TRACKING_USERNAME": user["username"], "MLFLOW_TRACKING_PASSWORD": user["password"]}
        yield Stack(uri, client_env, log, backend, str(root / "artifacts"), None, user, ((proc, log),))
    finally:
        stop(proc)


def client_instructions(s: Stack) -> str:
    """What to print for a user: the stores, the client env, the DVC remote on the same S3 store."""
    lines = [f"MLflow on {s.uri}", f"  backend store   {s.backend_uri}", f"  artifacts       {s.artifacts}"
             + (f"  (S3 endpoint {s.s3.endpoint})" if s.s3 else ""), f"  server log      {s.log}", "", "Clients:"]
    lines += [f"  export {k}={v}" for k, v in s.env.items()]
    if s.s3:
        lines += ["", "DVC remote on the same store (credentials in .dvc/config.local, never committed):",
                  f"  dvc remote add -d store s3://{s.s3.bucket}/dvc",
                  f"  dvc remote modify store endpointurl {s.s3.endpoint}",
                  f"  dvc remote modify --local store access_key_id {s.s3.access_key}",
                  f"  dvc remote modify --local store secret_access_key {s.s3.secret_key}"]
    return "\n".join(lines)


def serve_forever(stack_cm, out=print) -> int:
    """Start a stack, print how to use it, stay up until Ctrl-C or SIGTERM (0) or a server exits (1, with its log)."""
    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # a service manager's stop also stops the servers, no orphans
    with stack_cm as s:
        out(client_instructions(s))
        out("\nCtrl-C stops it.")
        try:
            while True:
                for proc, log in s.procs:
                    if proc.poll() is not None:
                        out(f"{log.name}: exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                        return 1
                time.sleep(1)
        except KeyboardInterrupt:
            out("stopping")
            return 0
