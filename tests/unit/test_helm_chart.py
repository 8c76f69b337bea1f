"""The Helm chart, rendered offline by a real Helm engine (helm-python-sdk), validated against the
Kubernetes schemas (kubernetes-validate), KubeRay v1.7.0's RayService CRD and Ray's ServeDeploySchema,
and checked field by field where the CRD schema would accept anything."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
import yaml

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk not installed (part of the test extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "ringserve"
CRDS = Path(os.environ.get("RINGSERVE_KUBERAY_CRDS", ROOT.parent / "shared" / "vendor" / "kuberay-crds"))
K8S_VERSION = "1.30"
KEY = {"sha256": hashlib.sha256(b"secret-key").hexdigest(), "tenant": "acme", "admin": True}

VALUE_SETS = {
    "default": {},
    "external-redis": {"redis": {"external": {"url": "redis://:${REDIS_PASSWORD}@redis.prod:6379/2",
                                              "passwordSecret": {"name": "prod-redis", "key": "pw"}}},
                       "apiKeys": {"keys": [KEY]}},
    "4-gpus-3-groups": {"groups": {"count": 3, "sp": 4}, "worker": {"memoryPerGpu": "80Gi"},
                        "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "kps"}}}},
    "metrics-off": {"metrics": {"enabled": False}, "networkPolicy": {"enabled": False},
                    "apiKeys": {"existingSecret": "my-keys"}, "billing": {"redisUrl": "redis://billing:6379/0"}},
    "mtls-loadbalancer": {"serve": {"tls": {"enabled": True, "secretName": "rs-tls",
                                            "clientCA": {"secretName": "rs-client-ca"}},
                                    "grpcService": {"type": "LoadBalancer",
                                                    "loadBalancerSourceRanges": ["203.0.113.0/24"]}},
                          "networkPolicy": {"monitoring": {"namespace": "monitoring"}}},
}


def render(values: dict) -> list[dict]:
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(copy.deepcopy(values), name="rs", namespace="ml")
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request):
    return request.param, VALUE_SETS[request.param], render(VALUE_SETS[request.param])


def test_lint_is_clean():
    report = helm_python.lint(str(CHART), strict=True, kube_version="v1.30.0")
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, errors


def test_core_objects_validate_against_kubernetes_schemas(rendered):
    _, _, docs = rendered
    core = [d for d in docs if d["apiVersion"] in ("v1", "apps/v1", "networking.k8s.io/v1")]
    assert core
    for d in core:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    # the pod templates inside the RayService are core PodTemplateSpecs: validate them as Pods
    rs = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    for tpl in [rs["headGroupSpec"]["template"]] + [w["template"] for w in rs["workerGroupSpecs"]]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **tpl["metadata"]}, "spec": tpl["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def rayservice_crd():
    """KubeRay's RayService v1 schema and a validator of it, read once for every value set (the CRD is
    ~1 MB of YAML: loading and meta-checking it per case cost ~6 s each)."""
    jsonschema = pytest.importorskip("jsonschema")
    path = CRDS / "ray.io_rayservices.yaml"
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (shared/vendor/kuberay-crds is not checked out here; "
                    "point RINGSERVE_KUBERAY_CRDS at a folder holding ray.io_rayservices.yaml)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return schema, cls(schema)


def test_rayservice_validates_against_the_kuberay_crd(rendered, rayservice_crd):
    import jsonschema

    schema, validator = rayservice_crd
    _, _, docs = rendered
    (rs,) = by_kind(docs, "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    validator.validate(rs)
    unknown = list(_unknown_fields(rs, schema))
    assert not unknown, f"fields the CRD does not define (it would accept and ignore them): {unknown}"
    broken = copy.deepcopy(rs)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "three"
    with pytest.raises(jsonschema.ValidationError):  # the schema does bite
        validator.validate(broken)


def _unknown_fields(obj, schema, path="$"):
    """Keys the schema does not define, where it defines properties (the CRD itself would let them
    through silently, as it does not set additionalProperties: false)."""
    if isinstance(obj, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for k, v in obj.items():
            if k not in schema["properties"]:
                yield f"{path}.{k}"
            else:
                yield from _unknown_fields(v, schema["properties"][k], f"{path}.{k}")
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            yield from _unknown_fields(v, schema["items"], f"{path}[{i}]")


def test_serve_config_parses_with_ray_and_builds_a_ringserve_config(rendered):
    from ray.serve.schema import ServeDeploySchema

    from ringserve.cluster.config import ServeConfig

    name, values, docs = rendered
    rs = by_kind(docs, "RayService")[0]["spec"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(rs["serveConfigV2"]))
    (app,) = serve.applications
    assert app.import_path == "ringserve.cluster.serve_app:app_builder"
    assert serve.grpc_options.port == values.get("serve", {}).get("grpcPort", 9000)
    assert "ringserve.proto.ringserve.v1.ringserve_pb2_grpc.add_RingServeServicer_to_server" in \
        serve.grpc_options.grpc_servicer_functions
    cfg = ServeConfig.from_dict(app.args)  # the app builder's own parser accepts every key
    groups = values.get("groups", {})
    assert cfg.groups == groups.get("count", 2) and cfg.group.sp == groups.get("sp", 2)
    assert cfg.group.num_gpus_per_rank == 1 and cfg.group.strategy == "STRICT_PACK"
    assert cfg.api_keys_file == "/etc/ringserve/api-keys/api-keys.yaml"
    assert cfg.billing.retention["standard"]["redis"] == 0.25
    if name == "external-redis":
        assert cfg.redis_url.endswith("@redis.prod:6379/2")
    else:
        assert "rs-ringserve-redis:6379" in app.args["redis_url"]
    if name == "metrics-off":
        assert cfg.billing_redis_url == "redis://billing:6379/0"


def test_the_fields_the_chart_relies_on(rendered):
    name, values, docs = rendered
    groups = values.get("groups", {})
    count, sp = groups.get("count", 2), groups.get("sp", 2)
    rs = by_kind(docs, "RayService")[0]["spec"]
    head = rs["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (workers,) = rs["rayClusterConfig"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == count
    assert workers["rayStartParams"]["num-gpus"] == str(sp)
    wc = workers["template"]["spec"]["containers"][0]
    assert wc["resources"]["limits"]["nvidia.com/gpu"] == str(sp) == wc["resources"]["requests"]["nvidia.com/gpu"]
    assert wc["resources"]["limits"]["memory"] == wc["resources"]["requests"]["memory"]
    # KubeRay >= 1.6 puts every head port named serve or serve-* on the serve Service it generates
    assert "serveService" not in rs
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["serve-grpc"] == 9000 and head_ports["serve"] == 8000
    for spec in (head["template"]["spec"], workers["template"]["spec"]):
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        c = spec["containers"][0]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["image"] == "ghcr.io/ringserve/ringserve:0.1.0"
        env = {e["name"]: e for e in c.get("env", [])}
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/etc/ringserve/api-keys" in mounts and "/dev/shm" in mounts
        named = {p["name"] for p in c["ports"]}
        assert "serve-grpc" in named
        assert ("metrics" in named) == (name != "metrics-off")
        if name == "external-redis":
            assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "prod-redis", "key": "pw"}
        else:
            assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "rs-ringserve-redis"
    metrics_port = "metrics-export-port" in head["rayStartParams"]
    assert metrics_port == (name != "metrics-off")
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    keys_volume = next(v for v in head["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    if name == "metrics-off":
        assert keys_volume["secret"]["secretName"] == "my-keys" and "rs-ringserve-api-keys" not in secrets
    else:
        keys = yaml.safe_load(secrets["rs-ringserve-api-keys"]["stringData"]["api-keys.yaml"])
        assert keys == ([KEY] if name == "external-redis" else [])
        from ringserve.cluster.config import load_api_keys  # the Gateway reads this very format
        p = Path(__import__("tempfile").mkdtemp()) / "k.yaml"
        p.write_text(secrets["rs-ringserve-api-keys"]["stringData"]["api-keys.yaml"])
        assert [k.tenant for k in load_api_keys(str(p))] == [k["tenant"] for k in keys]
    monitors = by_kind(docs, "PodMonitor")
    assert bool(monitors) == (name == "4-gpus-3-groups")
    if monitors:
        assert monitors[0]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        assert monitors[0]["metadata"]["labels"]["release"] == "kps"


def test_redis_statefulset_aof_pvc_and_network_policy(rendered):
    name, _, docs = rendered
    sts = by_kind(docs, "StatefulSet")
    redis_policies = [p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == "rs-ringserve-redis"]
    if name == "external-redis":
        assert not sts and not redis_policies and "rs-ringserve-redis" not in \
            {s["metadata"]["name"] for s in by_kind(docs, "Secret")}
        return
    (redis,) = sts
    conf = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "rs-ringserve-redis-config")
    assert "appendonly yes" in conf["data"]["redis.conf"]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    (secret,) = [s for s in by_kind(docs, "Secret") if s["metadata"]["name"] == "rs-ringserve-redis"]
    assert len(secret["data"]["password"]) >= 40  # base64 of 32 random characters
    if name == "metrics-off":  # networkPolicy.enabled false
        assert not by_kind(docs, "NetworkPolicy")
        return
    (pol,) = redis_policies
    assert pol["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    (rule,) = pol["spec"]["ingress"]
    selector = rule["from"][0]["podSelector"]["matchLabels"]
    rs = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    for tpl in [rs["headGroupSpec"]["template"]] + [w["template"] for w in rs["workerGroupSpecs"]]:
        assert selector.items() <= tpl["metadata"]["labels"].items()  # the Ray pods are let in
    assert not selector.items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


@pytest.mark.parametrize("values, message", [
    ({"apiKeys": {"keys": [{"sha256": "plaintext-key", "tenant": "acme"}]}}, "/apiKeys/keys/0/sha256"),
    ({"groups": {"count": 0}}, "/groups/count"),
    ({"groups": {"sp": "two"}}, "/groups/sp"),
    ({"billing": {"currency": "dollars"}}, "/billing/currency"),
    ({"redis": {"appendfsync": "no"}}, "/redis/appendfsync"),
    ({"gropus": {"count": 2}}, "'gropus' not allowed"),  # a typo is an error, not a silent default
])
def test_bad_values_fail_to_render_with_a_clear_message(values, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render(values)


def test_dockerfile_matches_the_chart_and_the_package():
    import re
    import tomllib

    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M).group(1)
    assert ray_version == values["rayVersion"]  # the image's Ray is the one KubeRay is told about
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    copied = set(re.findall(r"^COPY --chown=\S+ (\S+) \./\S+$", text, re.M))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert dirs <= copied, f"package folders the image does not copy: {dirs - copied}"
    assert all((ROOT / c).exists() for c in copied)
    user = re.findall(r"^USER (\S+)$", text, re.M)[-1]
    assert user.split(":")[0] == str(values["podSecurityContext"]["runAsUser"])  # runs as the chart expects
    assert values["image"]["repository"] and f"{values['serve']['grpcPort']}" in text.split("EXPOSE")[1]


def test_example_configs_load_and_render():
    from ringserve.cluster.config import ServeConfig, hash_key

    cfg = ServeConfig.from_yaml(str(ROOT / "deploy" / "examples" / "cluster.yaml"))
    assert cfg.group.sp == 2 and cfg.billing.currency == "USD" and cfg.api_keys[0].sha256 == hash_key("password")
    values = yaml.safe_load((ROOT / "deploy" / "examples" / "values-production.yaml").read_text())
    docs = render(values)
    (rs,) = by_kind(docs, "RayService")
    (workers,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert workers["replicas"] == 4 and workers["rayStartParams"]["num-gpus"] == "8"
    assert not by_kind(docs, "StatefulSet") and by_kind(docs, "PodMonitor")
    for d in docs:
        if d["apiVersion"] in ("v1", "apps/v1", "networking.k8s.io/v1"):
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)


# --- exposure: the head Service, the gRPC API's Service, NetworkPolicies ---------------------------

PRODUCTION = ROOT / "deploy" / "examples" / "values-production.yaml"
RAY_INTERNAL_PORTS = {"dashboard", "gcs-server", "client", "metrics", "serve"}  # head ports never exposed


def exposure_value_sets():
    return {**VALUE_SETS, "production": yaml.safe_load(PRODUCTION.read_text()),
            "plaintext-nodeport": {"serve": {"grpcService": {"type": "NodePort", "allowPlaintext": True}}}}


def head_pod(docs: list[dict]) -> dict:
    """The head pod as KubeRay makes it: the template plus the labels KubeRay adds (ray.io/serve is
    "true" once the Serve proxy is ready)."""
    tpl = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    labels = {**tpl["metadata"]["labels"], "ray.io/node-type": "head", "ray.io/cluster": "rs-ringserve-x7k2p",
              "ray.io/serve": "true"}
    return {"labels": labels, "ports": {p["name"]: p["containerPort"] for p in tpl["spec"]["containers"][0]["ports"]}}


def worker_pod(docs: list[dict]) -> dict:
    tpl = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    labels = {**tpl["metadata"]["labels"], "ray.io/node-type": "worker", "ray.io/cluster": "rs-ringserve-x7k2p"}
    return {"labels": labels, "ports": {p["name"]: p["containerPort"] for p in tpl["spec"]["containers"][0]["ports"]}}


def selects(selector: dict | None, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels + matchExpressions); {} selects everything."""
    selector = selector or {}
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def admitted(policies: list[dict], pod: dict, port: int, source: dict | None) -> bool:
    """Whether the NetworkPolicies let `source` open TCP `port` on `pod` (in the release's namespace
    "ml"). source: {"namespace": ..., "labels": {...}} for a pod, None for a client outside the cluster."""
    mine = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
            and selects(p["spec"]["podSelector"], pod["labels"])]
    if not mine:
        return True  # no policy selects the pod: everything is let in

    def port_ok(rule) -> bool:
        if "ports" not in rule:
            return True
        for p in rule["ports"]:
            want = p.get("port")
            if p.get("protocol", "TCP") == "TCP" and (want is None or want == port or pod["ports"].get(want) == port):
                return True
        return False

    def peer_ok(peer) -> bool:
        if "ipBlock" in peer:
            return source is None
        if source is None:
            return False
        ns_labels = {"kubernetes.io/metadata.name": source["namespace"]}
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], ns_labels):
                return False
        elif source["namespace"] != "ml":
            return False
        return "podSelector" not in peer or selects(peer["podSelector"], source["labels"])

    return any(port_ok(rule) and (not rule.get("from") or any(peer_ok(x) for x in rule["from"]))
               for p in mine for rule in p["spec"].get("ingress", []))


def api_port(values: dict) -> tuple[str, int]:
    serve = values.get("serve", {})
    tls = serve.get("tls", {})
    return ("grpc-tls", tls.get("port", 9443)) if tls.get("enabled") else ("serve-grpc", serve.get("grpcPort", 9000))


@pytest.mark.parametrize("name", list(exposure_value_sets()))
def test_nothing_exposed_outside_the_cluster_reaches_the_heads_ray_ports(name):
    """Rendered with production values (and the others): the head Service KubeRay makes is ClusterIP,
    no serveService override changes that, and every LoadBalancer / NodePort Service that selects the
    head targets the gRPC API port only — never the dashboard, GCS, Ray client, metrics or HTTP port."""
    values = exposure_value_sets()[name]
    docs = render(values)
    rs = by_kind(docs, "RayService")[0]["spec"]
    assert rs["rayClusterConfig"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert "serveService" not in rs  # KubeRay's serve Service takes the head's ClusterIP type
    head = head_pod(docs)
    port_name, port = api_port(values)
    exposed = [s for s in by_kind(docs, "Service")
               if s["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")]
    for svc in exposed:
        if not selects({"matchLabels": svc["spec"]["selector"]}, head["labels"]):
            continue
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            named = target if isinstance(target, str) else \
                next((n for n, v in head["ports"].items() if v == target), None)
            assert named not in RAY_INTERNAL_PORTS, (svc["metadata"]["name"], p)
            assert named == port_name and head["ports"][named] == port, (svc["metadata"]["name"], p)
    (api,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "rs-ringserve-grpc"]
    assert selects({"matchLabels": api["spec"]["selector"]}, head["labels"])
    assert not selects({"matchLabels": api["spec"]["selector"]}, {**head["labels"], "ray.io/serve": "false"})
    assert not selects({"matchLabels": api["spec"]["selector"]}, worker_pod(docs)["labels"])
    if name == "production":
        assert api["spec"]["type"] == "LoadBalancer" and api["spec"]["ports"][0]["targetPort"] == "grpc-tls"
        assert api["spec"]["ports"][0]["port"] == 443 and exposed == [api]


@pytest.mark.parametrize("name", ["default", "production", "mtls-loadbalancer"])
def test_network_policies_admit_only_the_api_from_outside_the_release(name):
    values = exposure_value_sets()[name]
    docs = render(values)
    policies = by_kind(docs, "NetworkPolicy")
    for pol in policies:
        kubernetes_validate.validate(pol, K8S_VERSION, strict=True)
    head, worker = head_pod(docs), worker_pod(docs)
    _, port = api_port(values)
    internal = {n: head["ports"][n] for n in RAY_INTERNAL_PORTS if n in head["ports"]}
    internal["serve-grpc"] = head["ports"]["serve-grpc"]
    if port == internal["serve-grpc"]:  # without TLS Serve's plaintext gRPC port is the API
        del internal["serve-grpc"]
    assert {"dashboard", "gcs-server", "client", "metrics", "serve"} <= set(internal)
    raylet = 52365  # a Ray port the chart does not name (dashboard agent): closed to outsiders too
    outsiders = {"internet": None, "another namespace": {"namespace": "apps", "labels": {"app": "x"}},
                 "another app in the namespace": {"namespace": "ml", "labels": {"app.kubernetes.io/name": "web"}},
                 "this release's redis": {"namespace": "ml", "labels": {"app.kubernetes.io/name": "ringserve",
                                                                        "app.kubernetes.io/instance": "rs",
                                                                        "app.kubernetes.io/component": "redis"}}}
    for who, src in outsiders.items():
        assert admitted(policies, head, port, src), who
        for pname, number in list(internal.items()) + [("raylet", raylet)]:
            assert not admitted(policies, head, number, src), (who, pname)
        assert not admitted(policies, worker, port, src) and not admitted(policies, worker, 9000, src), who
    release = {"namespace": "ml", "labels": worker["labels"]}
    for number in list(internal.values()) + [port, raylet, 6379]:
        assert admitted(policies, head, number, release) and admitted(policies, worker, number,
                                                                      {"namespace": "ml", "labels": head["labels"]})
    operator = {"namespace": "kuberay", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert admitted(policies, head, internal["dashboard"], operator) and admitted(policies, head, internal["serve"],
                                                                                  operator)
    assert not admitted(policies, head, internal["gcs-server"], operator)
    monitoring = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
    scrapes = name != "default"  # the others name a monitoring namespace
    assert admitted(policies, head, internal["metrics"], monitoring) == scrapes
    assert admitted(policies, worker, worker["ports"]["metrics"], monitoring) == scrapes
    assert not admitted(policies, head, internal["dashboard"], monitoring)
    # the evaluator itself bites: with the policies gone, everything is open
    assert admitted([], head, internal["dashboard"], None)


def test_grpc_sources_can_be_narrowed():
    docs = render({"networkPolicy": {"grpcFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}},
                                                  {"namespaceSelector": {"matchLabels": {"team": "apps"}}}]}})
    policies = by_kind(docs, "NetworkPolicy")
    for pol in policies:
        kubernetes_validate.validate(pol, K8S_VERSION, strict=True)
    head = head_pod(docs)
    assert admitted(policies, head, 9000, None)  # the listed CIDR (the evaluator treats ipBlock as "outside")
    assert not admitted(policies, head, 9000, {"namespace": "other", "labels": {}})


def test_tls_values_reach_serves_proxy_on_the_head():
    """With serve.tls the head's environment is what cluster/tls.py reads (parsed by the same
    function the proxy runs), the Secret is mounted where it points, the ServeConfig agrees, and
    every Ray pod's proxy gets the max message size."""
    from ray.serve.schema import ServeDeploySchema

    from ringserve.cluster import tls
    from ringserve.cluster.config import ServeConfig

    values = VALUE_SETS["mtls-loadbalancer"]
    docs = render(values)
    rs = by_kind(docs, "RayService")[0]["spec"]
    head_spec = rs["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (c,) = head_spec["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    cfg_tls = tls.from_env(env)
    serve = ServeDeploySchema.model_validate(yaml.safe_load(rs["serveConfigV2"]))
    cfg = ServeConfig.from_dict(serve.applications[0].args)
    assert cfg_tls == cfg.tls and cfg_tls.port == 9443 and cfg_tls.client_ca_file == "/etc/ringserve/client-ca/ca.crt"
    assert tls.HOOK in serve.grpc_options.grpc_servicer_functions
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in head_spec["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "rs-tls"
    assert volumes["client-ca"]["secret"]["secretName"] == "rs-client-ca"
    for path in (cfg_tls.cert_file, cfg_tls.key_file, cfg_tls.client_ca_file):
        vol = next(n for n, m in mounts.items() if path.startswith(m + "/"))
        assert path.rsplit("/", 1)[1] in {i["path"] for i in volumes[vol]["secret"]["items"]}
    assert {"name": "grpc-tls", "containerPort": 9443} in c["ports"]
    (worker,) = rs["rayClusterConfig"]["workerGroupSpecs"]
    wenv = {e["name"]: e.get("value") for e in worker["template"]["spec"]["containers"][0]["env"]}
    assert tls.from_env(wenv) is None  # the API is on the head; workers' proxies stay internal
    for e in (env, wenv):
        assert int(e[tls.ENV_MAX_MESSAGE]) == cfg.max_receive_bytes == 64 << 20
    plain = ServeConfig.from_dict(ServeDeploySchema.model_validate(yaml.safe_load(
        by_kind(render({}), "RayService")[0]["spec"]["serveConfigV2"])).applications[0].args)
    assert plain.tls is None and plain.plaintext_peers == "any"


@pytest.mark.parametrize("values, message", [
    ({"serve": {"serviceType": "LoadBalancer"}}, "serve.serviceType was removed"),
    ({"serve": {"grpcService": {"type": "LoadBalancer"}}}, "would put plaintext gRPC"),
    ({"serve": {"grpcService": {"type": "NodePort"}}}, "would put plaintext gRPC"),
    ({"serve": {"tls": {"enabled": True}}}, "needs serve.tls.secretName"),
    ({"serve": {"tls": {"clientCA": {"secretName": "ca"}}}}, "clientCA is for TLS"),
    ({"serve": {"tls": {"enabled": True, "secretName": "t", "port": 9000}}}, "must differ"),
    ({"networkPolicy": {"monitoring": {"ports": ["Metrics!"]}}}, "/networkPolicy/monitoring/ports/0"),
])
def test_unsafe_exposure_values_fail_with_the_fix(values, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render(values)
