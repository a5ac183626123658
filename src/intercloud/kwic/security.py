"""``<security>`` -> ``[tls]``: the keystore and truststore converted to PEM files (or the PEM files
to create when there is none), and the checks that the certificate can serve as this gateway."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..certs import public_key_matches
from ..config.model import NAME_PATTERN, is_ip_literal
from .context import Context
from .keystores import Store, cert_names, load_store, pem, read_password, self_signed, sha256, subject
from .report import KaazingImportError
from .values import stem_name
from .writer import Toml
from .xmltree import Node


@dataclass
class TlsFiles:
    """The PEM files [tls] names, and the certificate when it was converted from a keystore."""

    cert: str
    key: str
    ca: str
    leaf: x509.Certificate | None
    converted: bool
    source: str = ""  # the keystore entry the certificate was converted from


def map_tls(ctx: Context, root: Node, role: str, out: Toml, node_id: str | None, plain: bool,
            tunnel_host: str | None) -> TlsFiles | None:
    """Write ``[tls]``; None when the tunnels stay plain ws:// (--insecure-ws)."""
    security = root.child("security")
    keystore = security.child("keystore") if security is not None else None
    truststore = security.child("truststore") if security is not None else None
    out.table("tls")
    if plain:
        out.key("insecure", True, "KWIC tunnels were plain ws:// (kept because of --insecure-ws)")
        if keystore is not None or ctx.opts.keystore is not None:
            ctx.report("ignored", keystore, "keystore not converted: the tunnels stay plain ws://")
        return None
    if keystore is None and ctx.opts.keystore is None:
        name = node_id or stem_name(ctx.source) or role
        pki = ctx.opts.pki.rstrip("/") or "."
        cert, key, ca = f"{pki}/{name}.pem", f"{pki}/{name}.key", f"{pki}/ca.pem"
        flag = "--cloud" if role == "cloud" else "--onprem"
        cmd = f"intercloud certs init {ctx.cmd_dir(pki)} {flag} {name}"
        if role == "cloud" and tunnel_host and tunnel_host != name and not is_ip_literal(tunnel_host):
            cmd += f" --san {tunnel_host}"
        ctx.to_create += [(cert, cmd), (key, cmd), (ca, cmd)]
        src = security if security is not None else root
        ctx.report("note", src, f"the XML has no <keystore>; [tls] names PEM files to create with `{cmd}` "
                   "(one CA for both halves: run it once with every --cloud and --onprem name)")
        out.key("cert", cert, f"create with: {cmd}")
        out.key("key", key)
        out.key("ca", ca, "the CA that signed the " + ("on-prem client" if role == "cloud" else "cloud server")
                + " certificates")
        return TlsFiles(cert, key, ca, None, converted=False)
    return _convert_stores(ctx, keystore, truststore, role, out, node_id, tunnel_host)


def _password(ctx: Context, store: Node | None, kind: str, override: Path | None, store_file: Path) -> tuple[str, str]:
    """(password, where it came from) for a keystore or truststore."""
    option = f"--{kind}-password-file"
    if override is not None:
        return read_password(override, f"{option} {override}"), f"{option} {override}"
    if store is not None:
        pf = store.child("password-file")
        if pf is not None:
            path = ctx.xml_path(pf.text)
            try:
                return read_password(path, str(path)), f"{pf.path} {path}"
            except KaazingImportError:
                raise ctx.bad(pf, f"{kind} password file {path} not found or unreadable; copy it there or "
                              f"give it with {option} FILE") from None
        pw = store.child("password")
        if pw is not None:
            ctx.report("note", pw, f"the {kind} password was written in the XML in clear; keep the "
                       "converted private key file readable only by the gateway's user (it is written mode 0600)")
            return pw.text, pw.path
    where = f"{ctx.source}:{store.line}: {store.path}" if store is not None else str(ctx.source)
    raise KaazingImportError(f"{where}: no password for the {kind} {store_file}; give it with {option} FILE "
                             "(a file holding the password, like KWIC's keystore.pw)")


def _store_file(ctx: Context, store: Node | None, kind: str, override: Path | None) -> tuple[Path, str | None]:
    if override is not None:
        if not override.is_file():
            raise KaazingImportError(f"--{kind} {override}: file not found; give the path of the {kind} file")
        return override, None
    assert store is not None
    fnode = store.child("file")
    if fnode is None or not fnode.text:
        raise ctx.bad(store, f"<{kind}> has no <file>; add it or give the file with --{kind} PATH")
    path = ctx.xml_path(fnode.text)
    if not path.is_file():
        raise ctx.bad(fnode, f"{kind} {path} not found; copy it there or give its location with "
                      f"--{kind} PATH")
    declared = store.value("type")
    return path, declared


def _convert_stores(ctx: Context, keystore: Node | None, truststore: Node | None, role: str, out: Toml,
                    node_id: str | None, tunnel_host: str | None) -> TlsFiles:
    if ctx.opts.out is None:
        raise KaazingImportError(f"{ctx.source}: the keystore is converted to PEM files written next to the "
                                 "output; give the output file with -o OUT.toml")
    stem = ctx.opts.out.stem
    ks_path, ks_type = _store_file(ctx, keystore, "keystore", ctx.opts.keystore)
    ks_pw, ks_pw_src = _password(ctx, keystore, "keystore", ctx.opts.keystore_password_file, ks_path)
    ks = load_store(ks_path, ks_type, ks_pw, "keystore", ks_pw_src, keystore, ctx)
    key_pw = ks_pw
    key_pw_src = ks_pw_src
    if ctx.opts.key_password_file is not None:
        key_pw = read_password(ctx.opts.key_password_file, f"--key-password-file {ctx.opts.key_password_file}")
        key_pw_src = f"--key-password-file {ctx.opts.key_password_file}"
    if not ks.keys:
        raise KaazingImportError(f"{ks_path}: the keystore holds no private key entry (only "
                                 f"{len(ks.trusted)} trusted certificate(s)); the gateway's certificate and key "
                                 "must be in <keystore> (trusted CAs go in <truststore>)")
    alias = _pick_alias(ctx, ks, ks_path, role, node_id, tunnel_host)
    key, chain = ks.decrypt(alias, key_pw, key_pw_src)
    leaf = chain[0]
    if not public_key_matches(leaf, key):
        raise KaazingImportError(f"{ks_path}: entry {alias!r}: the private key does not match its certificate; "
                                 "re-create the keystore entry")
    intermediates = [c for c in chain[1:] if not self_signed(c)]
    cert_file, key_file, ca_file = f"{stem}.pem", f"{stem}.key", f"{stem}-ca.pem"
    ctx.files[cert_file] = (pem(leaf, *intermediates), 0o644)
    ctx.files[key_file] = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), 0o600)
    ks_src = f"{ks_path} ({ks.type.upper()}) entry {alias!r}"
    out.key("cert", cert_file, f"converted from {ks_src}: {subject(leaf)}"
            + (f" + {len(intermediates)} intermediate(s)" if intermediates else ""))
    out.key("key", key_file, f"converted from {ks_src} (unencrypted PEM, mode 0600)")
    # trust
    cas: list[x509.Certificate] = []
    ca_src = ""
    if truststore is not None or ctx.opts.truststore is not None:
        ts_path, ts_type = _store_file(ctx, truststore, "truststore", ctx.opts.truststore)
        ts_pw, ts_pw_src = _password(ctx, truststore, "truststore", ctx.opts.truststore_password_file, ts_path)
        ts = load_store(ts_path, ts_type, ts_pw, "truststore", ts_pw_src, truststore, ctx)
        cas = [c for _, c in ts.trusted]
        for a in ts.keys:
            ctx.report("note", truststore, f"truststore entry {a!r} is a private key; only its certificates "
                       "are trusted (a truststore should hold CA certificates only)")
            cas += ts.chains.get(a, [])
        ca_src = f"{ts_path} ({ts.type.upper()}), {len(cas)} certificate(s)"
        if not cas:
            raise KaazingImportError(f"{ts_path}: the truststore holds no certificate; add the CA that signed "
                                     "the other half's certificates")
    else:
        cas = [c for c in chain[1:] if self_signed(c)] + [c for _, c in ks.trusted]
        if cas:
            ca_src = f"no <truststore>: the CA certificate(s) found in {ks_path}"
            ctx.report("note", keystore, "no <truststore>: tls.ca holds the CA certificates found in the "
                       "keystore; check that it is the CA of the other half's certificates")
        else:
            pki = ctx.opts.pki.rstrip("/") or "."
            ca_file = f"{pki}/ca.pem"
            ctx.to_create.append((ca_file, "copy the CA certificate (PEM) of the other half here"))
            ctx.report("note", keystore, "no <truststore> and no CA certificate in the keystore (KWIC then "
                       f"trusted the JVM's default CAs); put the CA that signed the other half's certificates "
                       f"in {ca_file}")
            out.key("ca", ca_file, "create: the CA (PEM) that signed the other half's certificates")
            _check_usage(ctx, leaf, role, keystore)
            return TlsFiles(cert_file, key_file, ca_file, leaf, converted=True, source=ks_src)
    seen: set[bytes] = set()
    unique = []
    for c in cas:
        fp = c.fingerprint(sha256())
        if fp not in seen:
            seen.add(fp)
            unique.append(c)
    ctx.files[ca_file] = (pem(*unique), 0o644)
    out.key("ca", ca_file, f"converted from {ca_src}")
    _check_usage(ctx, leaf, role, keystore)
    return TlsFiles(cert_file, key_file, ca_file, leaf, converted=True, source=ks_src)


def _pick_alias(ctx: Context, ks: Store, path: Path, role: str, node_id: str | None, host: str | None) -> str:
    aliases = list(ks.keys)
    if ctx.opts.key_alias is not None:
        if ctx.opts.key_alias not in ks.keys:
            raise KaazingImportError(f"{path}: no private key entry {ctx.opts.key_alias!r} (--key-alias); "
                                     f"the keystore has {', '.join(map(repr, aliases))}")
        return ctx.opts.key_alias
    if len(aliases) == 1:
        return aliases[0]
    for want in (host, node_id):
        if want and want.lower() in (a.lower() for a in aliases):
            return next(a for a in aliases if a.lower() == want.lower())
    raise KaazingImportError(f"{path}: the keystore has several private key entries "
                             f"({', '.join(map(repr, aliases))}) and none is named after this gateway's host; "
                             "choose one with --key-alias ALIAS")


def _check_usage(ctx: Context, cert: x509.Certificate, role: str, where: Node | None) -> None:
    try:
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return
    need = ExtendedKeyUsageOID.SERVER_AUTH if role == "cloud" else ExtendedKeyUsageOID.CLIENT_AUTH
    if need not in usages:
        what = "TLS server (serverAuth)" if role == "cloud" else "TLS client (clientAuth)"
        ctx.report("note", where, f"the keystore certificate {subject(cert)} is not allowed as a {what}; "
                   "the other half will reject it: issue one with that extended key usage")
    ctx.leaf_usages = usages


def check_identity(ctx: Context, role: str, node_id: str | None, node_comment: str, tls: TlsFiles | None) -> None:
    """A gateway's node id must be a name (CN or DNS SAN) of its certificate, or the other half refuses
    it (protocol §5.4). The PEM files to create are named after the node id, so that holds for them;
    a certificate converted from a keystore may name something else, which is said here."""
    if tls is None or tls.leaf is None:
        return
    names = cert_names(tls.leaf)
    usable = [n for n in names if NAME_PATTERN.fullmatch(n)]
    shown = ", ".join(repr(n) for n in names[:8]) or "none"
    if node_id is None:  # on-prem: config.load takes the certificate's first usable name
        if not usable:
            ctx.report("note", None, f"the certificate converted from {tls.source} ({subject(tls.leaf)}) has "
                       f"no name that can be a node id (names: {shown}); set gateway.node_id (--node-id) and "
                       "issue a certificate that names it, or the cloud refuses this gateway")
        return
    if node_id in names:
        return
    refuses = ("on-prem gateways refuse this cloud gateway (and cluster members refuse it as a member)"
               if role == "cloud" else "the cloud refuses this gateway (when it verifies client certificates)")
    instead = f"give --node-id {usable[0]}" if usable else "give --node-id a name of the certificate"
    flag = "--cloud" if role == "cloud" else "--onprem"
    ctx.report("note", None, f"gateway.node_id {node_id!r} ({node_comment}) is not a name of the certificate "
               f"converted from {tls.source} ({subject(tls.leaf)}; names: {shown}): {refuses}, since a "
               f"gateway's node id must be a name of its certificate. Either {instead}, or put a certificate "
               f"for {node_id!r} in the keystore (`intercloud certs init pki {flag} {node_id}` makes one)")
