"""A real Kubernetes 1.36 CRD API server on loopback: etcd + apiextensions-apiserver.

The binaries come from ``tests/cluster/build-apiextensions.sh`` (apiextensions-apiserver v1.36.4 built
from Debian sid's Go sources with a wrapper main that publishes CRDs in OpenAPI v2/v3; etcd 3.5.30).
apiextensions-apiserver is the code kube-apiserver runs for CustomResourceDefinitions and custom
resources: structural schemas, defaulting, pruning, ``fieldValidation``, CEL
``x-kubernetes-validations`` with their cost limits, the status subresource, printer columns, OpenAPI.

What it is not: a whole cluster. It serves no core API (no namespaces, pods, RBAC or Jobs), no
``/api`` or ``/apis`` root discovery (so kubectl cannot talk to it; use REST paths) and its
``/readyz`` reports an informer-sync failure for the core Service informer it cannot feed. Requests
are served anyway. Namespaced custom resources can be created in any namespace name (the namespace
lifecycle admission plugin is off: there are no Namespace objects to check).

Authentication is x509 only: a self-made CA signs the serving certificate and an admin client
certificate in group ``system:masters``, which the delegating authorizer always allows, so no
TokenReview or SubjectAccessReview is ever needed. The server's own "core" kubeconfig (mandatory)
points at itself.

This module has no pytest dependency; ``tests/fixtures/crd_server.py`` wraps it in fixtures. Usage::

    with CRDServer(bin_dir) as server:
        http = server.session()                 # requests.Session, admin client cert, CA pinned
        r = http.get(server.url("/apis/apiextensions.k8s.io/v1/customresourcedefinitions"))
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.cluster.cluster import ClusterStartError, _Process, _tail, _terminate, free_port

if TYPE_CHECKING:
    import requests

ADMIN_USER = "kubetune-test-admin"
#: Admission plugins that need core objects or webhooks this server cannot reach (shared/FACTS.md).
DISABLED_ADMISSION_PLUGINS = (
    "NamespaceLifecycle",
    "MutatingAdmissionPolicy",
    "MutatingAdmissionWebhook",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionWebhook",
)
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


class CRDServer:
    """etcd and apiextensions-apiserver as local processes with self-made TLS and client-cert auth.

    What a caller may rely on after :meth:`start` returns:
      - ``server`` (``https://127.0.0.1:<port>``) lists CustomResourceDefinitions with 200 for the
        admin; TLS is verified against ``ca_cert`` (SANs 127.0.0.1 and localhost);
      - :meth:`session` is a ``requests.Session`` authenticated as a ``system:masters`` member (client
        certificate), with ``trust_env = False`` so ``REQUESTS_CA_BUNDLE``/proxies in the environment
        cannot override the pinned CA;
      - ``kubeconfig`` is an admin kubeconfig file (client certificate) for other clients;
      - process logs stay in ``log_dir`` after :meth:`stop` unless ``keep_logs=False``.

    Raises :class:`tests.cluster.cluster.ClusterStartError` from :meth:`start` when a binary is
    missing, a process dies or the server does not answer in time; the message names the log file.
    :meth:`stop` is idempotent and stops the processes by PID.
    """

    def __init__(
        self, bin_dir: Path | str, *, startup_timeout: float = 60.0, log_dir: Path | str | None = None
    ) -> None:
        self.bin_dir = Path(bin_dir)
        self.startup_timeout = startup_timeout
        self._work = Path(tempfile.mkdtemp(prefix="kubetune-crd-server-"))
        self.log_dir = (
            Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="kubetune-crd-server-logs-"))
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._pki = self._work / "pki"
        self.ca_cert = self._pki / "ca.crt"
        self.client_cert = self._pki / "admin.crt"
        self.client_key = self._pki / "admin.key"
        self.port = 0
        self.etcd_port = 0
        self.startup_seconds = 0.0
        self._processes: list[_Process] = []
        self._stopped = False

    # ----------------------------------------------------------------------------------------- life
    @property
    def server(self) -> str:
        """The apiserver URL, e.g. ``https://127.0.0.1:41234``."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client certificate in ``system:masters``, CA pinned)."""
        return self._work / "admin.kubeconfig"

    def url(self, path: str) -> str:
        """``server`` + ``path`` (a REST path starting with ``/``)."""
        return self.server + path

    def start(self) -> None:
        """Start etcd, then the apiserver, and wait until the apiserver serves the CRD API."""
        for binary in ("etcd", "apiextensions-apiserver"):
            if not (self.bin_dir / binary).is_file():
                raise ClusterStartError(
                    f"{self.bin_dir / binary} is missing; run tests/cluster/build-apiextensions.sh"
                )
        started = time.monotonic()
        self._write_pki()
        self.etcd_port = free_port()
        self.port = free_port()
        self._write_kubeconfig()
        try:
            self._start_etcd()
            self._start_apiserver()
            self._wait_serving()
        except BaseException:
            # The logs are what explains a failed start: keep them.
            self.stop(keep_logs=True)
            raise
        self.startup_seconds = time.monotonic() - started

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

    def __enter__(self) -> CRDServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------------------------- helpers
    def session(self) -> requests.Session:
        """A ``requests.Session`` for the admin: client certificate, pinned CA, environment ignored."""
        import requests

        http = requests.Session()
        # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE in the environment would override `verify` (FACTS.md).
        http.trust_env = False
        http.verify = str(self.ca_cert)
        http.cert = (str(self.client_cert), str(self.client_key))
        http.headers["Accept"] = "application/json"
        return http

    def process_rss_bytes(self) -> dict[str, int]:
        """Resident memory of each process, by name (read from /proc)."""
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

    # ------------------------------------------------------------------------------------ internals
    def _spawn(self, name: str, argv: list[str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            # A new session so a Ctrl-C aimed at pytest does not reach the server mid-teardown.
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
                "--name=kubetune-crd-test",
                f"--data-dir={self._work / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubetune-crd-test={peer_url}",
                "--log-level=warn",
                "--logger=zap",
            ],
        )

    def _start_apiserver(self) -> None:
        self._spawn(
            "apiextensions-apiserver",
            [
                str(self.bin_dir / "apiextensions-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self._pki}",
                f"--tls-cert-file={self._pki / 'apiserver.crt'}",
                f"--tls-private-key-file={self._pki / 'apiserver.key'}",
                f"--client-ca-file={self.ca_cert}",
                # The "core" API it would watch Services and webhooks on, and the delegated authn/authz
                # endpoints: all this server itself. system:masters needs neither TokenReview nor SAR.
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--authentication-skip-lookup",
                "--enable-priority-and-fairness=false",
                "--disable-admission-plugins=" + ",".join(DISABLED_ADMISSION_PLUGINS),
                "--v=1",
            ],
        )

    def _check_alive(self) -> None:
        for proc in self._processes:
            code = proc.popen.poll()
            if code is not None:
                tail = _tail(proc.log_path, 20)
                raise ClusterStartError(f"{proc.name} exited with {code}; log {proc.log_path}:\n{tail}")

    def _wait_serving(self) -> None:
        """Serving means: the admin can list CRDs (``/readyz`` stays unhealthy here, see the module doc)."""
        import requests

        http = self.session()
        deadline = time.monotonic() + self.startup_timeout
        last_error = ""
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    response = http.get(self.url(CRD_PATH), timeout=5)
                    if response.status_code == 200:
                        return
                    last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                except requests.RequestException as exc:
                    last_error = str(exc)
                time.sleep(0.1)
        finally:
            http.close()
        raise ClusterStartError(
            f"apiextensions-apiserver not serving after {self.startup_timeout:.0f} s ({last_error}); "
            f"{self.describe_logs()}"
        )

    def _write_kubeconfig(self) -> None:
        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-crd-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": ADMIN_USER,
                    "user": {
                        "client-certificate": str(self.client_cert),
                        "client-key": str(self.client_key),
                    },
                }
            ],
            "contexts": [
                {"name": ADMIN_USER, "context": {"cluster": "kubetune-crd-test", "user": ADMIN_USER}}
            ],
            "current-context": ADMIN_USER,
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _write_pki(self) -> None:
        """A CA, a serving certificate and an admin client certificate (O=system:masters) it signs."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self._pki.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)

        def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
            return key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )

        def write(name: str, data: bytes, mode: int = 0o644) -> None:
            (self._pki / name).write_bytes(data)
            (self._pki / name).chmod(mode)

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-crd-test-ca")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
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

        def leaf(subject: x509.Name, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None):
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
                )
            )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            return key, builder.sign(ca_key, hashes.SHA256())

        server_key, server_cert = leaf(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apiextensions-apiserver")]),
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )
        # x509 authentication maps CN to the user name and O to its groups.
        admin_key, admin_cert = leaf(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                    x509.NameAttribute(NameOID.COMMON_NAME, ADMIN_USER),
                ]
            ),
            ExtendedKeyUsageOID.CLIENT_AUTH,
            None,
        )
        write("ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
        write("apiserver.crt", server_cert.public_bytes(serialization.Encoding.PEM))
        write("apiserver.key", key_pem(server_key), 0o600)
        write("admin.crt", admin_cert.public_bytes(serialization.Encoding.PEM))
        write("admin.key", key_pem(admin_key), 0o600)
