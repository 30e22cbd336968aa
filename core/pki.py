"""The platform's certificate authority and the certificates its services present to
each other: every internal gRPC call (gateway, scheduler, agents) is mutual TLS.

One CA per platform and one certificate per component, whose common name says which
component holds it (`thaw-scheduler`, `thaw-gateway`, `thaw-agent`): a server tells an
agent from a gateway by it (`CALLERS`), and a client checks that it reached the
component it meant, whatever address it dialled (the name it verifies is the
component's). Files are PEM, mode 0600, in one folder: `thaw up` makes them under
$THAW_HOME/pki, `thaw pki init` anywhere (docs/security.md).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from thaw.core.errors import InvalidArgument

log = structlog.get_logger()

SCHEDULER = "scheduler"
GATEWAY = "gateway"
AGENT = "agent"
COMPONENTS = (SCHEDULER, GATEWAY, AGENT)
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
PKI_FOLDER = "pki"
"""Under a component's home: where `thaw up` keeps the platform's certificates."""
# Every certificate names these, so local tools can also verify by address.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
LEAF_DAYS = 825
# A certificate this close to its end is issued again by `ensure_pki` (`thaw up`).
RENEW_BEFORE_DAYS = 30

# Who may call what: a method, or a whole service by its prefix, and the components
# whose certificates may call it (an exact method wins over its service). A method
# listed nowhere is refused to everyone.
CALLERS: dict[str, frozenset[str]] = {
    "/thaw.v1.Scheduler/": frozenset({GATEWAY}),
    "/thaw.v1.Tenancy/": frozenset({GATEWAY}),
    "/thaw.v1.Invocations/": frozenset({GATEWAY}),
    "/thaw.v1.Metering/": frozenset({GATEWAY}),
    "/thaw.v1.NodeRegistry/": frozenset({AGENT}),
    "/thaw.v1.Secrets/": frozenset({GATEWAY}),
    "/thaw.v1.Volumes/GetBlob": frozenset({AGENT}),
    "/thaw.v1.Volumes/": frozenset({GATEWAY}),
    # Image archives: uploaded through the gateway, fetched by the nodes that load them.
    "/thaw.v1.Images/Fetch": frozenset({AGENT}),
    "/thaw.v1.Images/": frozenset({GATEWAY}),
    # Peer fetch of snapshot chunks is the only agent-to-agent call.
    "/thaw.v1.Agent/FetchChunks": frozenset({AGENT}),
    "/thaw.v1.Agent/": frozenset({SCHEDULER}),
    "/grpc.health.v1.Health/": frozenset(COMPONENTS),
}


def common_name(component: str) -> str:
    """The name a component's certificate carries and its clients verify."""
    return f"thaw-{component}"


def component_of(name: str) -> str | None:
    """The component a certificate's common name says, or None for a foreign name."""
    component = name.removeprefix("thaw-")
    return component if name.startswith("thaw-") and component in COMPONENTS else None


def allowed_callers(method: str) -> frozenset[str]:
    """The components that may call `method` ("/package.Service/Method")."""
    if method in CALLERS:
        return CALLERS[method]
    service = method[:method.rfind("/") + 1]
    return CALLERS.get(service, frozenset())


@dataclass(frozen=True)
class Identity:
    """What one component presents and trusts on internal gRPC: PEM bytes, read once."""

    component: str
    ca: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class PkiPaths:
    """The files of one PKI folder."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"


class TLSSettings(Protocol):
    """The settings a component reads its identity from (core/config_fields.py)."""

    @property
    def home(self) -> Path: ...
    @property
    def tls_ca(self) -> Path | None: ...
    @property
    def tls_cert(self) -> Path | None: ...
    @property
    def tls_key(self) -> Path | None: ...
    @property
    def insecure_internal(self) -> bool: ...


# ---- creating ------------------------------------------------------------------------

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    # Written whole under a temporary name, then renamed: a reader never sees half a
    # key, and the file is 0600 from its first byte.
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: small certificates and the cheapest handshakes gRPC's TLS offers.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def check_host(host: str) -> str:
    """A host name or address a certificate may name; InvalidArgument otherwise."""
    value = host.strip()
    if _is_ip(value):
        return value
    if not value or any(c in value for c in " /:@"):
        raise InvalidArgument(f"{host!r} is not a host name or IP address", field="host")
    return value


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _create_ca(paths: PkiPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    # A random serial in the name too: two platforms' CAs are told apart in logs.
    serial = x509.random_serial_number()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "thaw"),
                      x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"thaw platform CA {serial % 10**8:08d}")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(paths.ca_key, _key_pem(key))
    _write_private(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    log.info("platform CA created", path=str(paths.ca_cert))
    return cert, key


def _issue(paths: PkiPaths, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
           component: str, hosts: Iterable[str], name: str) -> None:
    key = _new_key()
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "thaw"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name(component))]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=LEAF_DAYS), ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            # Every component is a client; scheduler and agents are servers too.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                _san([common_name(component), *LOCAL_HOSTS, *hosts])), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(paths.key(name), _key_pem(key))
    _write_private(paths.cert(name), cert.public_bytes(serialization.Encoding.PEM))
    log.info("internal certificate issued", component=component, path=str(paths.cert(name)))


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _hosts_of(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))}


def _still_good(paths: PkiPaths, ca: x509.Certificate, component: str, hosts: set[str],
                name: str) -> bool:
    """Is the certificate there, from this CA, for this component, naming every host,
    with its key, and not about to expire?"""
    try:
        cert = _load_cert(paths.cert(name))
        key = serialization.load_pem_private_key(paths.key(name).read_bytes(), None)
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return (_cn(cert) == common_name(component)
            and _public_der(cert) == _public_der(key)
            and cert.not_valid_after_utc > _now() + datetime.timedelta(days=RENEW_BEFORE_DAYS)
            and {common_name(component), *LOCAL_HOSTS, *hosts} <= _hosts_of(cert))


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _public_der(holder: x509.Certificate | PrivateKeyTypes) -> bytes:
    return holder.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Two `thaw up` on one home must not both make a CA.
    with os.fdopen(os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _open_ca(paths: PkiPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The folder's CA, made when it has none; one that expires within
    RENEW_BEFORE_DAYS is replaced (every certificate is issued again with it)."""
    if paths.ca_cert.exists() and not paths.ca_key.exists():
        raise InvalidArgument(
            f"{paths.ca_cert} has no {CA_KEY} beside it: certificates can only be issued "
            "where the CA's key is", field="dir")
    if paths.ca_cert.exists():
        ca = _load_cert(paths.ca_cert)
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument(f"{paths.ca_key} is not an EC private key", field="dir")
        if ca.not_valid_after_utc > _now() + datetime.timedelta(days=RENEW_BEFORE_DAYS):
            return ca, key
        log.warning("platform CA about to expire; a new one is made", path=str(paths.ca_cert))
    return _create_ca(paths)


def ensure_pki(directory: Path, hosts: Iterable[str] = (),
               components: Iterable[str] = COMPONENTS) -> PkiPaths:
    """The CA and one certificate per component in `directory`, made once and reused:
    a certificate is issued again only when it is missing, is not from the folder's
    CA, lacks one of `hosts`, or expires within RENEW_BEFORE_DAYS."""
    wanted = {check_host(h) for h in hosts}
    paths = PkiPaths(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    with _locked(directory):
        ca, ca_key = _open_ca(paths)
        for component in components:
            if component not in COMPONENTS:
                raise InvalidArgument(f"unknown component {component!r}: one of "
                                      f"{', '.join(COMPONENTS)}", field="component")
            if not _still_good(paths, ca, component, wanted, component):
                _issue(paths, ca, ca_key, component, sorted(wanted), component)
    return paths


def issue_certificate(directory: Path, component: str, name: str,
                      hosts: Iterable[str] = ()) -> PkiPaths:
    """One more certificate of `component` from the folder's CA, kept as NAME.crt and
    NAME.key (an agent's own certificate naming its node, say); always a new key."""
    if component not in COMPONENTS:
        raise InvalidArgument(f"unknown component {component!r}: one of "
                              f"{', '.join(COMPONENTS)}", field="component")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise InvalidArgument(f"{name!r} is not a file name for a certificate", field="name")
    if name == "ca":
        raise InvalidArgument("the name ca is the CA's own", field="name")
    paths = PkiPaths(directory)
    if not paths.ca_cert.exists():
        raise InvalidArgument(f"no CA in {directory}: run `thaw pki init --dir {directory}` "
                              "first", field="dir")
    wanted = sorted({check_host(h) for h in hosts})
    with _locked(directory):
        ca, ca_key = _open_ca(paths)
        _issue(paths, ca, ca_key, component, wanted, name)
    return paths


@dataclass(frozen=True)
class CertificateInfo:
    """One certificate of a PKI folder, as `thaw pki show` lists it."""

    name: str
    component: str
    """"ca" for the CA; "" when its name is no component's."""
    hosts: tuple[str, ...]
    not_after: datetime.datetime
    from_ca: bool
    """Signed by the folder's CA (the CA: by itself)."""


def certificates(directory: Path) -> list[CertificateInfo]:
    """The folder's CA and every certificate beside it, the CA first."""
    paths = PkiPaths(directory)
    if not paths.ca_cert.exists():
        raise InvalidArgument(f"no CA in {directory} ({CA_CERT} is missing)", field="dir")
    ca = _load_cert(paths.ca_cert)
    out = [CertificateInfo("ca", "ca", (), ca.not_valid_after_utc, True)]
    for path in sorted(directory.glob("*.crt")):
        if path == paths.ca_cert:
            continue
        try:
            cert = _load_cert(path)
        except ValueError as exc:
            raise InvalidArgument(f"{path} is not a PEM certificate", field="dir") from exc
        try:
            cert.verify_directly_issued_by(ca)
            from_ca = True
        except (ValueError, TypeError, InvalidSignature):
            from_ca = False
        out.append(CertificateInfo(path.stem, component_of(_cn(cert)) or "",
                                   tuple(sorted(_hosts_of(cert))), cert.not_valid_after_utc,
                                   from_ca))
    return out


# ---- loading -------------------------------------------------------------------------

def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {setting} {path}: {exc.strerror}",
                              field=setting) from exc


def load_identity(component: str, ca_path: Path, cert_path: Path,
                  key_path: Path) -> Identity:
    """A component's identity from its files, checked: the certificate is the
    component's, from that CA, in date, and matches the key. InvalidArgument names the
    setting at fault."""
    ca_pem = _read(ca_path, "tls_ca")
    cert_pem = _read(cert_path, "tls_cert")
    key_pem = _read(key_path, "tls_key")
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise InvalidArgument(f"tls_ca {ca_path} is not a PEM certificate",
                              field="tls_ca") from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise InvalidArgument(f"tls_cert {cert_path} is not a PEM certificate",
                              field="tls_cert") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"tls_key {key_path} is not an unencrypted PEM private key",
                              field="tls_key") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InvalidArgument(f"tls_cert {cert_path} is not signed by the CA in {ca_path}",
                              field="tls_cert") from exc
    if _cn(cert) != common_name(component):
        raise InvalidArgument(
            f"tls_cert {cert_path} is {_cn(cert) or 'unnamed'}'s certificate, not "
            f"{common_name(component)}'s", field="tls_cert")
    if _public_der(cert) != _public_der(key):
        raise InvalidArgument(f"tls_key {key_path} is not the key of {cert_path}",
                              field="tls_key")
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise InvalidArgument(
            f"tls_cert {cert_path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d}", field="tls_cert")
    if key_path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("internal TLS key is readable by other users", path=str(key_path))
    return Identity(component=component, ca=ca_pem, cert=cert_pem, key=key_pem)


def identity_paths(settings: TLSSettings, component: str) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) a component reads: the settings', else those `thaw up`
    makes under $THAW_HOME/pki."""
    default = PkiPaths(settings.home / PKI_FOLDER)
    return (settings.tls_ca or default.ca_cert, settings.tls_cert or default.cert(component),
            settings.tls_key or default.key(component))


def internal_identity(settings: TLSSettings, component: str) -> Identity | None:
    """What `component` presents on internal gRPC; None only under the explicit
    development opt-out `insecure_internal`. Without certificates a service does not
    start: InvalidArgument says which file is missing and how to make it."""
    if settings.insecure_internal:
        log.warning("INSECURE: internal gRPC without TLS or any credential "
                    "(insecure_internal=true): whoever reaches this component's ports "
                    "can call every method, CreateKey included. Development only.",
                    component=component)
        return None
    ca, cert, key = identity_paths(settings, component)
    missing = [(setting, path) for setting, path in
               (("tls_ca", ca), ("tls_cert", cert), ("tls_key", key)) if not path.exists()]
    if missing:
        setting, path = missing[0]
        raise InvalidArgument(
            f"the {component} has no certificate for internal gRPC: {setting} {path} does "
            f"not exist. Create the platform's certificates with `thaw pki init --dir "
            f"{path.parent}` (`thaw up` does it under $THAW_HOME/pki), or set tls_ca, "
            "tls_cert and tls_key; insecure_internal=true turns authentication off "
            "(development only)", field=setting)
    return load_identity(component, ca, cert, key)
