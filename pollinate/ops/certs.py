"""Development certificates for a real federation: a CA, the SuperLink's TLS certificate and
the SuperNodes' authentication key pairs (``pollinate certs``).

For tests and first steps; production brings its own PKI. Everything is EC P-384 (Flower's
SuperNode authentication takes NIST curves only):

```
DIR/ca.crt             the CA certificate: SuperNodes and the flwr CLI trust it
DIR/ca.key             the CA key (0600): keep it off the server in real use
DIR/server.pem         the SuperLink's certificate, for the given host names / IPs
DIR/server.key         its key (0600)
DIR/nodes/node-<i>     SuperNode i's private key, OpenSSH format (0600): stays on the device
DIR/nodes/node-<i>.pub its public key, OpenSSH format: the SuperLink trusts it
```

Every file is written atomically, private keys never wider than 0600, and nothing that
exists is overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pollinate._atomic import atomic_write_bytes, create_private
from pollinate.errors import ConfigError

__all__ = ["CertificateSet", "make_certificates"]


@dataclass(frozen=True)
class CertificateSet:
    """Where ``make_certificates`` put everything."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]
    node_public_keys: tuple[Path, ...]


def _subject_names(hosts: list[str]) -> list[object]:
    from cryptography import x509

    names: list[object] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificates(
    out: Path, *, nodes: int, hosts: list[str] | None = None, days: int = 365
) -> CertificateSet:
    """Write a development CA, a SuperLink certificate for ``hosts`` and ``nodes`` key pairs.

    Args:
        out: Destination folder (created); none of the files may exist yet.
        nodes: How many SuperNode key pairs (0 or more).
        hosts: Names and IPs the SuperLink is reached at (default: localhost, 127.0.0.1, ::1).
        days: Validity of the certificates.

    Raises:
        ConfigError: Bad arguments, or a file that would be overwritten.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if nodes < 0:
        raise ConfigError(f"--nodes must be 0 or more, got {nodes}")
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    hosts = hosts or ["localhost", "127.0.0.1", "::1"]
    out = Path(out)
    paths = CertificateSet(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        node_keys=tuple(out / "nodes" / f"node-{i}" for i in range(nodes)),
        node_public_keys=tuple(out / "nodes" / f"node-{i}.pub" for i in range(nodes)),
    )
    every = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key,
             *paths.node_keys, *paths.node_public_keys]  # fmt: skip
    existing = [p for p in every if p.exists()]
    if existing:
        raise ConfigError(
            f"{existing[0]} already exists; pollinate certs never overwrites keys. "
            "Choose an empty folder (or remove the old files yourself)"
        )
    blocker = next((q for q in (out, *out.parents) if q.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"{out}: {blocker} is a file, not a folder; choose a folder for the keys")
    try:
        (out / "nodes").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create {out / 'nodes'}: {err.strerror}") from err

    now = dt.datetime.now(dt.UTC)
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()

    def name(common: str) -> x509.Name:
        return x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pollinate development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ])  # fmt: skip

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("pollinate development CA"))
        .issuer_name(name("pollinate development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)  # type: ignore[arg-type]
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    create_private(
        paths.ca_key, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password)
    )
    atomic_write_bytes(paths.ca_cert, ca_cert.public_bytes(pem))
    create_private(
        paths.server_key,
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_password),
    )
    atomic_write_bytes(paths.server_cert, server_cert.public_bytes(pem))
    for private_path, public_path in zip(paths.node_keys, paths.node_public_keys, strict=True):
        key = ec.generate_private_key(ec.SECP384R1())
        create_private(
            private_path, key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, no_password)
        )
        atomic_write_bytes(
            public_path,
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + b"\n",
        )
    return paths
