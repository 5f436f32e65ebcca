"""deploy/: valid, locked-down manifests, a read-only-friendly image, a config the daemon runs.

The manifests are validated against Kubernetes 1.33's strict schemas (offline, with
kubernetes-validate) and checked for the security properties deploy/README.md promises; the
Containerfile is parsed; the ConfigMap's config.toml goes through the daemon's own parser, then
runs a real daemon (paths moved into a temp dir) that the probes, as declared, are sent to.
"""

from __future__ import annotations

import http.client
import importlib.resources
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from aisoc_plugind.config.settings import Settings, load_settings
from tests.conftest import VECTOR_PUB, PluginFactory
from tests.mounts import kubelet_mount
from tests.oci_registry import free_port
from tests.ops.deploy_files import (
    MANIFESTS,
    config_text,
    containers,
    daemon_container,
    documents,
    instructions,
    mount_covering,
    one,
    pod_spec,
    volume,
)
from tests.ops.process import audit_events, running_daemon
from tests.ops.shipped import CONTAINERFILE, HEALTHCHECK, KUBERNETES, render
from tests.tls import self_signed

# The Kubernetes version the manifests are validated for (kubernetes-validate's strict,
# offline JSON schemas; the dev extra pins a release that ships them).
K8S_VERSION = "1.33"
API_PORT = 8470
# INTERFACE §2 `isolation.state_dir` (not a config key of this daemon version yet).
STATE_DIR = "/var/lib/aisoc-plugind/state"
RUN_DIR = "/run/aisoc-plugind"
IMAGE_USER = "10001:10001"
# What the image build may copy from the repository; nothing else (keys, tokens, configs).
ALLOWED_COPY_SOURCES = {"pyproject.toml", "README.md", "daemon/", "deploy/healthcheck.py"}
SECRETISH = re.compile(r"TOKEN|SECRET|PASSW|PRIVATE|CREDENTIAL|API_KEY", re.IGNORECASE)


def _settings() -> Settings:
    """The ConfigMap's config.toml through the daemon's own parser, environment ignored."""
    return _load_config_text(config_text())


def _load_config_text(text: str) -> Settings:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text)
        return load_settings(path, environ={})


def _written_paths() -> list[str]:
    """Every directory the daemon writes to under the ConfigMap's settings."""
    return [str(_settings().audit_path.parent), STATE_DIR, RUN_DIR, "/tmp"]


# ---- the manifests as Kubernetes sees them ------------------------------------------------


def test_the_validator_ships_the_schemas_offline() -> None:
    """kubernetes-validate carries the strict, locally resolved schemas of K8S_VERSION."""
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    assert (schemas / f"v{K8S_VERSION}.0-local-strict" / "deployment-apps-v1.json").is_file()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    """Every object validates against the strict Kubernetes schema (unknown fields fail)."""
    for doc in documents(path):
        assert kubernetes_validate.validate(doc, f"{K8S_VERSION}.0", strict=True) == K8S_VERSION


def test_kustomization_lists_every_manifest() -> None:
    """`kubectl apply -k deploy/kubernetes` applies every manifest file, and only those."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_the_manifests_unchanged() -> None:
    """`kubectl kustomize deploy/kubernetes` (offline) yields exactly the manifests' objects."""
    done = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rendered = sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(done.stdout))
    shipped = sorted(json.dumps(d, sort_keys=True) for p in MANIFESTS for d in documents(p))
    assert rendered == shipped


def test_every_object_lives_in_the_namespace() -> None:
    """Every namespaced object names the one Namespace of the manifests."""
    namespace = one("Namespace")["metadata"]["name"]
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == namespace, path.name


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    """Pod Security Admission refuses any pod in the namespace that is not `restricted`."""
    labels = one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_pod_runs_as_the_image_user_never_root() -> None:
    """runAsNonRoot with the image's numeric UID/GID, fsGroup for the volumes, seccomp on."""
    context = pod_spec()["securityContext"]
    assert context["runAsNonRoot"] is True
    assert f"{context['runAsUser']}:{context['runAsGroup']}" == IMAGE_USER
    assert context["fsGroup"] == context["runAsGroup"]
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("container", containers(), ids=lambda c: c["name"])
def test_container_is_locked_down(container: dict[str, Any]) -> None:
    """Read-only root, no privilege escalation, every capability dropped, RuntimeDefault."""
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged", False) is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("container", containers(), ids=lambda c: c["name"])
def test_container_has_requests_and_limits(container: dict[str, Any]) -> None:
    """CPU and memory are requested and limited."""
    resources = container["resources"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[bound]), bound


def test_no_service_account_token_and_no_service_links() -> None:
    """No API token in the pod; no AISOC_PLUGIND_* Service variables in its environment."""
    assert one("ServiceAccount")["automountServiceAccountToken"] is False
    spec = pod_spec()
    assert spec["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False


def test_one_replica_replaced_never_doubled() -> None:
    """One pod owns the audit file: 1 replica, Recreate (never two during a rollout)."""
    spec = one("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_the_grace_period_covers_the_drain() -> None:
    """Kubernetes waits longer than the daemon's shutdown grace before SIGKILL."""
    assert pod_spec()["terminationGracePeriodSeconds"] > _settings().shutdown_grace_s


@pytest.mark.parametrize(
    ("probe", "path"),
    [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")],
)
def test_probe_uses_the_public_path_on_the_api_port(probe: str, path: str) -> None:
    """Probes hit /healthz (alive) and /readyz (ready) over HTTPS on the configured port."""
    get = daemon_container()[probe]["httpGet"]
    assert get["path"] == path
    assert get["scheme"] == ("HTTPS" if _settings().api_tls_cert else "HTTP")
    (port,) = [p for p in daemon_container()["ports"] if p["name"] == get["port"]]
    assert port["containerPort"] == API_PORT == _settings().listen.port


def test_trusted_keys_come_from_a_secret_mounted_read_only() -> None:
    """trust.keys_dir is the trust-keys Secret, read-only in every container that mounts it."""
    keys_dir = _settings().keys_dir
    secret = one("Secret")["metadata"]["name"]
    for container in containers():
        mount = mount_covering(container, keys_dir)
        assert mount is not None and mount["mountPath"] == str(keys_dir), container["name"]
        assert mount["readOnly"] is True
        assert volume(mount["name"])["secret"]["secretName"] == secret


def test_no_private_key_in_any_secret() -> None:
    """The shipped Secret holds public keys only."""
    data = json.dumps({k: v for k, v in one("Secret").items() if k in ("data", "stringData")})
    assert "PRIVATE KEY" not in data


def test_the_daemon_cannot_write_its_plugins_or_config() -> None:
    """plugins.dir (a PVC) and the config directory are read-only in the daemon container."""
    settings = _settings()
    plugins = mount_covering(daemon_container(), settings.plugins_dir)
    assert plugins is not None and plugins["readOnly"] is True
    claim = volume(plugins["name"])["persistentVolumeClaim"]["claimName"]
    claims = [
        doc["metadata"]["name"]
        for p in MANIFESTS
        for doc in documents(p)
        if doc["kind"] == "PersistentVolumeClaim"
    ]
    assert claim in claims
    for path in (settings.tokens_file, settings.api_tls_cert, settings.api_tls_key):
        mount = mount_covering(daemon_container(), str(path))
        assert mount is not None and mount["readOnly"] is True, path


def test_config_tokens_and_tls_come_from_the_configmap_and_secrets() -> None:
    """--config, api.tokens_file, api.tls_cert/tls_key are files of the projected volume."""
    settings = _settings()
    args = daemon_container()["args"]
    config = PurePosixPath(args[args.index("--config") + 1])
    mount = mount_covering(daemon_container(), config)
    assert mount is not None
    sources = volume(mount["name"])["projected"]["sources"]
    files = {
        str(PurePosixPath(mount["mountPath"]) / item["path"]): kind
        for source in sources
        for kind, body in source.items()
        for item in body["items"]
    }
    assert files[str(config)] == "configMap"
    for path in (settings.tokens_file, settings.api_tls_cert, settings.api_tls_key):
        assert files[str(path)] == "secret", path


@pytest.mark.parametrize("path", _written_paths())
def test_every_path_the_daemon_writes_is_a_writable_volume(path: str) -> None:
    """With a read-only root filesystem, the audit dir, state, socket dir and /tmp are volumes."""
    mount = mount_covering(daemon_container(), path)
    assert mount is not None and not mount.get("readOnly", False)


def test_the_audit_log_outlives_the_pod_and_scratch_does_not() -> None:
    """The audit dir is a PersistentVolumeClaim (the chain continues); state and tmp emptyDir."""
    audit = mount_covering(daemon_container(), _settings().audit_path)
    assert audit is not None and "persistentVolumeClaim" in volume(audit["name"])
    for path in (STATE_DIR, "/tmp"):
        mount = mount_covering(daemon_container(), path)
        assert mount is not None and "emptyDir" in volume(mount["name"])


def test_init_container_stages_plugins_with_the_trusted_keys() -> None:
    """`aisoc plugin pull REF@digest <plugins.dir> --keys-dir <trust.keys_dir>`, same image."""
    settings = _settings()
    (init,) = pod_spec()["initContainers"]
    command = init["command"]
    assert command[:3] == ["aisoc", "plugin", "pull"]
    assert re.search(r"@sha256:[0-9a-f]{64}$", command[3])
    assert command[4] == str(settings.plugins_dir)
    assert command[command.index("--keys-dir") + 1] == str(settings.keys_dir)
    assert init["image"] == daemon_container()["image"]
    mount = mount_covering(init, settings.plugins_dir)
    assert mount is not None and not mount.get("readOnly", False)


def test_service_and_network_policy_open_only_the_api_port() -> None:
    """The Service and the only NetworkPolicy ingress rule name the API port of this pod."""
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one("Service")["spec"]
    assert service["selector"].items() <= pod_labels.items()
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(API_PORT, "https")]
    policy = one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    ports = [p for rule in policy["ingress"] for p in rule["ports"]]
    assert ports == [{"protocol": "TCP", "port": API_PORT}]


# ---- the Containerfile --------------------------------------------------------------------


def test_containerfile_is_multi_stage() -> None:
    """A build stage installs the package; the final stage copies only its venv."""
    froms = [i.args for i in instructions() if i.keyword == "FROM"]
    assert len(froms) >= 2
    assert any("--from=build" in i.args for i in instructions() if i.keyword == "COPY")
    runs = [i.args for i in instructions() if i.keyword == "RUN"]
    assert any("pip install ." in run for run in runs)


def test_containerfile_ends_as_a_non_root_numeric_user() -> None:
    """The last USER is the numeric non-root UID:GID; only metadata follows it."""
    steps = instructions()
    last = max(n for n, i in enumerate(steps) if i.keyword == "USER")
    assert steps[last].args == IMAGE_USER
    after = {i.keyword for i in steps[last + 1 :]}
    assert after <= {"VOLUME", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL", "ENV"}


def test_containerfile_fetches_nothing_by_url_and_bakes_in_no_secrets() -> None:
    """No ADD of URLs, no secret-looking ENV/ARG, and only allowed sources are copied in."""
    for step in instructions():
        assert step.keyword != "ADD", step
        if step.keyword in ("ENV", "ARG"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", step.args)
            assert not [n for n in names if SECRETISH.search(n)], step
        if step.keyword == "COPY" and "--from=" not in step.args:
            *sources, _dest = shlex.split(step.args)
            assert set(sources) <= ALLOWED_COPY_SOURCES, step


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    """The build context is the files COPY names and nothing else (no .venv, keys, tokens)."""
    ignore = (CONTAINERFILE.parent / "Containerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    assert {r[1:] for r in rules if r.startswith("!")} == ALLOWED_COPY_SOURCES


@pytest.mark.parametrize("path", _written_paths())
def test_image_declares_every_written_path_a_volume(path: str) -> None:
    """`docker run --read-only` works: each written directory is (under) a VOLUME."""
    volumes = [json.loads(i.args) for i in instructions() if i.keyword == "VOLUME"]
    declared = [PurePosixPath(v) for group in volumes for v in group]
    target = PurePosixPath(path)
    assert any(v == target or v in target.parents for v in declared)


def test_image_writes_no_bytecode_and_keeps_home_and_tmp_on_volumes() -> None:
    """PYTHONDONTWRITEBYTECODE=1; HOME and TMPDIR point into the /tmp volume."""
    env = " ".join(i.args for i in instructions() if i.keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env.split()
    assert "HOME=/tmp" in env.split() and "TMPDIR=/tmp" in env.split()


def test_image_healthcheck_runs_the_script_against_healthz() -> None:
    """HEALTHCHECK runs deploy/healthcheck.py, whose URL in the image is /healthz."""
    (check,) = [i.args for i in instructions() if i.keyword == "HEALTHCHECK"]
    assert "/opt/aisoc-plugind/healthcheck.py" in check
    env = " ".join(i.args for i in instructions() if i.keyword == "ENV").split()
    (url,) = [e.split("=", 1)[1] for e in env if e.startswith("AISOC_HEALTH_URL=")]
    assert url == f"https://127.0.0.1:{API_PORT}/healthz"


# ---- the ConfigMap's config against the real daemon ---------------------------------------


def test_configmap_config_is_accepted_by_the_daemon_parser() -> None:
    """load_settings() accepts config.toml as shipped: TLS on 0.0.0.0:8470, strict trust."""
    settings = _settings()
    assert settings.api_listen == f"0.0.0.0:{API_PORT}"
    assert settings.api_tls_cert is not None and settings.api_tls_key is not None
    assert settings.trust_mode.value == "strict"
    assert "10.0.0.0/8" in settings.api_allowed_hosts
    assert tomllib.loads(config_text())["environment"] == "production"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    return self_signed(directory, common_name="aisoc-plugind", stem="tls")


@dataclass(frozen=True, slots=True)
class K8sDaemon:
    """A daemon running the ConfigMap's config.toml with its paths moved into a temp dir."""

    port: int
    audit: Path


@pytest.fixture(scope="module")
def k8s_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[K8sDaemon]:
    """Run the shipped config (paths and listen address moved); stop it by PID at the end."""
    root = tmp_path_factory.mktemp("k8s")
    etc, plugins, keys = root / "etc", root / "plugins", root / "keys"
    etc.mkdir()
    plugins.mkdir()
    PluginFactory(plugins).write("staged")
    kubelet_mount(keys, {"vector-signer.pem": VECTOR_PUB.read_bytes()})
    cert, key = _self_signed(etc)
    port, audit = free_port(), root / "log" / "audit.jsonl"
    config = root / "config.toml"
    config.write_text(
        render(
            config_text(),
            {
                '"/opt/aisoc/plugins"': f'"{plugins}"',
                '"/opt/aisoc/plugin-keys"': f'"{keys}"',
                '"0.0.0.0:8470"': f'"127.0.0.1:{port}"',
                '"/etc/aisoc-plugind/tokens.toml"': f'"{etc / "tokens.toml"}"',
                '"/etc/aisoc-plugind/tls.crt"': f'"{cert}"',
                '"/etc/aisoc-plugind/tls.key"': f'"{key}"',
                '"/var/log/aisoc-plugind/audit.jsonl"': f'"{audit}"',
            },
        )
    )
    with running_daemon(config, audit, root):
        yield K8sDaemon(port=port, audit=audit)


def _probe(probe: dict[str, Any], port: int, host: str | None = None) -> int:
    """Do what kubelet does for an httpGet probe (no certificate check); return the status."""
    get = probe["httpGet"]
    headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
    if host is not None:
        headers["Host"] = host
    if get["scheme"] == "HTTPS":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=10, context=context
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", get["path"], headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("probe", ["startupProbe", "livenessProbe"])
def test_liveness_probes_pass_against_the_daemon(k8s_daemon: K8sDaemon, probe: str) -> None:
    """The startup and liveness probes, exactly as declared, get 200 from the daemon."""
    assert _probe(daemon_container()[probe], k8s_daemon.port) == 200


def test_readiness_probe_passes_against_the_daemon(k8s_daemon: K8sDaemon) -> None:
    """The readiness probe, exactly as declared, gets 200 from the ready daemon."""
    assert _probe(daemon_container()["readinessProbe"], k8s_daemon.port) == 200


def test_a_client_addressing_the_pod_ip_is_accepted(k8s_daemon: K8sDaemon) -> None:
    """A Host header naming a pod IP inside the configured CIDR passes the Host check."""
    probe = daemon_container()["livenessProbe"]
    assert _probe(probe, k8s_daemon.port, host=f"10.1.2.3:{API_PORT}") == 200


def test_keys_mounted_from_a_secret_are_trusted(k8s_daemon: K8sDaemon) -> None:
    """The Secret's key, behind kubelet's ..data symlinks, is loaded and verifies the plugin."""
    ready = [e for e in audit_events(k8s_daemon.audit) if e["event"] == "daemon.ready"]
    assert ready[0]["keys"] == 1 and ready[0]["failed"] == 0


def _healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env={**os.environ, "AISOC_HEALTH_URL": url},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_container_healthcheck_passes_against_the_daemon(k8s_daemon: K8sDaemon) -> None:
    """deploy/healthcheck.py exits 0 against the daemon's HTTPS /healthz."""
    done = _healthcheck(f"https://127.0.0.1:{k8s_daemon.port}/healthz")
    assert done.returncode == 0, done.stderr


def test_container_healthcheck_fails_when_nothing_answers() -> None:
    """deploy/healthcheck.py exits 1, saying why, when nothing listens."""
    done = _healthcheck(f"https://127.0.0.1:{free_port()}/healthz")
    assert done.returncode == 1
    assert "unhealthy" in done.stderr


def test_healthcheck_script_needs_only_the_standard_library() -> None:
    """The image's health check imports nothing outside the standard library."""
    imports = re.findall(r"^(?:from|import) (\w+)", HEALTHCHECK.read_text(), re.MULTILINE)
    assert set(imports) - {"__future__"} <= set(sys.stdlib_module_names)
