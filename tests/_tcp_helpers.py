"""Helpers shared by the TCP and RemoteQueue tests: raw frame peers, waits, probes."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import eventforge as ef


def frame(obj: Any) -> bytes:
    """One wire frame around ``obj`` (a dict is JSON-encoded, bytes are used as is)."""
    body = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def message_frame(topic: str, payload: Any = None, **fields: Any) -> bytes:
    """A message frame as the original eventforge client writes it."""
    return ef.encode(ef.Message(topic, payload, **fields))


def wait_until(
    predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005
) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)


def raw_connect(port: int, timeout: float = 5.0) -> socket.socket:
    """A plain TCP socket to 127.0.0.1:port (a frame-only peer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class FrameReader:
    """Reads whole frames from a blocking socket, with a timeout per call."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = ef.FrameDecoder(64 * 1024 * 1024)
        self.frames: List[bytes] = []

    def read(self, timeout: float = 5.0) -> Optional[dict]:
        """Return the next frame as a dict, or None at EOF/timeout."""
        body = self.read_body(timeout)
        return None if body is None else json.loads(body)

    def read_body(self, timeout: float = 5.0) -> Optional[bytes]:
        """Return the next frame's body as bytes, or None at EOF/timeout."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError:
                return None
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def read_message(self, timeout: float = 5.0) -> Optional[dict]:
        """Like :meth:`read`, skipping control frames."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.read(max(0.0, deadline - time.monotonic()))
            if got is None or not str(got.get("topic", "")).startswith("$"):
                return got


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the peer closes (EOF or reset) within ``timeout``; data is discarded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return False
        except OSError:
            return True
        if not data:
            return True
    return False


def handshake(sock: socket.socket, features: Optional[List[str]] = None) -> Dict[str, Any]:
    """Do the plain (no secret) handshake on a raw socket; return the welcome payload."""
    sock.sendall(frame({"topic": "$hello", "payload": {
        "version": 1, "features": features if features is not None else ["interest"],
        "nonce": os.urandom(32).hex()}}))
    reply = FrameReader(sock).read(5.0)
    assert reply is not None and reply["topic"] == "$welcome", reply
    return reply["payload"]


def rss_bytes() -> int:
    """Resident set size of this process (Linux), or 0 when unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


class Publisher:
    """A well-behaved client publishing ``count`` messages on a thread."""

    def __init__(
        self, port: int, count: int = 1000, topic: str = "good.msg", **options: Any
    ) -> None:
        self.client = ef.TCPClientTransport("127.0.0.1", port, **options).connect(5.0)
        self.count = count
        self.topic = topic
        self.ids: List[str] = []
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="test-publisher", daemon=True)

    def start(self) -> Publisher:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for i in range(self.count):
                message = ef.Message(self.topic, {"i": i})
                self.client.send(message)
                self.ids.append(message.id)
                if i % 100 == 0:
                    time.sleep(0.001)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self, timeout: float = 20.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "publisher did not finish"
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.client.close()


def make_test_certs(directory: str) -> Dict[str, str]:
    """Create a throw-away CA, a server cert for 127.0.0.1/localhost and a client cert.

    Uses ``cryptography``; files go to ``directory`` (a tmp dir), never the repo.
    The extensions satisfy the strict X.509 checks of Python 3.13's default context.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: Any, path: str) -> None:
        with open(path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    def write_cert(cert: Any, path: str) -> None:
        with open(path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("eventforge test CA"))
          .issuer_name(name("eventforge test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
              encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": os.path.join(directory, "ca.pem")}
    write_cert(ca, paths["ca"])
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(f"eventforge test {role}"))
                   .issuer_name(ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if role == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        paths[f"{role}_cert"] = os.path.join(directory, f"{role}.pem")
        paths[f"{role}_key"] = os.path.join(directory, f"{role}.key")
        write_cert(cert, paths[f"{role}_cert"])
        write_key(key, paths[f"{role}_key"])
    return paths
