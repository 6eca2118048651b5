"""How KEDA's Kafka scaler authenticates to the pipeline's cluster as its own clients do.

The pipeline's Secret (`spec.kafka.secretRef`) holds librdkafka settings. KEDA's Kafka scaler
takes the same facts under other names: `sasl` and `tls` in the trigger's metadata (they
say how to connect, not who: no secret), and the credentials (`username`, `password`, `ca`,
`cert`, `key`, `keyPassword`) from a TriggerAuthentication that names keys of that same
Secret. So the credentials stay in the one Secret the user manages, and KEDA reads them there
(children.trigger_authentication).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# librdkafka's sasl.mechanism -> the scaler's `sasl`; others (GSSAPI, OAUTHBEARER) need
# settings a Secret of librdkafka keys cannot give KEDA.
_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
# A key of the Secret (librdkafka setting) -> the scaler's authentication parameter.
_CREDENTIALS = {
    "sasl.username": "username",
    "sasl.password": "password",
    "ssl.ca.pem": "ca",
    "ssl.certificate.pem": "cert",
    "ssl.key.pem": "key",
    "ssl.key.password": "keyPassword",
}


class UnsupportedKafkaAuth(ValueError):
    """The Secret's settings have no equivalent KEDA's Kafka scaler can use."""


@dataclass(frozen=True)
class KedaKafkaAuth:
    metadata: dict[str, str]  # trigger metadata: `sasl`, `tls`
    parameters: dict[str, str]  # scaler parameter -> key of the pipeline's Secret

    @classmethod
    def of(cls, settings: Mapping[str, str]) -> KedaKafkaAuth:
        """From the Secret's settings (only their keys and the two non-secret values,
        `security.protocol` and `sasl.mechanism`, are used)."""
        protocol = settings.get("security.protocol", "PLAINTEXT").upper()
        metadata: dict[str, str] = {}
        if protocol.startswith("SASL_"):
            mechanism = settings.get("sasl.mechanism", "GSSAPI").upper()  # librdkafka's default
            if mechanism not in _SASL:
                raise UnsupportedKafkaAuth(
                    f"sasl.mechanism {mechanism}: KEDA's Kafka scaler takes "
                    f"{', '.join(_SASL)} from a Secret"
                )
            metadata["sasl"] = _SASL[mechanism]
        if protocol in ("SSL", "SASL_SSL"):
            metadata["tls"] = "enable"
        for key in settings:
            if key.endswith(".location"):
                raise UnsupportedKafkaAuth(
                    f"{key}: a file in the workers' pods, which KEDA cannot read; put the "
                    "PEM itself in the Secret (ssl.ca.pem, ssl.certificate.pem, ssl.key.pem)"
                )
        parameters = {param: key for key, param in _CREDENTIALS.items() if key in settings}
        return cls(metadata, parameters)
