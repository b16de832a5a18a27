"""A real, throw-away Kubernetes control plane on loopback: etcd + kube-apiserver + kube-controller-manager.

The binaries come from ``tests/cluster/build-kube.sh`` (v1.20.2, see shared/FACTS.md). There is no
scheduler and no kubelet: pods stay Pending unless a :class:`tests.cluster.kubelet.FakeKubelet` plays
the kubelet. Everything else a controller or operator relies on is real: admission, CRDs with schema
validation and the status subresource, RBAC, watches, optimistic concurrency, the Job, garbage
collector, namespace and service-account controllers.

This module has no pytest dependency; ``tests/fixtures/kube.py`` wraps it in fixtures. Usage::

    with LocalCluster(bin_dir) as cluster:
        client = cluster.api_client()          # admin (system:masters)
        kubeconfig = cluster.kubeconfig         # admin kubeconfig file for subprocesses
        token = cluster.service_account_token("ns", "sa")
        limited = cluster.kubeconfig_for_token(token)
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# The first address of the service range is what the apiserver gives the `kubernetes` Service; a real
# in-cluster client verifies the serving certificate against it, so it goes into the SANs.
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "kubetune-test-admin"


class ClusterStartError(RuntimeError):
    """A control-plane process exited or did not become ready; the message names its log file."""


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalCluster:
    """etcd, kube-apiserver and kube-controller-manager as local processes with self-made TLS and RBAC.

    What a caller may rely on after :meth:`start` returns:
      - ``server`` (``https://127.0.0.1:<port>``) answers ``/readyz`` with 200; TLS is verified against
        ``ca_cert`` (SANs: 127.0.0.1, localhost, 10.0.0.1 and the kubernetes.default names);
      - ``admin_token`` authenticates as a member of ``system:masters``; ``kubeconfig`` is a file using it;
      - authorization is RBAC only, so any other token gets exactly what its RoleBindings grant;
      - the controller manager runs its default controllers (job, garbage collector, namespace,
        serviceaccount, serviceaccount-token, ...), and the ``default`` ServiceAccount of the
        ``default`` namespace already has its token Secret, so ServiceAccount tokens work;
      - process logs stay in ``log_dir`` after :meth:`stop` (it is not removed) for debugging.

    Raises :class:`ClusterStartError` from :meth:`start` when a binary is missing, a process dies or
    readiness times out; the message names the log file to read. :meth:`stop` is idempotent.
    """

    def __init__(
        self,
        bin_dir: Path | str,
        *,
        startup_timeout: float = 90.0,
        log_dir: Path | str | None = None,
        audit: bool = False,
    ) -> None:
        self.bin_dir = Path(bin_dir)
        self.audit = audit
        self.startup_timeout = startup_timeout
        self._work = Path(tempfile.mkdtemp(prefix="kubetune-cluster-"))
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="kubetune-cluster-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._pki = self._work / "pki"
        self.ca_cert = self._pki / "ca.crt"
        self.admin_token = secrets.token_hex(24)
        self.port = 0
        self.etcd_port = 0
        self._processes: list[_Process] = []
        self._stopped = False

    # ----------------------------------------------------------------------------------------- life
    @property
    def server(self) -> str:
        """The apiserver URL, e.g. ``https://127.0.0.1:41234``."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (token of a ``system:masters`` member, CA pinned)."""
        return self._work / "admin.kubeconfig"

    def start(self) -> None:
        """Start etcd, then the apiserver, then the controller manager, and wait until all are usable."""
        for binary in ("etcd", "kube-apiserver", "kube-controller-manager"):
            if not os.access(self.bin_dir / binary, os.X_OK):
                raise ClusterStartError(
                    f"{self.bin_dir / binary} is missing; run tests/cluster/build-kube.sh"
                )
        self._write_pki()
        self.etcd_port = free_port()
        self.port = free_port()
        self._write_kubeconfig(self.kubeconfig, self.admin_token, user=ADMIN_USER)
        try:
            self._start_etcd()
            self._start_apiserver()
            self._wait_ready()
            self._start_controller_manager()
            self._wait_controllers()
        except BaseException:
            # The logs are what explains a failed start: keep them.
            self.stop(keep_logs=True)
            raise

    def stop(self, *, keep_logs: bool = True) -> None:
        """Stop the processes by PID (SIGTERM, then SIGKILL after 10 s) and remove the data directory.

        Logs in ``log_dir`` are kept unless ``keep_logs`` is False. Safe to call more than once.
        """
        if not self._stopped:
            self._stopped = True
            for proc in reversed(self._processes):
                _terminate(proc.popen, grace=10.0)
            shutil.rmtree(self._work, ignore_errors=True)
        if not keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------------------------- helpers
    def kubeconfig_for_token(self, token: str, *, name: str | None = None) -> Path:
        """Write a kubeconfig that authenticates with ``token`` against this cluster and return its path.

        The file lives in the cluster's data directory and disappears at :meth:`stop`.
        """
        name = name or "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]
        path = self._work / "kubeconfigs" / f"{name}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        self._write_kubeconfig(path, token, user=name)
        return path

    def api_client(self, kubeconfig: Path | None = None) -> ApiClient:
        """A ``kubernetes.client.ApiClient`` for ``kubeconfig`` (default: admin); global config untouched."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def service_account_token(self, namespace: str, name: str, timeout: float = 30.0) -> str:
        """Return the token from the ServiceAccount's auto-created token Secret (v1.20 still creates them).

        Waits up to ``timeout`` seconds for the token controller; raises ``TimeoutError`` naming the
        ServiceAccount when no populated token Secret appears.
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    sa = core.read_namespaced_service_account(name, namespace)
                    for ref in sa.secrets or []:
                        secret = core.read_namespaced_secret(ref.name, namespace)
                        if secret.type == "kubernetes.io/service-account-token" and (secret.data or {}).get(
                            "token"
                        ):
                            return base64.b64decode(secret.data["token"]).decode()
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"ServiceAccount {namespace}/{name} has no populated token Secret after {timeout:.0f} s "
                        f"(controller-manager log: {self.log_dir / 'kube-controller-manager.log'})"
                    )
                time.sleep(0.2)

    def process_rss_bytes(self) -> dict[str, int]:
        """Resident memory of each control-plane process, by name (read from /proc)."""
        rss: dict[str, int] = {}
        for proc in self._processes:
            try:
                status = Path(f"/proc/{proc.popen.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    rss[proc.name] = int(line.split()[1]) * 1024
        return rss

    def describe_logs(self) -> str:
        """One line per process naming its log file, for failure messages."""
        return "; ".join(f"{p.name}: {p.log_path}" for p in self._processes) or f"logs in {self.log_dir}"

    @property
    def audit_log(self) -> Path:
        """The API server's audit log (JSON lines, one per request at stage ResponseComplete or
        Panic, level Metadata: who, verb, resource, subresource, namespace, name, response code);
        only written when the cluster was made with ``audit=True``."""
        return self.log_dir / "audit.log"

    def audit_events(self) -> list[dict[str, Any]]:
        """Every audit event logged so far (the log backend writes each before the response)."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------------------------ internals
    def _spawn(self, name: str, argv: list[str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            # A new session so a Ctrl-C aimed at pytest does not reach the control plane mid-teardown.
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._processes.append(_Process(name, popen, log_path))

    def _start_etcd(self) -> None:
        peer_port = free_port()
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=kubetune-test",
                f"--data-dir={self._work / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubetune-test={peer_url}",
                "--log-level=warn",
                "--logger=zap",
            ],
        )

    def _start_apiserver(self) -> None:
        tokens = self._work / "tokens.csv"
        # token,user,uid,"group,..." — the admin is a system:masters member, which RBAC always allows.
        tokens.write_text(f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        tokens.chmod(0o600)
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                f"--cert-dir={self._pki}",
                f"--tls-cert-file={self._pki / 'apiserver.crt'}",
                f"--tls-private-key-file={self._pki / 'apiserver.key'}",
                f"--client-ca-file={self.ca_cert}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={self._pki / 'sa.pub'}",
                f"--service-account-signing-key-file={self._pki / 'sa.key'}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                # Defaults minus the storage-class plugin, which only logs noise without a StorageClass.
                "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,"
                "DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota,"
                "Priority",
                "--v=1",
                *self._audit_flags(),
            ],
        )

    def _audit_flags(self) -> list[str]:
        if not self.audit:
            return []
        policy = self._work / "audit-policy.yaml"
        # One event per request, when its response is complete (long-running watches: when they end).
        policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\n"
            "omitStages: [RequestReceived, ResponseStarted]\nrules:\n- level: Metadata\n"
        )
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
        ]

    def _start_controller_manager(self) -> None:
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                # Its own serving port must not collide with a second cluster on the same machine.
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--port=0",
                f"--cert-dir={self._work / 'kcm-certs'}",
                # Token Secrets get ca.crt from here and a token signed with the key the apiserver checks.
                f"--root-ca-file={self.ca_cert}",
                f"--service-account-private-key-file={self._pki / 'sa.key'}",
                f"--cluster-signing-cert-file={self.ca_cert}",
                f"--cluster-signing-key-file={self._pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--controllers=*",
                # One controller manager per cluster: electing a leader only adds a start-up delay.
                "--leader-elect=false",
                "--v=1",
            ],
        )

    def _check_alive(self) -> None:
        for proc in self._processes:
            code = proc.popen.poll()
            if code is not None:
                tail = _tail(proc.log_path, 20)
                raise ClusterStartError(f"{proc.name} exited with {code}; log {proc.log_path}:\n{tail}")

    def _wait_ready(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        request = urllib.request.Request(
            f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(request, context=context, timeout=5) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.2)
        raise ClusterStartError(
            f"kube-apiserver not ready after {self.startup_timeout:.0f} s ({last_error}); {self.describe_logs()}"
        )

    def _wait_controllers(self) -> None:
        """Ready means the token controller works: the default ServiceAccount has its token Secret."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            self._check_alive()
            try:
                self.service_account_token("default", "default", timeout=1.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise ClusterStartError(
                        f"kube-controller-manager did not populate the default ServiceAccount token within "
                        f"{self.startup_timeout:.0f} s; {self.describe_logs()}"
                    ) from None

    def _write_kubeconfig(self, path: Path, token: str, *, user: str) -> None:
        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_cert)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "kubetune-test", "user": user}}],
            "current-context": user,
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        # It holds a bearer token.
        path.chmod(0o600)

    def _write_pki(self) -> None:
        """A CA, a serving certificate it signs, and the service-account signing key pair."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self._pki.mkdir(parents=True, exist_ok=True)

        def key_pem(key: rsa.RSAPrivateKey) -> bytes:
            return key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )

        def write(name: str, data: bytes, mode: int = 0o644) -> None:
            (self._pki / name).write_bytes(data)
            (self._pki / name).chmod(mode)

        now = datetime.datetime.now(datetime.UTC)
        validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))

        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-test-ca")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        sans: list[x509.GeneralName] = [
            x509.DNSName(name)
            for name in (
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            )
        ]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", KUBERNETES_SERVICE_IP)]
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )

        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write("ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
        write("ca.key", key_pem(ca_key), 0o600)
        write("apiserver.crt", server_cert.public_bytes(serialization.Encoding.PEM))
        write("apiserver.key", key_pem(server_key), 0o600)
        write("sa.key", key_pem(sa_key), 0o600)
        write(
            "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )


def _terminate(popen: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process (by PID), wait ``grace`` seconds, then SIGKILL it."""
    if popen.poll() is not None:
        return
    try:
        popen.send_signal(signal.SIGTERM)
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=10)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
