#!/usr/bin/env python
"""Deploy fedhet on Flower: credentials, data files, SuperLink, SuperNodes, runs.

Every command works on one deployment folder (``--dir``) whose layout is::

    certs/ca.crt ca.key server.pem server.key    TLS (the SuperLink's certificate)
    keys/node-<i> node-<i>.pub                   SuperNode keys (ECDSA P-384, OpenSSH)
    data/client-<i>.train.jsonl .test.jsonl      each data owner's files
    flwr-home/config.toml                        the Flower CLI's SuperLink connection
    logs/  pids/                                 background processes (``up``/``down``)

On real machines run the pieces where they belong (docs/flower.md):

    deploy.py credentials --dir D --nodes 3 --host superlink.example.org   # admin
    deploy.py superlink --dir D --host 0.0.0.0                              # server
    deploy.py register --dir D --superlink superlink.example.org:9093       # admin
    deploy.py supernode --dir D --node 0 --superlink superlink.example.org:9093 \\
        --data-path /data/mine.jsonl                                       # data owner 0
    deploy.py run --dir D --superlink ... configs/exp.yaml --set a.b=1     # researcher

On one machine (loopback only, the end-to-end test): ``up`` does credentials,
data, SuperLink, registration and SuperNodes in the background; ``run`` submits
a job and waits for it; ``down`` stops everything ``up`` started.

The SuperLink runs with TLS and ``--enable-supernode-auth``: only SuperNodes
whose public key was registered (``flwr supernode register``) may connect.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONNECTION = "fedhet"
DEFAULT_PORT = 9093
RUNTIME_PORT = 9094  # where a SuperNode serves its ClientApps (loopback); one per SuperNode


# ------------------------------------------------------------------ credentials


def credentials(folder: Path, nodes: int, hosts: list[str]) -> None:
    """A CA, the SuperLink's certificate for ``hosts`` and ``nodes`` SuperNode key pairs."""
    certs, keys = folder / "certs", folder / "keys"
    certs.mkdir(parents=True, exist_ok=True)
    keys.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedhet deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(certs / "ca.crt", ca.public_bytes(pem))
    _write(certs / "ca.key", _private_pem(ca_key), secret=True)
    _write(certs / "server.pem", server.public_bytes(pem))
    _write(certs / "server.key", _private_pem(server_key), secret=True)
    for i in range(nodes):
        node_key(keys / f"node-{i}")
    print(f"credentials in {folder}: CA, SuperLink certificate for {hosts}, {nodes} node keys")


def node_key(path: Path) -> None:
    """One SuperNode key pair: ``path`` (private, OpenSSH) and ``path.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(path, private, secret=True)
    _write(path.with_suffix(".pub"), public + b"\n")


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    path.write_bytes(data)
    if secret:
        path.chmod(0o600)


# ------------------------------------------------------------------------ data


def data(folder: Path, config: str, overrides: list[str]) -> None:
    """Each training client's partition of ``config`` as its own files."""
    from fedhet.config import load_config
    from fedhet.data.export import export_client_data

    cfg = load_config(config, overrides)
    for train, test in export_client_data(cfg.data, folder / "data"):
        print(f"{train}  {test}")


# ------------------------------------------------------------------- processes


def _env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(folder / "flwr-home")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # use this environment
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def superlink_command(folder: Path, host: str, port: int) -> list[str]:
    certs = folder / "certs"
    return [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile",
        str(certs / "ca.crt"),
        "--ssl-certfile",
        str(certs / "server.pem"),
        "--ssl-keyfile",
        str(certs / "server.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]


def supernode_command(
    folder: Path,
    node: int,
    superlink: str,
    data_path: Path,
    test_path: Path | None,
    *,
    runtime_port: int = RUNTIME_PORT,
    key: Path | None = None,
) -> list[str]:
    node_config = f'partition-id={node} data-path="{data_path}"'
    if test_path is not None:
        node_config += f' test-path="{test_path}"'
    return [
        str(BIN / "flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(folder / "certs" / "ca.crt"),
        "--auth-supernode-private-key",
        str(key or folder / "keys" / f"node-{node}"),
        "--node-config",
        node_config,
        "--port",
        str(runtime_port),
    ]


def write_connection(folder: Path, superlink: str) -> None:
    """The Flower CLI's connection to the SuperLink (TLS with the deployment's CA)."""
    home = folder / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{superlink}"\n'
        f'root-certificates = "{folder / "certs" / "ca.crt"}"\n'
    )


def register(folder: Path, superlink: str, keys: list[Path]) -> None:
    """Register SuperNode public keys with the SuperLink (needs it running)."""
    write_connection(folder, superlink)
    for key in keys:
        subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(key), CONNECTION],
            check=True,
            env=_env(folder),
            cwd=REPO,
        )


def wait_for_port(host: str, port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


def start(folder: Path, name: str, command: list[str]) -> subprocess.Popen:
    """Start a background process logging to ``logs/<name>.log``; record its pid."""
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / "pids").mkdir(parents=True, exist_ok=True)
    log = open(folder / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (owned by the child)
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(folder),
        cwd=REPO,
        start_new_session=True,  # its own process group: `down` stops its children too
    )
    (folder / "pids" / f"{name}.pid").write_text(str(proc.pid))
    return proc


def up(folder: Path, config: str, overrides: list[str], nodes: int, port: int) -> None:
    """Everything on loopback: credentials, data, SuperLink (``port``), registration,
    SuperNodes (SuperNode i serves its ClientApps on ``port + 1 + i``)."""
    host = "127.0.0.1"
    credentials(folder, nodes, [host, "localhost"])
    data(folder, config, overrides)
    start(folder, "superlink", superlink_command(folder, host, port))
    wait_for_port(host, port, timeout=60)
    register(folder, f"{host}:{port}", [folder / "keys" / f"node-{i}.pub" for i in range(nodes)])
    for i in range(nodes):
        files = folder / "data" / f"client-{i}"
        test = Path(f"{files}.test.jsonl")
        start(
            folder,
            f"supernode-{i}",
            supernode_command(
                folder,
                i,
                f"{host}:{port}",
                Path(f"{files}.train.jsonl"),
                test,
                runtime_port=port + 1 + i,
            ),
        )
    print(f"SuperLink on {host}:{port} with {nodes} SuperNodes; logs in {folder / 'logs'}")


def down(folder: Path, grace: float = 30.0) -> None:
    """Stop every process ``up``/``start`` recorded, SuperNodes before the SuperLink:
    SIGTERM to each process group, SIGKILL to what is left after ``grace`` seconds."""
    pid_files = sorted((folder / "pids").glob("*.pid"), key=lambda p: p.name == "superlink.pid")
    supernodes = [p for p in pid_files if p.name != "superlink.pid"]
    for group in (supernodes, [p for p in pid_files if p not in supernodes]):
        pids = [int(p.read_text()) for p in group]
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal([pid for pid in pids if _alive(pid)], signal.SIGKILL)
        for p in group:
            p.unlink()


def _signal(pgids: list[int], sig: signal.Signals) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)


def _alive(pgid: int) -> bool:
    """Whether any process of the group is left (zombies of our own children reaped)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run(
    folder: Path,
    config: str,
    overrides: list[str],
    superlink: str,
    timeout: float,
    *,
    server_eval: bool = True,
) -> int:
    """Submit the project's Flower app with an experiment and stream it to the end
    (``server_eval``: the server evaluates on the experiment's global test set,
    which needs its data source on the server machine)."""
    write_connection(folder, superlink)
    path = Path(config).resolve()
    run_config = f'config="{path}" set="{";".join(overrides)}"'
    if not server_eval:
        run_config += " server-eval=false"
    command = [str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--run-config", run_config]
    return subprocess.run(
        [*command, "--stream"], env=_env(folder), cwd=REPO, timeout=timeout
    ).returncode


# ------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("credentials", help="CA, SuperLink certificate, SuperNode keys")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--host", action="append", help="SuperLink host name or IP (repeatable)")
    p = sub.add_parser("data", help="write each client's partition as its own files")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("superlink", help="run the SuperLink (TLS, node auth) in the foreground")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p = sub.add_parser("register", help="register SuperNode public keys")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--superlink", default=f"127.0.0.1:{DEFAULT_PORT}")
    p.add_argument("keys", nargs="*", type=Path, help="default: every keys/*.pub")
    p = sub.add_parser("supernode", help="run one SuperNode in the foreground")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--superlink", default=f"127.0.0.1:{DEFAULT_PORT}")
    p.add_argument("--data-path", type=Path, required=True)
    p.add_argument("--test-path", type=Path)
    p.add_argument("--runtime-port", type=int, default=RUNTIME_PORT)
    p = sub.add_parser("up", help="everything on loopback, in the background")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p = sub.add_parser("down", help="stop what `up` started")
    p.add_argument("--dir", type=Path, required=True)
    p = sub.add_parser("run", help="run an experiment on the federation and wait for it")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--superlink", default=f"127.0.0.1:{DEFAULT_PORT}")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--no-server-eval", action="store_true", help="no data on the server")
    args = parser.parse_args(argv)
    folder = args.dir.resolve()
    if args.command == "credentials":
        credentials(folder, args.nodes, args.host or ["127.0.0.1", "localhost"])
    elif args.command == "data":
        data(folder, args.config, args.set)
    elif args.command == "superlink":
        host, port = args.host, args.port
        return subprocess.run(superlink_command(folder, host, port), env=_env(folder)).returncode
    elif args.command == "register":
        register(folder, args.superlink, args.keys or sorted((folder / "keys").glob("*.pub")))
    elif args.command == "supernode":
        command = supernode_command(
            folder,
            args.node,
            args.superlink,
            args.data_path.resolve(),
            args.test_path.resolve() if args.test_path else None,
            runtime_port=args.runtime_port,
        )
        return subprocess.run(command, env=_env(folder)).returncode
    elif args.command == "up":
        up(folder, args.config, args.set, args.nodes, args.port)
    elif args.command == "down":
        down(folder)
    else:
        return run(
            folder,
            args.config,
            args.set,
            args.superlink,
            args.timeout,
            server_eval=not args.no_server_eval,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
