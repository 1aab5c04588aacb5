"""`eco2 kafka-tool NAME ARGS...`: Kafka's own admin tools, pointed at the configured cluster.

kcat cannot show consumer-group lag; Kafka's tools can, and the stack already has their jars
(.local/kafka-VERSION/libs). This adds `--bootstrap-server` from ECO2_KAFKA_BOOTSTRAP and, when
ECO2_KAFKA_SECURITY_PROTOCOL is not PLAINTEXT, a `--command-config` built from the ECO2_KAFKA_*
settings, so the same command works locally and against a secured cluster.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from contract.settings import Settings

from . import install

# Tool name (as in Kafka's bin/kafka-NAME.sh) -> main class, all in the kafka-tools / kafka jars.
TOOLS: dict[str, str] = {
    "consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "topics": "org.apache.kafka.tools.TopicCommand",
    "get-offsets": "org.apache.kafka.tools.GetOffsetShell",
    "acls": "org.apache.kafka.tools.AclCommand",
    "configs": "kafka.admin.ConfigCommand",
}


class UnknownTool(ValueError):
    pass


def client_properties(s: Settings) -> str:
    """Java client properties for the configured security; empty for PLAINTEXT."""
    if s.kafka_security_protocol == "PLAINTEXT":
        return ""
    lines = [f"security.protocol={s.kafka_security_protocol}"]
    if s.kafka_security_protocol.startswith("SASL_"):
        module = (
            "org.apache.kafka.common.security.plain.PlainLoginModule"
            if s.kafka_sasl_mechanism == "PLAIN"
            else "org.apache.kafka.common.security.scram.ScramLoginModule"
        )
        user = s.kafka_sasl_username.replace('"', '\\"')
        password = s.kafka_sasl_password.replace('"', '\\"')
        lines += [
            f"sasl.mechanism={s.kafka_sasl_mechanism}",
            f'sasl.jaas.config={module} required username="{user}" password="{password}";',
        ]
    if s.kafka_ssl_cafile:
        lines += ["ssl.truststore.type=PEM", f"ssl.truststore.location={s.kafka_ssl_cafile}"]
    return "\n".join(lines) + "\n"


def argv(s: Settings, name: str, args: list[str], command_config: Path | None = None) -> list[str]:
    """The java command line for tool `name` with the user's `args`."""
    if name not in TOOLS:
        raise UnknownTool(f"unknown tool {name!r}; choose from {', '.join(TOOLS)}")
    extra: list[str] = []
    if "--bootstrap-server" not in args:
        extra += ["--bootstrap-server", s.kafka_bootstrap]
    if command_config is not None and "--command-config" not in args:
        extra += ["--command-config", str(command_config)]
    libs = install.kafka_home(s) / "libs" / "*"
    return ["java", "-Xmx256m", "-cp", str(libs), TOOLS[name], *extra, *args]


def run(s: Settings, name: str, args: list[str]) -> int:
    """Run the tool in the foreground (its output goes straight to the terminal); its exit code."""
    install.ensure_kafka(s)
    props = client_properties(s)
    if not props:
        return subprocess.call(argv(s, name, args))
    with tempfile.NamedTemporaryFile("w", suffix=".properties", prefix="eco2-kafka-") as f:
        f.write(props)
        f.flush()
        return subprocess.call(argv(s, name, args, Path(f.name)))
