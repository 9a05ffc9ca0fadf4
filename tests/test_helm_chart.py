"""The Helm chart, rendered by Helm's own engine (helm-python-sdk binds Helm's Go SDK, no helm binary or cluster):
every core object validates against the Kubernetes schemas, the generated config is one splitserve accepts, and
the fields a deployment depends on (GPUs per pod, probes, security, network policy, secrets) are asserted."""
import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from splitserve.cluster import config as cluster_config
from splitserve.workers.engine_config import ATTENTION_BACKENDS, MODEL_BACKENDS

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parent.parent / "helm" / "splitserve"
RELEASE, NAMESPACE = "demo", "llm"
# Image volumes (model.source: image) are beta and on by default from 1.35; the chart's minimum is 1.27.
KUBE_VERSION = "1.35.0"
MIN_KUBE_VERSION = "1.27.0"
CRD_KINDS = {"RayCluster", "ServiceMonitor"}
HEALTH_SERVICE = "splitserve.v1.InferenceService"
SERVE_COMMAND = ("splitserve serve --config /etc/splitserve/config.yaml --address auto --host 0.0.0.0 "
                 "--port 50051 --metrics-port 9400")
RAY_PORTS = {6379, 8265, 10001}
RELEASE_SELECTOR = {"app.kubernetes.io/name": "splitserve", "app.kubernetes.io/instance": RELEASE}

LAYOUTS = {
    "default": {},
    "prefill-tp2-sp2-x2-decode-tp4-x1": {
        "prefill": {"replicas": 2, "tp": 2, "sp": 2, "spAlgorithm": "token_ring"},
        "decode": {"replicas": 1, "tp": 4},
        "config": {"engine": {"kv_cache_bytes": 1 << 36, "max_model_len": 32768, "overlap_min_tokens": 256}},
    },
    "prefill-tp4-x3-decode-tp2-x2": {"prefill": {"replicas": 3, "tp": 4, "sp": 1},
                                     "decode": {"replicas": 2, "tp": 2}},
    "hostpath-model": {"model": {"source": "hostPath", "path": "/data/llama-3-8b"}},
    "image-model": {"model": {"source": "image", "reference": "registry.example/models/llama:3-8b",
                              "subPath": "checkpoint"}},
    "preset-model": {"model": {"source": "preset", "preset": "smollm2-135m"}},
    "auth-on": {"auth": {"enabled": True, "token": "s3cret"}},
    "auth-existing-secrets": {"auth": {"enabled": True, "existingSecret": "api-auth", "existingSecretKey": "key"},
                              "rayAuth": {"existingSecret": "ray-token"}},
    "servicemonitor-on": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "scheduling": {
        "nodeSelector": {"pool": "llm", "zone": "a"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                             "labelSelector": {"matchLabels": RELEASE_SELECTOR}}}]}},
        "prefill": {"nodeSelector": {"zone": "b", "gpu": "h100"}},
        "decode": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["l40s"]}]}]}}}},
    },
    "autoscaling": {"prefill": {"replicas": 1, "tp": 2}, "decode": {"replicas": 2},
                    "autoscaling": {"enabled": True, "prefill": {"minReplicas": 1, "maxReplicas": 3},
                                    "decode": {"minReplicas": 1, "maxReplicas": 6}, "idleTimeoutSeconds": 90,
                                    "planner": {"ttft_s": 0.5, "tpot_s": 0.05, "interval_s": 15}},
                    "config": {"fault_tolerance": {"max_restarts": 2}}},
    "restricted-clients": {"networkPolicy": {"clients": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]}},
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered(chart):
    return {name: render(chart, values) for name, values in LAYOUTS.items()}


def render(chart, values):
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_templates(raycluster):
    """(group, pod template) for the head and every worker group."""
    spec = raycluster["spec"]
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]


def container(template, name):
    return next(c for c in template["spec"]["containers"] if c["name"] == name)


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


# ---------------------------------------------------------------- lint and validation


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lint_is_clean(layout):
    report = helm.lint(CHART, LAYOUTS[layout], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_core_objects_validate_against_kubernetes_schemas(rendered, layout):
    docs = rendered[layout]
    versions = [KUBE_VERSION] + ([MIN_KUBE_VERSION] if LAYOUTS[layout].get("model", {}).get("source") != "image"
                                 else [])
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)
    # The RayCluster is a custom resource, but its pod templates are core PodTemplateSpecs: validate those.
    for group, template in pod_templates(one(docs, "RayCluster")):
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        for version in versions:
            kubernetes_validate.validate(wrapper, version, strict=True)
    kinds = sorted(d["kind"] for d in docs)
    assert {"RayCluster", "ConfigMap", "Service", "ServiceAccount", "NetworkPolicy"} <= set(kinds)


def test_raycluster_essentials(rendered):
    rc = one(rendered["default"], "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"] == f"{RELEASE}-splitserve"
    assert rc["spec"]["rayVersion"] == "2.60.0" and rc["spec"]["enableInTreeAutoscaling"] is False
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    # KubeRay generates `ray start` for the first container: that must be Ray, with its ports named.
    ray_head = head["template"]["spec"]["containers"][0]
    assert ray_head["name"] == "ray-head" and "command" not in ray_head
    assert {p["containerPort"] for p in ray_head["ports"]} == RAY_PORTS
    assert [g["groupName"] for g in rc["spec"]["workerGroupSpecs"]] == ["prefill", "decode"]


# ---------------------------------------------------------------- layout: GPUs, replicas, config


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gpus_and_replicas_follow_the_layout(chart, rendered, layout):
    values = chart.merge_values(LAYOUTS[layout])
    rc = one(rendered[layout], "RayCluster")
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    expected = {"prefill": (values["prefill"]["replicas"], values["prefill"]["tp"] * values["prefill"]["sp"]),
                "decode": (values["decode"]["replicas"], values["decode"]["tp"])}
    for name, (replicas, gpus) in expected.items():
        group = groups[name]
        assert group["replicas"] == replicas
        if not values["autoscaling"]["enabled"]:  # the autoscaling layout has its own test
            assert group["minReplicas"] == group["maxReplicas"] == replicas
        assert group["rayStartParams"]["num-gpus"] == str(gpus)
        # the role resource the launcher asks for (ray.role_resources), as `ray start --resources` reads it
        resources = group["rayStartParams"]["resources"]
        assert resources.startswith("'") and resources.endswith("'")
        assert json.loads(resources[1:-1]) == {f"splitserve_{name}": gpus}
        worker = container(group["template"], "ray-worker")
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert "nvidia.com/gpu" not in worker["resources"].get("requests", {})
    for c in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})


def test_user_gpu_limit_cannot_disagree_with_the_layout(chart):
    resources = {"limits": {"nvidia.com/gpu": 8, "memory": "80Gi"}, "requests": {"nvidia.com/gpu": 8, "cpu": "4"}}
    docs = render(chart, {"prefill": {"tp": 2, "sp": 2, "resources": resources}})
    group = one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]
    worker = container(group["template"], "ray-worker")
    assert worker["resources"]["limits"] == {"memory": "80Gi", "nvidia.com/gpu": 4}
    assert worker["resources"]["requests"] == {"cpu": "4", "memory": "64Gi"}  # the chart's default memory request


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_config_map_holds_a_config_splitserve_accepts(chart, rendered, layout):
    values = chart.merge_values(LAYOUTS[layout])
    config_map = one(rendered[layout], "ConfigMap")
    cfg = cluster_config.config_from_dict(yaml.safe_load(config_map["data"]["config.yaml"]))
    prefill = values["prefill"]
    assert (cfg.prefill.instances, cfg.prefill.tp, cfg.prefill.sp, cfg.prefill.sp_algorithm) == (
        prefill["replicas"], prefill["tp"], prefill["sp"], prefill["spAlgorithm"])
    assert (cfg.decode.instances, cfg.decode.tp) == (values["decode"]["replicas"], values["decode"]["tp"])
    assert cfg.colocated.instances == 0 and cfg.ray.address == "auto" and cfg.ray.role_resources is True
    assert (cfg.dtype, cfg.device) == (values["config"]["dtype"], values["config"]["device"])
    engine = values["config"]["engine"]
    assert {k: getattr(cfg.engine, k) for k in engine} == engine
    assert (cfg.routing.policy, cfg.routing.overlap_weight) == (values["config"]["routing"]["policy"],
                                                                values["config"]["routing"]["overlap_weight"])
    # Ray's GPUs across the worker groups are exactly the devices the config needs.
    rc = one(rendered[layout], "RayCluster")
    gpus = sum(g["replicas"] * int(g["rayStartParams"]["num-gpus"]) for g in rc["spec"]["workerGroupSpecs"])
    assert gpus == cfg.num_devices
    # The config names the mount path of the model volume in every pod that loads weights; a preset baked into
    # the image needs no volume.
    preset = values["model"]["source"] == "preset"
    assert cfg.model == (values["model"]["preset"] if preset else "/model")
    for group, template in pod_templates(rc):
        assert any(v["name"] == "model" for v in template["spec"]["volumes"]) is not preset
        for c in template["spec"]["containers"]:
            if c["name"] == "ray-head" or preset:
                continue
            mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
            assert mount["mountPath"] == cfg.model and mount["readOnly"] is True
    server = container(rc["spec"]["headGroupSpec"]["template"], "splitserve")
    config_mount = next(m for m in server["volumeMounts"] if m["name"] == "config")
    assert f"{config_mount['mountPath']}/config.yaml" == "/etc/splitserve/config.yaml"
    config_volume = next(v for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]


# ---------------------------------------------------------------- server, probes, service, metrics


def test_server_container_probes_and_command(rendered):
    rc = one(rendered["default"], "RayCluster")
    template = rc["spec"]["headGroupSpec"]["template"]
    server = container(template, "splitserve")
    assert SERVE_COMMAND in server["args"][0].splitlines()[-1]
    assert env_of(server)["RAY_ADDRESS"]["value"] == "127.0.0.1:6379"
    assert server["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert server["startupProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert server["readinessProbe"]["grpc"] == {"port": 50051, "service": HEALTH_SERVICE}
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"grpc": 50051, "metrics": 9400}
    # The server shares Ray's session directory and object store with the ray-head container.
    ray_head = container(template, "ray-head")
    for path in ("/tmp", "/dev/shm"):
        assert ({m["name"] for m in server["volumeMounts"] if m["mountPath"] == path}
                == {m["name"] for m in ray_head["volumeMounts"] if m["mountPath"] == path})


def test_service_reaches_the_server_in_the_head_pod(rendered):
    docs = rendered["default"]
    service = one(docs, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert (ports["grpc"]["port"], ports["grpc"]["targetPort"], ports["grpc"]["appProtocol"]) == (50051, "grpc", "grpc")
    assert (ports["metrics"]["port"], ports["metrics"]["targetPort"]) == (9400, "metrics")
    templates = dict(pod_templates(one(docs, "RayCluster")))
    for group, template in templates.items():
        labels = template["metadata"]["labels"]
        selected = all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
        assert selected == (group == "head"), group


def test_service_monitor_is_optional_and_scrapes_the_metrics_port(rendered):
    assert not [d for d in rendered["default"] if d["kind"] == "ServiceMonitor"]
    docs = rendered["servicemonitor-on"]
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"


# ---------------------------------------------------------------- security


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_container_runs_locked_down(rendered, layout):
    for group, template in pod_templates(one(rendered[layout], "RayCluster")):
        pod = template["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["tmp"] and volumes["shm"]["emptyDir"]["medium"] == "Memory"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (group, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (group, c["name"])
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True, (group, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (group, c["name"])
            assert "privileged" not in sc
            # A read-only root needs Ray's /tmp/ray on a writable volume.
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/tmp"] == "tmp" and mounts["/dev/shm"] == "shm", (group, c["name"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_network_policy_keeps_ray_inside_the_release(rendered, layout):
    docs = rendered[layout]
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    # The policy selects every pod of the release.
    for group, template in pod_templates(one(docs, "RayCluster")):
        labels = template["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items(), group
    client_ports = {50051, 9400}
    from_release = [{"podSelector": {"matchLabels": RELEASE_SELECTOR}}]
    release_only = [r for r in policy["ingress"] if r.get("from") == from_release]
    assert release_only and all("ports" not in r for r in release_only)  # Ray's ports and worker ports
    for rule in policy["ingress"]:
        if rule in release_only:
            continue
        ports = {p["port"] for p in rule.get("ports", [])}
        assert ports and ports <= client_ports, "only gRPC and metrics are reachable from outside the release"
        assert not ports & RAY_PORTS
    (client_rule,) = [r for r in policy["ingress"] if r not in release_only]
    assert {p["port"] for p in client_rule["ports"]} == client_ports
    assert client_rule.get("from") == LAYOUTS[layout].get("networkPolicy", {}).get("clients")


def test_network_policy_can_be_turned_off_and_extended(chart):
    assert not [d for d in render(chart, {"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"]
    extra = {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}}}],
             "ports": [{"port": 8265, "protocol": "TCP"}]}
    policy = one(render(chart, {"networkPolicy": {"extraIngress": [extra]}}), "NetworkPolicy")
    assert policy["spec"]["ingress"][-1] == extra


# ---------------------------------------------------------------- tokens


def ray_containers(rc):
    """Every container that talks to Ray: the Ray containers and the server (a Ray driver)."""
    return [(group, c) for group, template in pod_templates(rc) for c in template["spec"]["containers"]]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ray_token_authentication_is_on_everywhere(rendered, layout):
    docs = rendered[layout]
    existing = LAYOUTS[layout].get("rayAuth", {}).get("existingSecret")
    secret_name = existing or f"{RELEASE}-splitserve-ray-auth"
    for group, c in ray_containers(one(docs, "RayCluster")):
        env = env_of(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", (group, c["name"])
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": "auth_token"}
    created = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret_name]
    if existing:
        assert created == []
    else:
        (secret,) = created
        assert len(base64.b64decode(secret["data"]["auth_token"])) >= 32


def test_ray_token_from_a_value_and_ray_auth_off(chart):
    docs = render(chart, {"rayAuth": {"token": "ray-shared-token"}})
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert base64.b64decode(secret["data"]["auth_token"]) == b"ray-shared-token"
    docs = render(chart, {"rayAuth": {"enabled": False}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    for group, c in ray_containers(one(docs, "RayCluster")):
        assert "RAY_AUTH_MODE" not in env_of(c) and "RAY_AUTH_TOKEN" not in env_of(c)


def test_client_auth_token_reaches_only_the_server(rendered):
    def token_env(docs):
        return {(g, c["name"]): env_of(c).get("SPLITSERVE_AUTH_TOKEN")
                for g, c in ray_containers(one(docs, "RayCluster"))}

    assert not any(token_env(rendered["default"]).values())
    docs = rendered["auth-on"]
    envs = token_env(docs)
    assert envs.pop(("head", "splitserve"))["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-splitserve-auth",
                                                                            "key": "token"}
    assert not any(envs.values())
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == f"{RELEASE}-splitserve-auth")
    assert base64.b64decode(secret["data"]["token"]) == b"s3cret"
    docs = rendered["auth-existing-secrets"]
    assert token_env(docs)[("head", "splitserve")]["valueFrom"]["secretKeyRef"] == {"name": "api-auth", "key": "key"}
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_auth_without_a_token_source_is_refused(chart):
    with pytest.raises(helm.HelmRenderError, match="auth.existingSecret or auth.token"):
        chart.render({"auth": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------- model sources and scheduling


@pytest.mark.parametrize("layout,field,expected", [
    ("default", "persistentVolumeClaim", {"claimName": "splitserve-model", "readOnly": True}),
    ("hostpath-model", "hostPath", {"path": "/data/llama-3-8b", "type": "Directory"}),
    ("image-model", "image", {"reference": "registry.example/models/llama:3-8b", "pullPolicy": "IfNotPresent"}),
])
def test_model_sources(rendered, layout, field, expected):
    subpath = LAYOUTS[layout].get("model", {}).get("subPath")
    for group, template in pod_templates(one(rendered[layout], "RayCluster")):
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == "model")
        assert volume == {"name": "model", field: expected}
        for c in template["spec"]["containers"]:
            mounts = [m for m in c["volumeMounts"] if m["name"] == "model"]
            if c["name"] == "ray-head":
                assert mounts == []
                continue
            assert mounts == [{"name": "model", "mountPath": "/model", "readOnly": True,
                               **({"subPath": subpath} if subpath else {})}]


def test_scheduling_merges_global_and_group_settings(rendered):
    values = LAYOUTS["scheduling"]
    templates = dict(pod_templates(one(rendered["scheduling"], "RayCluster")))
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    head, prefill, decode = (templates[g]["spec"] for g in ("head", "prefill", "decode"))
    assert head["nodeSelector"] == {"pool": "llm", "zone": "a"}
    assert prefill["nodeSelector"] == {"pool": "llm", "zone": "b", "gpu": "h100"}
    assert decode["nodeSelector"] == {"pool": "llm", "zone": "a"}
    assert head["tolerations"] == values["tolerations"]
    assert prefill["tolerations"] == decode["tolerations"] == values["tolerations"] + [gpu_toleration]
    assert head["affinity"] == prefill["affinity"] == values["affinity"]
    assert decode["affinity"] == values["decode"]["affinity"]
    default = dict(pod_templates(one(rendered["default"], "RayCluster")))
    assert "nodeSelector" not in default["head"]["spec"] and "affinity" not in default["head"]["spec"]


# ---------------------------------------------------------------- values schema


@pytest.mark.parametrize("values,where", [
    ({"prefill": {"tp": 0}}, "/prefill/tp"),
    ({"decode": {"replicas": 0}}, "/decode/replicas"),
    ({"prefill": {"tp": "2"}}, "/prefill/tp"),
    ({"decode": {"tp": 1.5}}, "/decode/tp"),
    ({"replicas": 2}, "additional properties 'replicas'"),
    ({"prefill": {"pp": 2}}, "additional properties 'pp'"),
    ({"config": {"engine": {"blocksize": 16}}}, "additional properties 'blocksize'"),
    ({"config": {"dtype": "float64"}}, "/config/dtype"),
    ({"config": {"engine": {"gpu_memory_fraction": 1.5}}}, "/config/engine/gpu_memory_fraction"),
    ({"config": {"kv_transfer": {"transport": "rdma"}}}, "/config/kv_transfer/transport"),
    ({"prefill": {"spAlgorithm": "ulysses"}}, "/prefill/spAlgorithm"),
    ({"prefill": {"rayStartParams": {"num-cpus": 8}}}, "/prefill/rayStartParams/num-cpus"),
    ({"model": {"source": "nfs"}}, "/model/source"),
    ({"model": {"source": "hostPath"}}, "/model/path"),
    ({"model": {"source": "image"}}, "/model"),
    ({"model": {"source": "pvc", "claimName": ""}}, "/model"),
    ({"server": {"grpcPort": 70000}}, "/server/grpcPort"),
    ({"auth": {"enabled": "yes"}}, "/auth/enabled"),
    ({"metrics": {"serviceMonitor": {"enabled": True, "interval": "often"}}}, "/metrics/serviceMonitor/interval"),
])
def test_values_that_break_the_schema_are_rejected(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(info.value)


def test_autoscaling_lets_kuberay_add_pods_for_the_planners_instances(rendered):
    rc = one(rendered["autoscaling"], "RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    assert rc["spec"]["autoscalerOptions"] == {"upscalingMode": "Default", "idleTimeoutSeconds": 90}
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    bounds = {name: (g["minReplicas"], g["replicas"], g["maxReplicas"]) for name, g in groups.items()}
    assert bounds == {"prefill": (1, 1, 3), "decode": (1, 2, 6)}
    # New pods advertise their role, so a pending instance's placement group asks for a pod of that group.
    assert groups["prefill"]["rayStartParams"]["resources"] == "'{\"splitserve_prefill\": 2}'"
    config_map = one(rendered["autoscaling"], "ConfigMap")
    cfg = cluster_config.config_from_dict(yaml.safe_load(config_map["data"]["config.yaml"]))
    online = cfg.online_planner
    assert (online.min_prefill, online.max_prefill, online.min_decode, online.max_decode) == (1, 3, 1, 6)
    assert (online.ttft_s, online.tpot_s, online.interval_s) == (0.5, 0.05, 15)
    assert cfg.ray.autoscaler and cfg.ray.role_resources and cfg.fault_tolerance.max_restarts == 2
    # Without autoscaling the groups are fixed and no planner runs.
    fixed = one(rendered["default"], "RayCluster")
    assert all(g["minReplicas"] == g["replicas"] == g["maxReplicas"] for g in fixed["spec"]["workerGroupSpecs"])
    default_cfg = yaml.safe_load(one(rendered["default"], "ConfigMap")["data"]["config.yaml"])
    assert "placement" not in default_cfg and default_cfg["ray"]["autoscaler"] is False


@pytest.mark.parametrize("values,message", [
    ({"autoscaling": {"enabled": True, "prefill": {"minReplicas": 3, "maxReplicas": 2},
                      "decode": {"minReplicas": 1, "maxReplicas": 2}}}, "minReplicas (3) is above maxReplicas (2)"),
    ({"decode": {"replicas": 5}, "autoscaling": {"enabled": True, "prefill": {"minReplicas": 1, "maxReplicas": 2},
                                                 "decode": {"minReplicas": 1, "maxReplicas": 4}}},
     "decode.replicas (5) must lie within autoscaling.decode [1, 4]"),
])
def test_autoscaling_bounds_that_cannot_be_are_refused(chart, values, message):
    with pytest.raises(Exception, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_enums_match_the_cluster_config():
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]["properties"]
    assert tuple(config["dtype"]["enum"]) == cluster_config.DTYPES
    assert tuple(config["device"]["enum"]) == cluster_config.DEVICES
    assert tuple(config["engine"]["properties"]["tp_norm_method"]["enum"]) == cluster_config.TP_NORM_METHODS
    assert tuple(config["kv_transfer"]["properties"]["transport"]["enum"]) == cluster_config.TRANSPORTS
    assert tuple(config["kv_transfer"]["properties"]["mode"]["enum"]) == cluster_config.TRANSFER_MODES
    prefill = schema["properties"]["prefill"]["properties"]
    assert tuple(prefill["spAlgorithm"]["enum"]) == cluster_config.SP_ALGORITHMS
    assert tuple(config["routing"]["properties"]["policy"]["enum"]) == cluster_config.ROUTING_POLICIES
    assert set(config["routing"]["properties"]) == {f.name for f in cluster_config.fields(cluster_config.RoutingConfig)}
    assert tuple(config["engine"]["properties"]["backend"]["enum"]) == MODEL_BACKENDS
    assert tuple(config["engine"]["properties"]["attention_backend"]["enum"]) == ATTENTION_BACKENDS
    engine_keys = set(config["engine"]["properties"])
    assert engine_keys == {f.name for f in cluster_config.fields(cluster_config.EngineConfig)}
