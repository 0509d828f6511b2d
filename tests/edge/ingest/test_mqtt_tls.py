"""MQTT over TLS against a real Mosquitto: the ingestor verifies the broker against a CA and
logs in with a username/password or a client certificate; wrong credentials, a missing
certificate and a broker it cannot verify are refused (nothing is ingested)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from paho.mqtt.enums import CallbackAPIVersion

from fieldline.cli.harness.mosquitto import MosquittoBroker
from fieldline.cloud.pki import CertificateAuthority
from fieldline.edge.control.identity import new_key_and_csr
from fieldline.edge.ingest.mqtt import MqttConfigError, MqttIngestor
from fieldline.edge.ingest.outbox import Outbox
from fieldline.shared.config import MqttSettings
from fieldline.shared.policy import Policy, Subscription
from tests.support.polling import holds_within

TOPIC = "plant/line1/sensor/temp"
USER, PASSWORD = "edge-1", "correct horse battery staple"
CONNECT_S = 10.0


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _pki(root: Path, name: str = "ca") -> Pki:
    ca = CertificateAuthority.load_or_create(root / name, common_name=f"{name} test CA")
    key_pem, cert = ca.issue_server(["127.0.0.1", "localhost"])
    (root / f"{name}-server.key").write_bytes(key_pem)
    (root / f"{name}-server.crt").write_bytes(cert.public_bytes(Encoding.PEM))
    ckey, csr = new_key_and_csr("edge-1")
    ccert = ca.issue_node(csr, "edge-1", days=1)
    (root / f"{name}-client.key").write_bytes(ckey)
    (root / f"{name}-client.crt").write_bytes(ccert.public_bytes(Encoding.PEM))
    return Pki(
        root / name / "ca.crt",
        root / f"{name}-server.crt",
        root / f"{name}-server.key",
        root / f"{name}-client.crt",
        root / f"{name}-client.key",
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return _pki(tmp_path)


def _broker(tmp: Path, pki: Pki, *, client_certs: bool) -> MosquittoBroker:
    lines = [
        f"cafile {pki.ca}",
        f"certfile {pki.server_cert}",
        f"keyfile {pki.server_key}",
    ]
    if client_certs:
        lines += [
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
        ]
    else:
        passwd = tmp / "passwd"
        import subprocess

        subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), USER, PASSWORD], check=True)
        lines += [f"password_file {passwd}", "allow_anonymous false"]
    return MosquittoBroker(
        tmp / ("mq-certs" if client_certs else "mq-pass"), listener=lines
    ).start()


@dataclass
class Run:
    ingestor: MqttIngestor
    outbox: Outbox


@pytest.fixture
def run(tmp_path: Path) -> Iterator[list[Run]]:
    runs: list[Run] = []
    yield runs
    for r in runs:
        r.ingestor.stop()
        r.outbox.close()


def _ingest(runs: list[Run], tmp: Path, settings: MqttSettings) -> Run:
    data = tmp / f"edge-{len(runs)}"
    data.mkdir()
    outbox = Outbox(data)
    ing = MqttIngestor(settings, outbox, client_id=f"fieldline-test-{len(runs)}")
    ing.apply_policy(Policy(subscriptions=[Subscription(topic=TOPIC)]))
    ing.start()
    r = Run(ing, outbox)
    runs.append(r)
    return r


def _publish_tls(port: int, pki: Pki, *, password: bool, n: int = 5) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
    if password:
        c.username_pw_set(USER, PASSWORD)
        c.tls_set(ca_certs=str(pki.ca))
    else:
        c.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key))
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for i in range(n):
            c.publish(TOPIC, json.dumps({"ts": 1.7e9 + i, "value": i}), qos=1).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def test_tls_with_username_and_password_file(tmp_path: Path, pki: Pki, run: list[Run]) -> None:
    broker = _broker(tmp_path, pki, client_certs=False)
    try:
        pw = tmp_path / "mqtt.password"
        pw.write_text(PASSWORD + "\n")
        settings = MqttSettings(
            host="127.0.0.1",
            port=broker.port,
            tls=True,
            ca_file=pki.ca,
            username=USER,
            password_file=pw,
        )
        r = _ingest(run, tmp_path, settings)
        assert holds_within(r.ingestor.subscribed.is_set, CONNECT_S), (
            "no TLS session with the broker"
        )
        _publish_tls(broker.port, pki, password=True)
        assert holds_within(lambda: r.ingestor.stored == 5, CONNECT_S)
        # A wrong password is refused: never connected, nothing stored.
        wrong = MqttSettings(
            host="127.0.0.1",
            port=broker.port,
            tls=True,
            ca_file=pki.ca,
            username=USER,
            password="nope",
        )
        bad = _ingest(run, tmp_path, wrong)
        assert not holds_within(lambda: bad.ingestor.connected, 1.5)
        # A plain-text client on the TLS port gets nowhere either.
        plain = _ingest(
            run,
            tmp_path,
            MqttSettings(host="127.0.0.1", port=broker.port, username=USER, password=PASSWORD),
        )
        assert not holds_within(lambda: plain.ingestor.connected, 1.5)
    finally:
        broker.kill()


def test_tls_with_a_client_certificate(tmp_path: Path, pki: Pki, run: list[Run]) -> None:
    broker = _broker(tmp_path, pki, client_certs=True)
    try:
        settings = MqttSettings(
            host="127.0.0.1",
            port=broker.port,
            tls=True,
            ca_file=pki.ca,
            cert_file=pki.client_cert,
            key_file=pki.client_key,
        )
        r = _ingest(run, tmp_path, settings)
        assert holds_within(r.ingestor.subscribed.is_set, CONNECT_S), (
            "no mutual-TLS session with the broker"
        )
        _publish_tls(broker.port, pki, password=False, n=3)
        assert holds_within(lambda: r.ingestor.stored == 3, CONNECT_S)
        # No client certificate: the broker refuses the handshake.
        nocert = _ingest(
            run,
            tmp_path,
            MqttSettings(host="127.0.0.1", port=broker.port, tls=True, ca_file=pki.ca),
        )
        assert not holds_within(lambda: nocert.ingestor.connected, 1.5)
        # A broker certificate from a CA we do not trust: the ingestor refuses the broker.
        other = _pki(tmp_path, "other")
        distrust = MqttSettings(
            host="127.0.0.1",
            port=broker.port,
            tls=True,
            ca_file=other.ca,
            cert_file=pki.client_cert,
            key_file=pki.client_key,
        )
        d = _ingest(run, tmp_path, distrust)
        assert not holds_within(lambda: d.ingestor.connected, 1.5)
    finally:
        broker.kill()


def test_unreadable_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    outbox = Outbox(tmp_path / "e")
    try:
        with pytest.raises(MqttConfigError, match="TLS files"):
            MqttIngestor(
                MqttSettings(tls=True, ca_file=tmp_path / "missing.crt"), outbox, client_id="x"
            )
        with pytest.raises(MqttConfigError, match="password file"):
            MqttIngestor(
                MqttSettings(username="u", password_file=tmp_path / "missing"),
                outbox,
                client_id="x",
            )
    finally:
        outbox.close()
    assert ssl.OPENSSL_VERSION
