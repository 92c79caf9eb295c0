"""The Helm chart, rendered offline (no cluster here) for several value sets; every object is checked
against the Kubernetes schemas of a pinned version, and what matters is asserted."""

from __future__ import annotations

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.timeout(120)
K8S = "1.31.0"
CRDS = {"ServiceMonitor", "RayCluster"}  # not in the core schemas: checked by hand below


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load("helm/beluga")
    out = chart.render(values, name="rel", namespace="ai")
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    for d in docs:
        if d["kind"] not in CRDS:
            kubernetes_validate.validate(d, K8S, strict=True)
    return docs


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def container(obj) -> dict:
    spec = obj["spec"]["template"]["spec"]
    return spec["containers"][0]


def volume(obj, name) -> dict:
    return next(v for v in obj["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


CASES = {
    "defaults": {},
    "devdax": {"pool": {"kind": "devdax", "devdax": {"path": "/dev/dax1.0"}}},
    "memory": {"pool": {"kind": "memory", "coherence": "coherent"}, "workers": {"gpu": {"enabled": False}}},
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}}},
    "apikeys": {"apiKeys": {"enabled": True, "keys": {"sk-a": "acme"}}},
    "ray": {"ray": {"enabled": True}},
    "daemonset": {"workers": {"kind": "DaemonSet"}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_renders_and_validates(case):
    docs = render(CASES[case])
    meta = kinds(docs, "Deployment")
    router = next(d for d in meta if d["metadata"]["name"].endswith("-router"))
    server = next(d for d in meta if d["metadata"]["name"].endswith("-metadata"))
    assert server["spec"]["replicas"] == 1 and server["spec"]["strategy"]["type"] == "Recreate"
    assert container(server)["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container(router)["readinessProbe"]["httpGet"]["path"] == "/health"
    args = container(router)["args"]
    if case == "ray":
        assert kinds(docs, "RayCluster") and "ray" in args and not kinds(docs, "StatefulSet")
        return
    workers = (kinds(docs, "StatefulSet") + kinds(docs, "DaemonSet"))[0]
    headless = next(d for d in kinds(docs, "Service") if d["metadata"]["name"] == workers["metadata"]["name"])
    assert headless["spec"]["clusterIP"] == "None"
    # the router's DNS discovery points at the workers' headless service
    assert args[args.index("--dns-name") + 1] == f"{headless['metadata']['name']}.ai.svc.cluster.local"
    assert container(workers)["readinessProbe"]["httpGet"]["path"] == "/health"
    # the pool reaches the workers and the metadata server, at the path both are told to use
    for obj in (workers, server):
        mount = next(m for m in container(obj)["volumeMounts"] if m["name"] == "pool")
        pool_arg = container(obj)["args"][container(obj)["args"].index("--path" if obj is server else "--pool") + 1]
        assert pool_arg.startswith(mount["mountPath"])
        v = volume(obj, "pool")["hostPath"]
        if CASES[case].get("pool", {}).get("kind") == "memory":
            assert v["type"] == "DirectoryOrCreate" and v["path"] == "/dev/shm/beluga"
        else:
            assert v["type"] == "CharDevice" and "IPC_LOCK" in container(obj)["securityContext"]["capabilities"]["add"]
    if case == "devdax":
        assert volume(workers, "pool")["hostPath"]["path"] == "/dev/dax1.0"
    if case == "servicemonitor":
        assert kinds(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["path"] == "/metrics"
        assert any("beluga.json" in d.get("data", {}) for d in kinds(docs, "ConfigMap"))
    if case == "apikeys":
        secret = kinds(docs, "Secret")[0]
        assert "sk-a acme" in secret["stringData"]["keys"] and "--api-keys-file" in args
    gpu = container(workers)["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu is None) == (case == "memory")


@pytest.mark.parametrize("values,message", [
    ({"workers": {"replicas": -1}}, "/workers/replicas"),
    ({"pool": {"kind": "nvme"}}, "/pool/kind"),
    ({"router": {"policy": "sticky"}}, "/router/policy"),
])
def test_bad_values_fail_with_the_schema_message(values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        helm.Chart.load("helm/beluga").render(values, name="rel", namespace="ai")
