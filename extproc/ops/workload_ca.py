"""The control plane's certificate authority for workload certificates: the key that signs them,
where it is kept, and what each Envoy is issued.

A sidecar reaches an egress gateway over mutual TLS with a short-lived certificate naming its
workload (`extproc.policy.peer_identity`), issued here against the credentials its Envoy proved
to the control plane (its pod-bound ServiceAccount token), and served to it over SDS
(`extproc.envoy.secrets`); an egress gateway's Envoy is issued its own the same way, and both get
the CA's certificate to verify the other end with. A certificate is renewed at half its
lifetime and pushed on the same SDS stream, as Istio's agent does; Envoy swaps it in without
dropping a connection.

The signing key lives:
- in Kubernetes, in the Secret `llm-gateway-workload-ca` of the control plane's namespace
  (`ca.crt`, `ca.key`): read at start, or made by the first replica that finds none (the others
  then read it), so every replica issues certificates the gateways trust;
- with `--workload-ca DIR`, in `DIR/ca.crt` and `DIR/ca.key` (made there, 0600, when missing);
- otherwise generated at start, in memory: one process's CA, for a local setup.

ECDSA P-256 keys throughout (a certificate costs well under a millisecond to make).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from ..envoy.secrets import certificate_secret, trust_bundle_secret
from ..policy.caller import Caller
from ..policy.peer_identity import WorkloadName, granted, renewal_time
from ..protocol import TRUST_BUNDLE_SECRET

log = logging.getLogger(__name__)

CA_CERT_FILE, CA_KEY_FILE = "ca.crt", "ca.key"
CA_SECRET = "llm-gateway-workload-ca"
DEFAULT_TTL_S = 3600.0  # a workload certificate's lifetime (--workload-cert-ttl); renewed at half of it
BACKDATE_S = 60  # not_before in the past, for clocks a little behind ours
CA_YEARS = 10
MAX_ISSUED = 20000  # certificates kept for reuse (one per workload identity), past it the expired ones go

_SUBJECT_OIDS = {"CN": NameOID.COMMON_NAME, "serialNumber": NameOID.SERIAL_NUMBER}


class CAError(Exception):
    """The CA cannot be loaded or made: says what and where."""


@dataclass(frozen=True)
class Issued:
    """A workload certificate and its key, PEM, when it was made and until when it is valid."""

    cert_pem: bytes
    key_pem: bytes
    issued_at: float
    not_after: float
    serial: int

    @property
    def renew_at(self) -> float:
        """Half its lifetime from when it was made (its not_before is a minute earlier, for
        clocks behind ours, which must not bring the renewal forward)."""
        return renewal_time(self.issued_at, self.not_after)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class WorkloadCA:
    """The CA: its certificate and signing key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.cert = cert
        self._key = key
        self.ca_pem = cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def generate(cls, now: float | None = None) -> WorkloadCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llm-gateway"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "llm-gateway workload CA")])
        start = dt.datetime.fromtimestamp(now if now is not None else time.time(), dt.UTC)
        public = key.public_key()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(start - dt.timedelta(seconds=BACKDATE_S))
                .not_valid_after(start + dt.timedelta(days=365 * CA_YEARS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, where: str) -> WorkloadCA:
        """The CA from its PEM files' contents; `where` names them in an error."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CAError(f"{where}: not a PEM certificate and unencrypted private key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{where}: the CA key must be an ECDSA key")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CAError(f"{where}: the certificate is not a CA's (basicConstraints CA:TRUE)")
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.public_numbers() != \
                key.public_key().public_numbers():
            raise CAError(f"{where}: the key does not belong to the certificate")
        return cls(cert, key)

    @classmethod
    def from_directory(cls, directory: str) -> WorkloadCA:
        """`DIR/ca.crt` and `DIR/ca.key`, made there when neither exists."""
        folder = Path(directory)
        cert_file, key_file = folder / CA_CERT_FILE, folder / CA_KEY_FILE
        if not cert_file.exists() and not key_file.exists():
            ca = cls.generate()
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(_pem_key(ca._key))
            cert_file.write_bytes(ca.ca_pem)
            log.info("workload CA made in %s", folder)
            return ca
        try:
            return cls.from_pem(cert_file.read_bytes(), key_file.read_bytes(), f"--workload-ca {directory}")
        except OSError as exc:
            raise CAError(f"--workload-ca {directory}: {exc.strerror}: {exc.filename}") from None

    @classmethod
    def from_kubernetes(cls, api_client: Any, namespace: str, name: str = CA_SECRET) -> WorkloadCA:
        """The Secret `name` in `namespace` (`ca.crt`, `ca.key`), made when missing. Replicas
        starting together: one creates it, the others find it taken (409) and read it."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(api_client)
        where = f"Secret {namespace}/{name}"
        for _ in range(3):
            try:
                secret = core.read_namespaced_secret(name, namespace, _request_timeout=10)
            except ApiException as exc:
                if exc.status != 404:
                    raise CAError(f"cannot read the workload CA's {where}: {exc.status} {exc.reason}") from None
            else:
                data = secret.data or {}
                if CA_CERT_FILE not in data or CA_KEY_FILE not in data:
                    raise CAError(f"{where} must hold {CA_CERT_FILE} and {CA_KEY_FILE}")
                return cls.from_pem(base64.b64decode(data[CA_CERT_FILE]), base64.b64decode(data[CA_KEY_FILE]),
                                    where)
            ca = cls.generate()
            body = client.V1Secret(metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels={
                "app.kubernetes.io/part-of": "llm-gateway"}), type="Opaque", data={
                CA_CERT_FILE: base64.b64encode(ca.ca_pem).decode(),
                CA_KEY_FILE: base64.b64encode(_pem_key(ca._key)).decode()})
            try:
                core.create_namespaced_secret(namespace, body, _request_timeout=10)
            except ApiException as exc:
                if exc.status == 409:  # another replica made it first: read theirs
                    continue
                raise CAError(f"cannot create the workload CA's {where}: {exc.status} {exc.reason}") from None
            log.info("workload CA made in %s", where)
            return ca
        raise CAError(f"the workload CA's {where} could not be read or made")

    def issue(self, name: WorkloadName, ttl_s: float, now: float) -> Issued:
        """A workload certificate for `name`, valid from a minute ago for `ttl_s` seconds: its
        SPIFFE ID as the only URI SAN, its pod in the subject; for TLS clients and servers."""
        key = ec.generate_private_key(ec.SECP256R1())
        not_before = now - BACKDATE_S
        not_after = now + ttl_s
        serial = x509.random_serial_number()
        subject = x509.Name([x509.NameAttribute(_SUBJECT_OIDS[k], v) for k, v in name.subject()])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(dt.datetime.fromtimestamp(not_before, dt.UTC))
                .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.UTC))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(name.spiffe_id)]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
        # a certificate's validity is in whole seconds: the renewal is reckoned from what Envoy holds
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), now,
                      cert.not_valid_after_utc.timestamp(), serial)


class Issuer:
    """What an Envoy asking the control plane for a secret gets: the CA bundle
    (`TRUST_BUNDLE_SECRET`) to anyone it admitted, and a workload certificate for the identity
    it may have (`extproc.policy.peer_identity.granted`), kept and handed to every stream of the
    same workload until its renewal time, then replaced."""

    def __init__(self, ca: WorkloadCA, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time):
        self.ca = ca
        self.ttl_s = ttl_s
        self._clock = clock
        self._issued: dict[WorkloadName, Issued] = {}
        self._bundle = trust_bundle_secret(ca.ca_pem)

    def issued(self, name: WorkloadName) -> Issued:
        """The current certificate for `name`: the one kept, or a new one once it is due."""
        now = self._clock()
        current = self._issued.get(name)
        if current is None or now >= current.renew_at:
            if len(self._issued) >= MAX_ISSUED:
                self._issued = {k: v for k, v in self._issued.items() if v.not_after > now}
                if len(self._issued) >= MAX_ISSUED:
                    self._issued.clear()
            current = self._issued[name] = self.ca.issue(name, self.ttl_s, now)
            log.info("issued a workload certificate for %s%s, serial %x, valid until %s", name.spiffe_id,
                     f" (pod {name.pod})" if name.pod else "", current.serial,
                     dt.datetime.fromtimestamp(current.not_after, dt.UTC).isoformat(timespec="seconds"))
        return current

    def secret(self, requested: str, caller: Caller, operator: bool) -> tuple[secret_pb2.Secret, float] | None:
        """The secret `requested` for this caller and when it must be sent again (inf: never),
        or None when the caller may not have it."""
        if requested == TRUST_BUNDLE_SECRET:
            return self._bundle, float("inf")
        name = granted(requested, caller, operator)
        if name is None:
            return None
        issued = self.issued(name)
        return certificate_secret(requested, issued.cert_pem, issued.key_pem), issued.renew_at
