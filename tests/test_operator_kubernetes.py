"""deploy/kubernetes*.yaml: valid against the Kubernetes schemas (kubernetes-validate, strict:
no unknown field), every piece #15 asks for is there and agrees with the others, the settings
parse as `meshrt serve` parses them, and the grace period covers the drain
(docs/operations.md, Drain)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from meshrt.shared.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "deploy").glob("kubernetes*.yaml"))
# The oldest Kubernetes the files are written for (preStop's sleep action) and the newest schemas
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
OPERATIONAL = ("/metrics", "/readyz", "/healthz", "/admin/v1/accounts")
CRDS = {"monitoring.coreos.com/v1"}  # no schema in kubernetes-validate: checked by hand below


def documents() -> list[dict]:
    docs = []
    for path in FILES:
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container_environ(pod_spec: dict, container: dict) -> dict[str, str]:
    """The MESHRT_* environment the container starts with (ConfigMaps of this directory;
    secret values are not known here and are left out)."""
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environ.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            environ[item["name"]] = item["value"]
    return environ


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    checked = 0
    for doc in documents():
        if doc["apiVersion"] in CRDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 8


def test_the_operator_pieces_are_all_there():
    kinds = {(d["kind"], d["apiVersion"]) for d in documents()}
    for wanted in [
        ("ConfigMap", "v1"),
        ("Secret", "v1"),
        ("Job", "batch/v1"),
        ("Deployment", "apps/v1"),
        ("Service", "v1"),
        ("Ingress", "networking.k8s.io/v1"),
        ("PodDisruptionBudget", "policy/v1"),
        ("HorizontalPodAutoscaler", "autoscaling/v2"),
        ("ServiceMonitor", "monitoring.coreos.com/v1"),
    ]:
        assert wanted in kinds, wanted


def test_grace_period_covers_the_drain_of_an_hour_long_session():
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["serve"] and "command" not in container  # the image's tini -- meshrt
    settings = load_settings(container_environ(pod, container))  # as `meshrt serve` would: no bad setting
    assert settings.drain_s >= settings.max_session_s == 3600  # no call cut by a rollout
    pre_stop = container["lifecycle"]["preStop"]
    pre_stop_s = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else 0
    needed = pre_stop_s + settings.drain_s + settings.drain_usage_s + 20
    grace = pod["terminationGracePeriodSeconds"]
    assert needed <= grace <= needed + 60, (needed, grace)
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0  # the old pod drains while its replacement serves


def test_probes_and_scraping_use_the_pod_port_not_the_ingress():
    pod = one("Deployment")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 5  # out within seconds of a problem
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/path"] == "/metrics" and int(notes["prometheus.io/port"]) == ports["http"]
    service, monitor = one("Service"), one("ServiceMonitor")
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


def test_ingress_publishes_only_what_tenants_use():
    ingress = one("Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths and ingress["spec"]["tls"]
    for p in paths:
        assert p["pathType"] == "Prefix" and p["path"] in ("/v1", "/dashboard"), p
        for path in OPERATIONAL:  # Prefix matches whole path elements
            assert not (path == p["path"] or path.startswith(p["path"].rstrip("/") + "/")), (p["path"], path)
        assert p["backend"]["service"]["name"] == one("Service")["metadata"]["name"]
    notes = ingress["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > 3600
    assert notes["nginx.ingress.kubernetes.io/enable-access-log"] == "false"  # ?api_key= in request lines


def test_migration_job_runs_db_upgrade_with_only_the_database_secret():
    job = one("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["db", "upgrade"] and "command" not in container
    secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert secrets == {"database-url"}  # not the OpenAI key, not the admin token
    load_settings(container_environ(job["spec"]["template"]["spec"], container))


def test_targets_and_selectors_agree():
    deployment, pdb, hpa = one("Deployment"), one("PodDisruptionBudget"), one("HorizontalPodAutoscaler")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    secret = one("Secret")
    wanted = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "valueFrom" in e
    }
    assert wanted == set(secret["stringData"])


def test_state_dir_is_below_a_writable_volume():
    """meshrt chmods its state dir to 0700: the root of an emptyDir is root's, so the state dir
    must be a directory below it, which meshrt makes as its own user."""
    for kind in ("Deployment", "Job"):
        pod = one(kind)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        state = Path(container_environ(pod, container)["MESHRT_STATE_DIR"])
        mounts = {Path(m["mountPath"]) for m in container["volumeMounts"]}
        assert state.parent in mounts and state not in mounts, (kind, state, mounts)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
