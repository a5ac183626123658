"""The state one import shares among the mappers (the source, the options, the findings so far, the
files to write or create) and the helpers every mapper uses: report, origin, bad, uri, rewrites."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .report import Finding, ImportOptions, KaazingImportError, Level
from .values import Uri, parse_uri
from .xmltree import Node

if TYPE_CHECKING:
    from cryptography.x509 import ObjectIdentifier


@dataclass(eq=False)
class Context:
    """One import in progress: what every mapper reads (options, XML) and adds to (findings, files)."""

    source: Path
    opts: ImportOptions
    findings: list[Finding] = field(default_factory=list)
    #: PEM files converted from keystores: file name (next to the output) -> (bytes, mode).
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    #: PEM files the TOML references that the operator must create, and the command that does it.
    to_create: list[tuple[str, str]] = field(default_factory=list)
    #: --rewrite-host keys and --rewrite-port ports (as text) that matched something in the file.
    used_rewrites: set[str] = field(default_factory=set)
    root: Node | None = None
    role: str | None = None
    #: (ping_interval, ping_timeout, element) from ws.inactivity.timeout; None: intercloud's defaults.
    ping: tuple[float, float, Node] | None = None
    #: Extended key usages of the certificate converted from the keystore, when it lists them.
    leaf_usages: set[ObjectIdentifier] | None = None

    @property
    def file(self) -> str:
        """The XML file's name, as findings and comments show it."""
        return self.source.name

    def report(self, level: Level, node: Node | None, message: str) -> None:
        # The same message for several elements (e.g. every service bound to @eth0) is reported once.
        if any(f.level == level and f.message == message for f in self.findings):
            return
        self.findings.append(Finding(level, self.file, node.line if node is not None else 0,
                                     node.path if node is not None else "(command line)", message))

    def origin(self, node: Node, extra: str = "") -> str:
        """A comment saying where a value came from."""
        return f"{self.file}:{node.line} {node.path} {node.shown()}{extra}"

    def bad(self, node: Node, message: str) -> KaazingImportError:
        return KaazingImportError(f"{self.source}:{node.line}: {node.path}: {message}")

    def uri(self, node: Node) -> Uri:
        try:
            return parse_uri(node.text)
        except ValueError as exc:
            raise self.bad(node, f"{exc}; fix the URI") from None

    def map_port(self, port: int) -> int:
        if port in self.opts.rewrite_ports:
            self.used_rewrites.add(str(port))
            return self.opts.rewrite_ports[port]
        return port

    def map_host(self, host: str) -> str:
        """A host we dial (or a peer's host): rewritten if asked."""
        for key in (host, host.lower()):
            if key in self.opts.rewrite_hosts:
                self.used_rewrites.add(key)
                return self.opts.rewrite_hosts[key]
        return host

    def cmd_dir(self, rel: str) -> str:
        """``rel`` (relative to the output file) as a shell argument for a command run in the current directory."""
        out_dir = self.opts.out.parent if self.opts.out is not None else Path(".")
        if out_dir.resolve() == Path.cwd().resolve():
            return shlex.quote(rel)
        return shlex.quote(str(out_dir / rel))

    def xml_path(self, text: str) -> Path:
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.source.parent / p
