"""The workload CA: the certificates it issues (chained to it, the caller's SPIFFE ID and pod,
short-lived, for clients and servers), where its key is kept, and what each Envoy is handed."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extproc.ops.workload_ca import CA_CERT_FILE, CA_KEY_FILE, CAError, Issuer, WorkloadCA
from extproc.policy.caller import LOCAL, Caller
from extproc.policy.peer_identity import WorkloadName
from extproc.protocol import TRUST_BUNDLE_SECRET, WORKLOAD_SECRET

NOW = 1_800_000_000.0
POD = Caller("shop", "payments", "payments-7d9f-q8x2z", uid="0b6c-11aa")


@pytest.fixture(scope="module")
def ca() -> WorkloadCA:
    return WorkloadCA.generate(NOW)


def test_a_workload_certificate(ca):
    issued = ca.issue(WorkloadName("shop", "payments", "payments-7d9f-q8x2z", "0b6c-11aa"), 3600, NOW)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    # chained to the CA: its signature verifies with the CA's key
    ca.cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    assert cert.issuer == ca.cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/shop/sa/payments"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "payments-7d9f-q8x2z"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "0b6c-11aa"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # short-lived: valid from a minute before it was made, for its lifetime; renewed at half of it
    assert cert.not_valid_after_utc == dt.datetime.fromtimestamp(NOW + 3600, dt.UTC)
    assert cert.not_valid_before_utc == dt.datetime.fromtimestamp(NOW - 60, dt.UTC)
    assert issued.renew_at == NOW + 1800 and issued.serial == cert.serial_number
    key = x509.load_pem_x509_certificate(issued.cert_pem).public_key()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    assert load_pem_private_key(issued.key_pem, None).public_key().public_numbers() == key.public_numbers()


def test_what_each_envoy_is_handed(ca):
    clock = [NOW]
    issuer = Issuer(ca, ttl_s=600, clock=lambda: clock[0])
    bundle, again = issuer.secret(TRUST_BUNDLE_SECRET, POD, False)
    assert bundle.validation_context.trusted_ca.inline_bytes == ca.ca_pem and again == float("inf")
    secret, renew_at = issuer.secret(WORKLOAD_SECRET, POD, False)
    assert secret.name == WORKLOAD_SECRET and renew_at == NOW + 300
    first = x509.load_pem_x509_certificate(secret.tls_certificate.certificate_chain.inline_bytes)
    assert b"PRIVATE KEY" in secret.tls_certificate.private_key.inline_bytes
    # another stream of the same workload, before the renewal: the same certificate
    clock[0] = NOW + 299
    same, _ = issuer.secret("spiffe://cluster.local/ns/shop/sa/payments", POD, False)
    assert x509.load_pem_x509_certificate(same.tls_certificate.certificate_chain.inline_bytes) == first
    assert same.name == "spiffe://cluster.local/ns/shop/sa/payments"  # under the name it was asked by
    # at the renewal: a new one
    clock[0] = NOW + 300
    renewed, renew_again = issuer.secret(WORKLOAD_SECRET, POD, False)
    assert x509.load_pem_x509_certificate(renewed.tls_certificate.certificate_chain.inline_bytes).serial_number != \
        first.serial_number and renew_again == NOW + 600
    # never another workload's, nor a gateway's, to a sidecar; the operator's Envoy may name one
    assert issuer.secret("spiffe://cluster.local/ns/shop/sa/web", POD, False) is None
    assert issuer.secret("spiffe://cluster.local/ns/llm-gateway/sa/egress", POD, False) is None
    gateway, _ = issuer.secret("spiffe://cluster.local/ns/llm-gateway/sa/egress", LOCAL, True)
    cert = x509.load_pem_x509_certificate(gateway.tls_certificate.certificate_chain.inline_bytes)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/llm-gateway/sa/egress"]
    assert issuer.secret("something-else", POD, True) is None


def test_the_ca_in_a_directory_is_made_once_and_kept(tmp_path):
    folder = tmp_path / "ca"
    made = WorkloadCA.from_directory(str(folder))
    assert stat.S_IMODE((folder / CA_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    again = WorkloadCA.from_directory(str(folder))
    assert again.ca_pem == made.ca_pem == (folder / CA_CERT_FILE).read_bytes()
    # a certificate of one loads as the other's
    issued = again.issue(WorkloadName("shop", "payments"), 60, NOW)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    made.cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


def test_a_bad_ca_is_refused_naming_where(tmp_path, ca):
    other = WorkloadCA.generate(NOW)
    leaf = ca.issue(WorkloadName("shop", "payments"), 60, NOW)
    cases = {
        "garbage": (b"not a certificate", b"not a key", "not a PEM certificate"),
        "not-a-ca": (leaf.cert_pem, leaf.key_pem, "is not a CA's"),
        "key-of-another": (ca.ca_pem, other.issue(WorkloadName("a", "b"), 60, NOW).key_pem,
                           "does not belong to the certificate"),
    }
    for name, (cert_pem, key_pem, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / CA_CERT_FILE).write_bytes(cert_pem)
        (folder / CA_KEY_FILE).write_bytes(key_pem)
        with pytest.raises(CAError) as refused:
            WorkloadCA.from_directory(str(folder))
        assert f"--workload-ca {folder}" in str(refused.value) and message in str(refused.value), refused.value
    half = tmp_path / "half"
    half.mkdir()
    (half / CA_CERT_FILE).write_bytes(ca.ca_pem)
    with pytest.raises(CAError, match="No such file"):
        WorkloadCA.from_directory(str(half))

