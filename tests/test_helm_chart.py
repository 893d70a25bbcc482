"""The Helm chart in helm/sellarec renders valid Kubernetes manifests in every supported shape.

The chart is rendered offline with helm-python-sdk (Helm v4's Go SDK as a library, no helm
binary) and every manifest is validated, strictly (unknown fields are errors), against the
Kubernetes JSON schemas of kubernetes-validate for the oldest and the newest Kubernetes the
chart supports. The ServiceMonitor is a CRD the schemas do not know; it is checked by hand.

The Bitnami Redis subchart is a declared dependency that is fetched by `helm dependency build`,
never vendored, so offline renders show the parent chart's side of it: the URL, the Secret
reference and the hook Job that talk to the subchart's Service.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import helm_python as helm
    import kubernetes_validate
except ImportError as exc:  # the renderer is part of the dev extra: a missing one is a failure
    pytest.fail(
        f"cannot import the chart renderer or validator ({exc}); "
        "install the dev extra: pip install -e '.[dev]'",
        pytrace=False,
    )

CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "sellarec"
RELEASE = "prod"
NAMESPACE = "ranking"
# Oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and newest the schemas know.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

EXTERNAL_REDIS = {
    "redis": {"enabled": False},
    "externalRedis": {
        "url": "rediss://redis.example.internal:6380/2",
        "existingSecret": "redis-credentials",
        "existingSecretPasswordKey": "password",
    },
}

# Named value sets covering each way the chart is meant to be installed.
CASES: dict[str, dict[str, Any]] = {
    # Chart defaults: Redis subchart on, store-load Job on, GPU on.
    "defaults": {},
    "external-redis": EXTERNAL_REDIS,
    "inline-secrets": {
        "redis": {"enabled": False},
        "externalRedis": {"url": "redis://redis:6379/0", "username": "ranker", "password": "s3cret"},
        "apiToken": {"enabled": True, "value": "tok-123"},
    },
    "embedded-store": {"redis": {"enabled": False}, "storeLoad": {"enabled": False}},
    "everything-on": {
        **EXTERNAL_REDIS,
        "autoscaling": {
            "enabled": True,
            "maxReplicas": 6,
            "targetCPUUtilizationPercentage": 80,
            "queueDepth": {"targetAverageValue": "12"},
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
        "podDisruptionBudget": {"enabled": True},
        "storeLoad": {"enabled": True, "extraArgs": ["--keep-versions", "2"]},
        "metrics": {"podAnnotations": True},
        "apiToken": {"enabled": True, "existingSecret": "sellarec-token", "existingSecretKey": "token"},
        "gpu": {"count": 2},
        "config": {"MAX_CANDIDATES": 256, "BATCH_WAIT_MS": 2.5, "max_queue": 1000},
        "models": {"type": "pvc", "existingClaim": "backbone-cache"},
        "artifacts": {"type": "hostPath", "hostPath": "/srv/sellarec/artifacts"},
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "sellarec"}},
                        },
                    }
                ]
            }
        },
    },
    "cpu-only": {
        "redis": {"enabled": False},
        "storeLoad": {"enabled": False},
        "gpu": {"enabled": False},
        "tolerations": [],
        "shm": {"enabled": False},
        "models": {"type": "image"},
        "artifacts": {"type": "image"},
    },
}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every manifest the chart renders for `values`, as parsed documents."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {doc["kind"] for doc in docs}


def server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {item["name"]: item for item in container["env"]}


def check_service_monitor(monitor: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """The fields the Prometheus Operator needs, and that they point at our Service."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    service = only(docs, "Service")
    service_labels = service["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    assert selector and selector.items() <= service_labels.items()
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert spec["endpoints"], "a ServiceMonitor without endpoints scrapes nothing"
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("case", CASES)
def test_every_manifest_is_valid_kubernetes(chart: Any, case: str) -> None:
    docs = render(chart, CASES[case])
    assert {"Deployment", "Service", "ServiceAccount"} <= kinds(docs)
    invalid = []
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc, docs)
            continue
        # An unknown kind raises SchemaNotFoundError: every other kind must be a core one.
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(part) for part in error.path)
                invalid.append(
                    f"{doc['kind']} {doc['metadata']['name']} (Kubernetes "
                    f"{version}) at {where}: {error.message}"
                )
    assert invalid == []


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_finds_nothing_but_the_unfetched_subchart(case: str) -> None:
    report = helm.lint(CHART_DIR, CASES[case], strict=True, namespace=NAMESPACE)
    problems = [
        message["error"]
        for message in report["messages"]
        if message["severity"] >= 2 and "missing these dependencies: redis" not in message["error"]
    ]
    assert problems == []


def test_redis_is_an_optional_unvendored_dependency() -> None:
    metadata = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    (redis,) = [dep for dep in metadata["dependencies"] if dep["name"] == "redis"]
    assert redis["condition"] == "redis.enabled"
    assert "bitnami" in redis["repository"]
    assert not list(CHART_DIR.glob("charts/*")), "the subchart must be fetched, not committed"


def test_server_gets_one_gpu_by_default(chart: Any) -> None:
    container = server(render(chart, {}))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["SELLAREC_DEVICE"]["value"] == "cuda"


def test_gpu_count_is_configurable(chart: Any) -> None:
    container = server(render(chart, CASES["everything-on"]))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["memory"] == "32Gi"


def test_cpu_only_install_requests_no_gpu_and_runs_on_cpu(chart: Any) -> None:
    docs = render(chart, CASES["cpu-only"])
    container = server(docs)
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert env_of(container)["SELLAREC_DEVICE"]["value"] == "cpu"
    assert "tolerations" not in only(docs, "Deployment")["spec"]["template"]["spec"]


def test_pods_are_scheduled_onto_gpu_nodes(chart: Any) -> None:
    pod = only(render(chart, CASES["everything-on"]), "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (pod["tolerations"])
    assert "podAntiAffinity" in pod["affinity"]


def test_probes_check_health_readiness_and_allow_fifteen_minutes_to_load(chart: Any) -> None:
    container = server(render(chart, {}))
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", 8000)
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_pod_runs_as_non_root_and_drains_gracefully(chart: Any) -> None:
    pod = only(render(chart, {}), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["terminationGracePeriodSeconds"] >= 30
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["serviceAccountName"] == f"{RELEASE}-sellarec"


def test_shared_memory_is_a_sized_memory_volume(chart: Any) -> None:
    pod = only(render(chart, {}), "Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in pod["containers"][0]["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


def test_backbone_cache_and_artifacts_are_mounted_from_the_chosen_volumes(chart: Any) -> None:
    pod = only(render(chart, CASES["everything-on"]), "Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in pod["containers"][0]["volumeMounts"]}
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == ("backbone-cache")
    assert volumes[mounts["/artifacts"]["name"]]["hostPath"]["path"] == "/srv/sellarec/artifacts"
    assert mounts["/artifacts"]["readOnly"] is True
    env = env_of(pod["containers"][0])
    assert env["SELLAREC_ARTIFACTS"]["value"] == "/artifacts"
    assert env["SELLAREC_CACHE_DIR"]["value"] == "/models"


def test_default_volumes_are_a_scratch_cache_and_the_artifacts_claim(chart: Any) -> None:
    pod = only(render(chart, {}), "Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["models"]["emptyDir"] == {"sizeLimit": "40Gi"}
    assert volumes["artifacts"]["persistentVolumeClaim"] == {
        "claimName": "sellarec-artifacts",
        "readOnly": True,
    }


def test_artifacts_baked_into_the_image_need_no_volume(chart: Any) -> None:
    pod = only(render(chart, CASES["cpu-only"]), "Deployment")["spec"]["template"]["spec"]
    assert "volumes" not in pod
    assert "volumeMounts" not in pod["containers"][0]


def test_redis_url_points_at_the_subchart_with_its_password(chart: Any) -> None:
    env = env_of(server(render(chart, {})))
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{RELEASE}-redis",
        "key": "redis-password",
    }
    assert env["SELLAREC_REDIS_URL"]["value"] == (f"redis://:$(REDIS_PASSWORD)@{RELEASE}-redis-master:6379/0")
    names = list(env)  # Kubernetes expands $(VAR) only from variables defined earlier
    assert names.index("REDIS_PASSWORD") < names.index("SELLAREC_REDIS_URL")


def test_subchart_existing_secret_and_tls_are_followed(chart: Any) -> None:
    values = {
        "redis": {
            "tls": {"enabled": True},
            "fullnameOverride": "cache",
            "auth": {"existingSecret": "cache-auth", "existingSecretPasswordKey": "pw"},
        }
    }
    env = env_of(server(render(chart, values)))
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "cache-auth", "key": "pw"}
    assert env["SELLAREC_REDIS_URL"]["value"] == "rediss://:$(REDIS_PASSWORD)@cache-master:6379/0"


def test_external_redis_takes_its_password_from_the_existing_secret(chart: Any) -> None:
    docs = render(chart, EXTERNAL_REDIS)
    env = env_of(server(docs))
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-credentials",
        "key": "password",
    }
    assert env["SELLAREC_REDIS_URL"]["value"] == ("rediss://:$(REDIS_PASSWORD)@redis.example.internal:6380/2")
    assert "Secret" not in kinds(docs), "an existing Secret must be referenced, not copied"


def test_inline_credentials_go_into_the_charts_secret(chart: Any) -> None:
    docs = render(chart, CASES["inline-secrets"])
    secret = only(docs, "Secret")
    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert decoded == {"redis-password": "s3cret", "api-token": "tok-123"}
    deployment = only(docs, "Deployment")
    env = env_of(server(docs))
    assert env["SELLAREC_REDIS_URL"]["value"] == "redis://ranker:$(REDIS_PASSWORD)@redis:6379/0"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "redis-password",
    }
    assert env["SELLAREC_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "api-token",
    }
    # Changing a credential rolls the pods.
    assert "checksum/secret" in deployment["spec"]["template"]["metadata"]["annotations"]
    assert "s3cret" not in yaml.safe_dump(deployment)


def test_api_token_from_an_existing_secret(chart: Any) -> None:
    env = env_of(server(render(chart, CASES["everything-on"])))
    assert env["SELLAREC_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "sellarec-token",
        "key": "token",
    }


def test_api_is_open_unless_a_token_is_configured(chart: Any) -> None:
    assert "SELLAREC_API_TOKEN" not in env_of(server(render(chart, {})))
    with pytest.raises(helm.HelmRenderError, match="apiToken.enabled needs"):
        render(chart, {"apiToken": {"enabled": True}})


def test_without_redis_the_service_keeps_embeddings_in_process(chart: Any) -> None:
    docs = render(chart, CASES["embedded-store"])
    env = env_of(server(docs))
    assert "SELLAREC_REDIS_URL" not in env
    assert "REDIS_PASSWORD" not in env
    assert "Job" not in kinds(docs)


def test_store_load_job_refuses_to_render_without_redis(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="storeLoad.enabled needs Redis"):
        render(chart, {"redis": {"enabled": False}})


def test_external_redis_url_with_credentials_is_refused(chart: Any) -> None:
    values = {
        **EXTERNAL_REDIS,
        "externalRedis": {**EXTERNAL_REDIS["externalRedis"], "url": "redis://:pw@redis:6379/0"},
    }
    with pytest.raises(helm.HelmRenderError, match="already carries credentials"):
        render(chart, values)


def test_store_load_job_is_a_hook_that_loads_artifacts_into_redis(chart: Any) -> None:
    docs = render(chart, CASES["everything-on"])
    job = only(docs, "Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["sellarec-store"]
    assert container["args"] == [
        "load",
        "--artifacts",
        "/artifacts",
        "--redis-url",
        "$(SELLAREC_REDIS_URL)",
        "--keep-versions",
        "2",
    ]
    job_env, server_env = env_of(container), env_of(server(docs))
    assert job_env["SELLAREC_REDIS_URL"] == server_env["SELLAREC_REDIS_URL"]
    assert job_env["REDIS_PASSWORD"] == server_env["REDIS_PASSWORD"]
    assert {mount["mountPath"] for mount in container["volumeMounts"]} == {"/artifacts"}
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_service_exposes_port_80_to_the_named_container_port(chart: Any) -> None:
    docs = render(chart, {})
    service = only(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_optional_resources_are_off_by_default(chart: Any) -> None:
    docs = render(chart, {})
    assert kinds(docs).isdisjoint(
        {"HorizontalPodAutoscaler", "ServiceMonitor", "PodDisruptionBudget", "Secret"}
    )
    assert only(docs, "Deployment")["spec"]["replicas"] == 1


def test_autoscaler_scales_on_queue_depth_and_cpu(chart: Any) -> None:
    docs = render(chart, CASES["everything-on"])
    hpa = only(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": only(docs, "Deployment")["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 6)
    queue, cpu = hpa["spec"]["metrics"]
    assert queue == {
        "type": "Pods",
        "pods": {
            "metric": {"name": "sellarec_queue_depth"},
            "target": {"type": "AverageValue", "averageValue": "12"},
        },
    }
    assert cpu["resource"]["target"] == {"type": "Utilization", "averageUtilization": 80}
    assert "replicas" not in only(docs, "Deployment")["spec"], "the HPA owns the replica count"


def test_autoscaler_needs_a_metric(chart: Any) -> None:
    values = {"autoscaling": {"enabled": True, "queueDepth": {"enabled": False}}}
    with pytest.raises(helm.HelmRenderError, match="autoscaling.enabled needs"):
        render(chart, values)


def test_service_monitor_scrapes_metrics_with_the_prometheus_label(chart: Any) -> None:
    docs = render(chart, CASES["everything-on"])
    monitor = only(docs, "ServiceMonitor")
    check_service_monitor(monitor, docs)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    annotations = only(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_disruption_budget_protects_the_pods(chart: Any) -> None:
    docs = render(chart, CASES["everything-on"])
    pdb = only(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    percent = render(
        chart, {"podDisruptionBudget": {"enabled": True, "minAvailable": "50%", "maxUnavailable": None}}
    )
    assert only(percent, "PodDisruptionBudget")["spec"] == {
        "minAvailable": "50%",
        "selector": pdb["spec"]["selector"],
    }


def test_config_map_becomes_sellarec_environment(chart: Any) -> None:
    env = env_of(server(render(chart, CASES["everything-on"])))
    assert env["SELLAREC_MAX_CANDIDATES"]["value"] == "256"
    assert env["SELLAREC_BATCH_WAIT_MS"]["value"] == "2.5"
    assert env["SELLAREC_MAX_QUEUE"]["value"] == "1000"
    assert env["SELLAREC_HOST"]["value"] == "0.0.0.0"
    assert env["SELLAREC_PORT"]["value"] == "8000"
    # Empty settings are left to the service's defaults.
    assert "SELLAREC_MAX_BATCH_TOKENS" not in env


def test_config_cannot_override_chart_owned_settings(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="config.REDIS_URL is set by the chart"):
        render(chart, {"config": {"REDIS_URL": "redis://elsewhere:6379"}})


def test_every_value_is_documented() -> None:
    """Each leaf of values.yaml carries a `# --` comment, or sits inside a documented block."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    key_line = re.compile(r"^(\s*)([\w.-]+):(.*)$")
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented as a whole) of enclosing keys
    for number, line in enumerate(lines):
        match = key_line.match(line)
        if not match:
            continue
        indent, key, rest = len(match[1]), match[2], match[3].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        comments = []
        for above in reversed(lines[:number]):
            if not above.strip().startswith("#"):
                break
            comments.append(above.strip())
        documented = any(comment.startswith("# --") for comment in comments)
        following = next(
            (nxt for nxt in lines[number + 1 :] if nxt.strip() and not nxt.strip().startswith("#")), ""
        )
        is_group = rest == "" and len(following) - len(following.lstrip()) > indent
        if not documented and not is_group and not any(whole for _, whole in stack):
            undocumented.append(f"line {number + 1}: {key}")
        stack.append((indent, documented))
    assert undocumented == []


def test_grace_period_must_cover_the_prestop_sleep_and_the_drain(chart: Any) -> None:
    values = {"config": {"SHUTDOWN_TIMEOUT_S": 120}, "terminationGracePeriodSeconds": 60}
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render(chart, values)
    values["terminationGracePeriodSeconds"] = 130
    pod = only(render(chart, values), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 130
    assert env_of(pod["containers"][0])["SELLAREC_SHUTDOWN_TIMEOUT_S"]["value"] == "120"


def test_external_redis_can_be_a_redis_cluster(chart: Any) -> None:
    values = {
        **EXTERNAL_REDIS,
        "externalRedis": {**EXTERNAL_REDIS["externalRedis"], "url": "redis+cluster://redis-cluster:6379"},
    }
    env = env_of(server(render(chart, values)))
    assert env["SELLAREC_REDIS_URL"]["value"] == "redis+cluster://:$(REDIS_PASSWORD)@redis-cluster:6379"
