"""The gateway-config.xml as a small tree (:class:`Node`) with line numbers and element paths, and
``${property}`` resolution from ``<properties>``, ``-D`` and GATEWAY_OPTS."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from .report import KaazingImportError

#: Namespaces of Kaazing gateway configurations (the tutorials use 2016/06).
KAAZING_NS = re.compile(r"^https?://xmlns\.kaazing\.(org|com)/")


_INDEXED = {"service", "property"}


@dataclass(eq=False)
class Node:
    tag: str
    line: int
    path: str
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    raw: str = ""  # direct text as written
    text: str = ""  # direct text after ${property} substitution, stripped
    namespace: str = ""

    def child(self, tag: str) -> Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def all(self, tag: str) -> list[Node]:
        return [c for c in self.children if c.tag == tag]

    def value(self, tag: str) -> str | None:
        c = self.child(tag)
        return c.text if c is not None else None

    def walk(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            yield from c.walk()

    def shown(self) -> str:
        """``<tag>text</tag>`` as the operator wrote it (for comments), shortened."""
        raw = " ".join(self.raw.split())
        if len(raw) > 80:
            raw = raw[:77] + "..."
        return f"<{self.tag}>{raw}</{self.tag}>" if raw else f"<{self.tag}>"


def parse_xml(path: Path, data: bytes) -> Node:
    """Parse ``data`` into a :class:`Node` tree; comments are dropped, entities refused."""
    parser = expat.ParserCreate(namespace_separator="}")
    stack: list[Node] = []
    root: list[Node] = []

    def start(name: str, _attrs: dict[str, str]) -> None:
        ns, _, local = name.rpartition("}")
        parent = stack[-1] if stack else None
        siblings = sum(1 for c in parent.children if c.tag == local) + 1 if parent else 1
        step = f"{local}[{siblings}]" if local in _INDEXED or siblings > 1 else local
        node = Node(local, parser.CurrentLineNumber, f"{parent.path if parent else ''}/{step}", parent,
                    namespace=ns)
        if parent is not None:
            parent.children.append(node)
        else:
            root.append(node)
        stack.append(node)

    def end(_name: str) -> None:
        stack.pop()

    def chars(text: str) -> None:
        if stack:
            stack[-1].raw += text

    def no_entities(name: str, *_rest: object) -> None:
        raise KaazingImportError(
            f"{path}:{parser.CurrentLineNumber}: XML entity declaration <!ENTITY {name} ...> is not supported "
            "(it could expand without bound); write the value out in the element instead")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.EntityDeclHandler = no_entities
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        reason = expat.ErrorString(exc.code) if exc.code else str(exc)
        inside = f" inside <{stack[-1].tag}> ({stack[-1].path}, opened at line {stack[-1].line})" if stack else ""
        raise KaazingImportError(
            f"{path}:{exc.lineno}:{exc.offset + 1}: malformed XML: {reason}{inside}; fix the XML "
            "(usually a tag that is not closed or is misspelt) and import again") from None
    if not root:
        raise KaazingImportError(f"{path}: no XML element found; is this a gateway-config.xml?")
    return root[0]


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


_PROPERTY_REF = re.compile(r"\$\{([^}]*)\}")
#: Java system properties that configure KWIC's outbound HTTP proxy (GATEWAY_OPTS -D...).
JAVA_PROXY_PROPS = {"http.proxyhost", "http.proxyport", "https.proxyhost", "https.proxyport",
                    "http.nonproxyhosts"}


def parse_gateway_opts(text: str) -> tuple[dict[str, str], list[str]]:
    """``-Da=b -Dc=d -Xmx1g`` (GATEWAY_OPTS) -> ({"a": "b", "c": "d"}, ["-Xmx1g"])."""
    props: dict[str, str] = {}
    other: list[str] = []
    for word in shlex.split(text):
        if word.startswith("-D") and len(word) > 2:
            name, _, value = word[2:].partition("=")
            props[name] = value
        else:
            other.append(word)
    return props, other


def resolve_properties(root: Node, source: Path, overrides: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """Substitute ``${name}`` in every element's text; returns (properties, names used).

    Raises :class:`KaazingImportError` listing every unknown property with its element.
    """
    defined: dict[str, tuple[str, Node]] = {}
    props_node = root.child("properties")
    for prop in props_node.all("property") if props_node is not None else []:
        name_node = prop.child("name")
        name = name_node.raw.strip() if name_node is not None else ""
        value_node = prop.child("value")
        if name:
            defined[name] = ((value_node.raw.strip() if value_node is not None else ""), prop)
    values = {name: v for name, (v, _) in defined.items()}
    values.update(overrides)
    used: set[str] = set()
    problems: list[str] = []

    def expand(text: str, node: Node, depth: int = 0) -> str:
        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            used.add(name)
            if name not in values:
                problems.append(
                    f"{source}:{node.line}: {node.path}: unknown property ${{{name}}}; define it with "
                    f"-D {name}=VALUE (KWIC took it from GATEWAY_OPTS=\"-D{name}=...\") or in <properties>")
                return m.group(0)
            if depth > 10:
                problems.append(f"{source}:{node.line}: {node.path}: property ${{{name}}} refers to itself "
                                "(directly or through other properties); give it a plain value with -D")
                return m.group(0)
            return expand(values[name], node, depth + 1)

        return _PROPERTY_REF.sub(repl, text)

    for node in root.walk():
        node.text = expand(node.raw, node).strip() if "${" in node.raw else node.raw.strip()
    if problems:
        raise KaazingImportError(list(dict.fromkeys(problems)))
    return values, used
