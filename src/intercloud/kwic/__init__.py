"""Import a Kaazing KWIC ``gateway-config.xml`` into intercloud's native TOML configuration.

    from intercloud.kwic import ImportOptions, import_kaazing, write_import

    result = import_kaazing(Path("cloud-config.xml"), ImportOptions(out=Path("cloud.toml"),
                                                                   properties={"cloud-node-hostname": "cloud1"}))
    write_import(result, Path("cloud.toml"))
    result.findings        # everything that was not mapped one to one, each with file, line and element path
    result.exit_code       # 0: nothing dropped; 1: something that carries traffic could not be mapped

KWIC describes each half of a tunnel as ``<service>`` elements of a Kaazing gateway; intercloud
describes a gateway by its role. The importer works out the role from the services:

* cloud half: a ``proxy`` service that accepts TCP clients and connects to ``pipe://NAME`` with
  ``socks.mode reverse`` (KWIC "service A": the cloud accepts, the on-prem side connects), a
  ``proxy`` service that accepts ``ws(s)://HOST/PATH`` and connects to ``tcp://`` (KWIC "service B"),
  ``balancer`` services and the Hazelcast ``<cluster>``. The reverse SOCKS transport
  (``socks.transport wss://HOST/PATH``) is where the cloud listens: ``tunnel.listen``.
* on-prem half: ``accept pipe://NAME`` with ``socks.mode reverse`` in ``accept-options`` (it dials
  ``socks.transport`` out: ``tunnel.connect``) and ``connect tcp://`` (an intercloud ``connect``
  service), and ``accept tcp://`` with ``connect ws(s)://HOST/PATH`` (an intercloud ``accept`` service).

The two halves must agree on service names without seeing each other, so names come from what
links the halves in KWIC: the pipe name (``pipe://serviceA`` -> ``serviceA``, with a trailing
``-HOST`` of the cloud member removed, as the 4-ha tutorial used one pipe per member) and the last
segment of service B's WebSocket path (``/serviceB`` -> ``serviceB``).

Every element is either mapped (and the TOML says where each value came from), or reported as a
:class:`Finding`: ``note`` (mapped, but read this), ``superseded`` (intercloud does it differently
and needs no setting), ``ignored`` (no effect on traffic: JMX, SNMP, log settings, unknown
options) or ``dropped`` (carries traffic but has no intercloud equivalent: exit status 1).
Bad input (malformed XML, an unknown ``${property}``, a missing keystore, a wrong password) raises
:class:`KaazingImportError` (exit status 2) with the file, the element and the fix.

The package, by concern: :mod:`.report` (options, result, findings, errors), :mod:`.xmltree` (the
XML and ``${property}`` resolution), :mod:`.values` (URIs, binds, durations, names),
:mod:`.keystores` (JKS, JCEKS, PKCS12), :mod:`.writer` (the TOML and :func:`write_import`),
:mod:`.context` (the state of one import), :mod:`.classify` (which half each service is),
:mod:`.endpoints`, :mod:`.services`, :mod:`.security` (``[tls]``) and :mod:`.common` (shared by both
roles), the role mappers :mod:`.cloud`, :mod:`.onprem` and :mod:`.cluster`, and the driver
:mod:`.importer`.
"""

from .importer import import_kaazing
from .report import EXIT_BAD_INPUT, EXIT_DROPPED, EXIT_OK, Finding, ImportOptions, ImportResult, KaazingImportError
from .values import parse_kwic_duration
from .writer import write_import
from .xmltree import parse_gateway_opts

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DROPPED",
    "EXIT_OK",
    "Finding",
    "ImportOptions",
    "ImportResult",
    "KaazingImportError",
    "import_kaazing",
    "parse_gateway_opts",
    "parse_kwic_duration",
    "write_import",
]
