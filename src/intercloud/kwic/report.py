"""What an import produces and how it fails: :class:`ImportOptions` in, :class:`ImportResult` (with
its :class:`Finding` list) out, :class:`KaazingImportError` for bad input, and the exit statuses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


EXIT_OK = 0
EXIT_DROPPED = 1
EXIT_BAD_INPUT = 2

Level = Literal["note", "superseded", "ignored", "dropped"]


class KaazingImportError(Exception):
    """The input cannot be imported: bad XML, unknown property, missing keystore, wrong password...

    ``problems`` are complete lines (file, element, what is wrong and the fix); ``str()`` joins them.
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Finding:
    """Something in the KWIC file that was not mapped one to one."""

    level: Level
    file: str
    line: int
    path: str
    message: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.path}" if self.line else f"{self.file}: {self.path}"

    def __str__(self) -> str:
        return f"{self.where}: {self.level}: {self.message}"


@dataclass
class ImportOptions:
    """Everything the importer needs besides the XML file (the command-line options)."""

    #: ``-D name=value``: set or override ``<properties>`` (as GATEWAY_OPTS did).
    properties: dict[str, str] = field(default_factory=dict)
    #: Where the TOML will be written; converted PEM files go next to it. None: stdout (no keystores).
    out: Path | None = None
    keystore: Path | None = None
    truststore: Path | None = None
    keystore_password_file: Path | None = None
    truststore_password_file: Path | None = None
    #: Password of the private key entry when it differs from the keystore password.
    key_password_file: Path | None = None
    #: Which private key entry of the keystore to use when it holds several.
    key_alias: str | None = None
    #: Import only this half of a file that has services of both.
    role: Literal["cloud", "onprem"] | None = None
    node_id: str | None = None
    #: Directory (relative to the output) of the PEM files to create when the XML has no keystore.
    pki: str = "pki"
    #: Keep plain ws:// tunnels (tls.insecure = true) instead of upgrading them to wss://.
    insecure_ws: bool = False
    #: Replace a host (or ``@eth0`` interface) everywhere, e.g. {"example.com": "127.0.0.1"}.
    rewrite_hosts: dict[str, str] = field(default_factory=dict)
    #: Replace a port everywhere, e.g. {5551: 15551} (docker-compose ``ports:`` remappings).
    rewrite_ports: dict[int, int] = field(default_factory=dict)
    #: ``HOST:PORT`` of the admin endpoint to write into ``[gateway]``.
    admin: str | None = None
    #: Extra cluster members (``HOST[:PORT]`` or ``tcp://HOST:PORT``), as if listed in <cluster><connect>.
    peers: list[str] = field(default_factory=list)
    #: Where this member accepts peer links (``HOST:PORT``), as <cluster><accept>.
    cluster_listen: str | None = None
    #: ``NAME=SERVICE[,SERVICE...]``: cloud tenants and the services they own.
    tenants: dict[str, list[str]] = field(default_factory=dict)
    #: Bind ``tcp://@eth0:PORT`` to eth0's address on this machine instead of 0.0.0.0.
    resolve_interfaces: bool = False


@dataclass
class ImportResult:
    """What :func:`import_kaazing` produced; nothing is written until :func:`write_import`."""

    source: Path
    role: str | None
    #: The TOML text, or None when the file holds nothing intercloud can run (e.g. an echo server).
    toml: str | None
    findings: list[Finding]
    #: PEM files converted from keystores: file name (next to the output) -> (bytes, mode).
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    #: PEM files the TOML references that the operator must create, and the command that does it.
    to_create: list[tuple[str, str]] = field(default_factory=list)
    #: ``-D`` names that no ``${...}`` used.
    unused_properties: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "dropped"]

    @property
    def exit_code(self) -> int:
        return EXIT_DROPPED if self.dropped or self.toml is None else EXIT_OK
