"""A TLS-terminating proxy in front of the plain-AMQP RabbitMQ, so amqps:// is tested end to
end without reconfiguring the broker.

    material = make_tls_material(tmp_path)               # throwaway CA + localhost cert
    async with TlsProxy(material) as proxy:
        url = proxy.amqps_url(amqp_url)                  # amqps://...@localhost:PORT/vhost?cafile=
        ...

The certificates are made with the `cryptography` package when it is importable, else with
the `openssl` command. aiormq reads `cafile`, `capath`, `cadata` (base64), `certfile`,
`keyfile` and `no_verify_ssl` from the URL's query (aiormq/connection.py, `SSLCerts`), builds
`ssl.create_default_context(cafile=...)` from them and verifies the host name it dialled, so
the server certificate names `localhost` and 127.0.0.1.
"""

import datetime
import ipaddress
import shutil
import ssl
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from netproxy import LOCALHOST, TcpProxy

SERVER_NAME = "localhost"
VALID_DAYS = 2


@dataclass(frozen=True)
class TlsMaterial:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


def make_tls_material(directory: Path, name: str = "swarm-test") -> TlsMaterial:
    """A fresh self-signed CA and a server certificate it signed, for `localhost` and
    127.0.0.1, written as PEM files under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    material = TlsMaterial(
        ca_file=directory / f"{name}-ca.pem",
        cert_file=directory / f"{name}-server.pem",
        key_file=directory / f"{name}-server.key",
    )
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _make_with_openssl(directory, name, material)
    else:
        _make_with_cryptography(name, material)
    return material


def _make_with_cryptography(name: str, material: TlsMaterial) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(SERVER_NAME),
                    x509.IPAddress(ipaddress.ip_address(LOCALHOST)),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    material.ca_file.write_bytes(ca_cert.public_bytes(pem))
    material.cert_file.write_bytes(cert.public_bytes(pem))
    material.key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    material.key_file.chmod(0o600)


def _make_with_openssl(directory: Path, name: str, material: TlsMaterial) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("neither the `cryptography` package nor `openssl` is available")
    ca_key = directory / f"{name}-ca.key"
    csr = directory / f"{name}-server.csr"
    extensions = directory / f"{name}-server.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName=DNS:{SERVER_NAME},IP:{LOCALHOST}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )

    def run(*args: str | Path) -> None:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    run(
        "req", "-x509", *ec, "-keyout", ca_key, "-out", material.ca_file,
        "-days", str(VALID_DAYS), "-subj", f"/CN={name} CA",
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    run(
        "req", "-new", *ec, "-keyout", material.key_file, "-out", csr,
        "-subj", f"/CN={SERVER_NAME}",
    )  # fmt: skip
    run(
        "x509", "-req", "-in", csr, "-CA", material.ca_file, "-CAkey", ca_key,
        "-CAcreateserial", "-out", material.cert_file, "-days", str(VALID_DAYS),
        "-extfile", extensions,
    )  # fmt: skip
    material.key_file.chmod(0o600)


class TlsProxy(TcpProxy):
    """TLS on the listening side (the server certificate of `material`), plaintext AMQP to
    RabbitMQ on 127.0.0.1:5672. Faults (cut, stall, block) work as on `TcpProxy`."""

    def __init__(
        self, material: TlsMaterial, target_host: str = LOCALHOST, target_port: int = 5672
    ) -> None:
        super().__init__(target_host, target_port, server_ssl=material.server_context())
        self.material = material

    @property
    def ca_file(self) -> Path:
        return self.material.ca_file

    def amqps_url(
        self, amqp_url: str, *, cafile: Path | str | None = None, use_own_ca: bool = True
    ) -> str:
        """`amqps://user:pass@localhost:PORT/<vhost of amqp_url>?cafile=<CA>`. `cafile`
        names another CA file; `use_own_ca=False` gives no CA at all (the system's trust)."""
        url = self.url_for(amqp_url, host=SERVER_NAME, scheme="amqps")
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query)
        query = [(key, value) for key, value in query if key != "cafile"]
        ca = cafile if cafile is not None else (self.ca_file if use_own_ca else None)
        if ca is not None:
            query.append(("cafile", str(ca)))
        return urllib.parse.urlunsplit(
            parts._replace(query=urllib.parse.urlencode(query, safe="/"))
        )
