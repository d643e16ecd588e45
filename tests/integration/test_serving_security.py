"""Bearer-token auth and TLS on both protocols of a real `pollinate serve`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from tests.support.serving import MODEL, default_repository, serve

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_repository(tmp_path_factory.mktemp("secure"))


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _x() -> np.ndarray:
    return np.zeros((1, 1, 28, 28), dtype=np.float32)


def test_bearer_token_is_required_except_for_health(repo: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with serve(repo, tmp_path, "--token-file", str(token_file)) as server:
        anonymous = thttp.InferenceServerClient(server.http_url)
        assert anonymous.is_server_live() and anonymous.is_server_ready()  # probes stay open
        inp = thttp.InferInput("input", [1, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(_x())
        with pytest.raises(InferenceServerException, match="bearer token"):
            anonymous.infer(MODEL, [inp])
        with pytest.raises(InferenceServerException, match="bearer token"):
            anonymous.infer(MODEL, [inp], headers={"Authorization": "Bearer wrong-token-000000000"})
        ok = anonymous.infer(MODEL, [inp], headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.as_numpy("logits").shape == (1, 10)

        grpc = tgrpc.InferenceServerClient(server.grpc_url)
        ginp = tgrpc.InferInput("input", [1, 1, 28, 28], "FP32")
        ginp.set_data_from_numpy(_x())
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            grpc.infer(MODEL, [ginp])
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            grpc.get_model_metadata(MODEL)
        got = grpc.infer(MODEL, [ginp], headers={"authorization": f"Bearer {TOKEN}"})
        assert got.as_numpy("logits").shape == (1, 10)
        assert grpc.is_server_live()
        assert server.metric("pollinate_serving_requests_total") == 2


def test_tls_on_both_protocols_and_plaintext_is_refused(repo: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with serve(repo, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key)) as server:
        secure = tgrpc.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(cert))
        ginp = tgrpc.InferInput("input", [1, 1, 28, 28], "FP32")
        ginp.set_data_from_numpy(_x())
        assert secure.infer(MODEL, [ginp]).as_numpy("logits").shape == (1, 10)
        plain = tgrpc.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            plain.is_server_live(client_timeout=5)

        url = f"https://127.0.0.1:{server.http}/v2/health/ready"
        verified = subprocess.run(
            ["curl", "-s", "--cacert", str(cert), "-w", "%{http_code}", "-o", "/dev/null", url],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert verified.stdout == "200"
        unverified = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", url], capture_output=True, timeout=30
        )
        assert unverified.returncode != 0, "curl must reject a certificate it cannot verify"
        plaintext = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{server.http}/v2/health/ready"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert plaintext.stdout != "200"
