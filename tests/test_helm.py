"""The Helm chart, rendered offline (no cluster here) for several value sets; every object is checked
against the Kubernetes schemas of a pinned version, and what matters is asserted."""

from __future__ import annotations

import base64
import json
import os
import shlex

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.timeout(120)
K8S = "1.31.0"
CRDS = {"ServiceMonitor", "RayCluster"}  # not in the core schemas: checked by hand below
DEFAULTS = helm.Chart.load("helm/beluga").values


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


def named(docs, kind, suffix) -> dict:
    return next(d for d in kinds(docs, kind) if d["metadata"]["name"].endswith(suffix))


def container(obj) -> dict:
    spec = obj["spec"]["template"]["spec"]
    return spec["containers"][0]


def volume(obj, name) -> dict:
    return next(v for v in obj["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def pod_templates(docs) -> list[dict]:
    """Every pod template the chart renders, the RayCluster's included."""
    pods = [d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
    for ray in kinds(docs, "RayCluster"):
        pods += [ray["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in ray["spec"]["workerGroupSpecs"]]
    return pods


def component(pod) -> str:
    return pod["metadata"]["labels"]["app.kubernetes.io/component"]


def maps_pool(pod) -> bool:
    return component(pod) in ("metadata", "worker", "ray")


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


CASES = {
    "defaults": {},
    "devdax": {"pool": {"kind": "devdax", "devdax": {"path": "/dev/dax1.0", "resourceName": "example.com/dax"}}},
    "privileged": {"pool": {"devdax": {"resourceName": "", "privileged": True}}},
    "memory": {"pool": {"kind": "memory", "coherence": "coherent"}, "workers": {"gpu": {"enabled": False}}},
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}}},
    "apikeys": {"apiKeys": {"enabled": True, "keys": {"sk-a": "acme"}}},
    "ray": {"ray": {"enabled": True}},
    "daemonset": {"workers": {"kind": "DaemonSet"}},
    "nonroot": {"security": {"poolPodsRunAsRoot": False}},
    "token": {"pool": {"token": {"existingSecret": "my-pool-token"}, "coherence": "simulated"}},
    "metrics": {"networkPolicy": {"metricsFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}},
    "nopolicy": {"networkPolicy": {"enabled": False}},
}


def values(case) -> dict:
    return merge(DEFAULTS, CASES[case])


@pytest.mark.parametrize("case", list(CASES))
def test_renders_and_validates(case):
    docs = render(CASES[case])
    v = values(case)
    router, server = named(docs, "Deployment", "-router"), named(docs, "Deployment", "-metadata")
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
        c = container(obj)
        pool_arg = flag(c["args"], "--path" if obj is server else "--pool")
        mount = next((m for m in c["volumeMounts"] if m["name"] == "pool"), None)
        if v["pool"]["kind"] == "memory":
            assert pool_arg.startswith(mount["mountPath"] + "/")
            assert volume(obj, "pool")["hostPath"] == {"path": "/dev/shm/beluga", "type": "DirectoryOrCreate"}
        elif case == "privileged":  # the documented fallback: the node through a hostPath
            assert pool_arg == mount["mountPath"] == v["pool"]["devdax"]["path"]
            assert volume(obj, "pool")["hostPath"] == {"path": pool_arg, "type": "CharDevice"}
            assert c["securityContext"]["privileged"] is True
        else:  # the device plugin hands the node over at its own path: no hostPath
            assert pool_arg == v["pool"]["devdax"]["path"] and mount is None
            assert c["resources"]["limits"][v["pool"]["devdax"]["resourceName"]] == 1
    if case == "devdax":
        assert flag(container(workers)["args"], "--pool") == "/dev/dax1.0"
    if case == "servicemonitor":
        assert kinds(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["path"] == "/metrics"
        assert any("beluga.json" in d.get("data", {}) for d in kinds(docs, "ConfigMap"))
    if case == "apikeys":
        secret = named(docs, "Secret", "-api-keys")
        assert "sk-a acme" in secret["stringData"]["keys"] and "--api-keys-file" in args
    gpu = container(workers)["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu is None) == (case == "memory")


def token_secret(pod, c, token_file: str) -> str:
    """The Secret a container reads `token_file` from, checking that it is mounted read-only, owner and
    group read only, with the token under that name."""
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == os.path.dirname(token_file))
    assert mount["readOnly"] is True
    secret = next(vol for vol in pod["spec"]["volumes"] if vol["name"] == mount["name"])["secret"]
    assert secret["defaultMode"] in (0o400, 0o440)
    assert {"key": "token", "path": os.path.basename(token_file)} in secret["items"]
    return secret["secretName"]


def engine_connectors(docs) -> list[tuple[dict, dict, dict]]:
    """(pod, container, kv_connector_extra_config) of every engine the chart starts."""
    out = []
    for pod in pod_templates(docs):
        for c in pod["spec"]["containers"]:
            if component(pod) == "worker":  # `beluga worker`: the pool and its port beside --connector-extra
                extra = json.loads(flag(c["args"], "--connector-extra"))
                assert not {"pool", "tcp_port"} & extra.keys()  # the CLI passes those: no duplicates
                extra |= {"pool": flag(c["args"], "--pool"), "tcp_port": int(flag(c["args"], "--pool-tcp-port"))}
                out.append((pod, c, extra))
            elif "command" in c:  # the Ray head: `beluga serve` hands one kv-transfer-config to every engine
                serve = shlex.split(c["command"][-1].split("&&", 1)[1])
                kv = json.loads(flag(serve, "--kv-transfer-config"))
                assert kv["kv_connector"] == "BelugaConnector"
                out.append((pod, c, kv["kv_connector_extra_config"]))
    return out


@pytest.mark.parametrize("case", ["defaults", "devdax", "memory", "ray", "daemonset", "token", "privileged"])
def test_server_and_workers_agree(case):
    """One coherence mode for the metadata server and every engine; the engines call it over TCP at its
    Service, with the token from the Secret the server reads too; the server serves TCP only."""
    docs = render(CASES[case])
    v = values(case)
    coherence = v["pool"]["coherence"]
    server = named(docs, "Deployment", "-metadata")
    s_pod, s_c = server["spec"]["template"], container(server)
    s_args = s_c["args"]
    service = named(docs, "Service", "-metadata")
    rpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "rpc")
    assert flag(s_args, "--coherence") == coherence
    assert flag(s_args, "--transports") == "tcp"  # no shared-memory RPC: its doorbell is in each pod's /dev/shm
    assert flag(s_args, "--tcp-host") == "0.0.0.0" and int(flag(s_args, "--tcp-port")) == rpc_port
    secret_name = token_secret(s_pod, s_c, flag(s_args, "--token-file"))
    settings = named(docs, "ConfigMap", "-settings")["data"]
    assert settings["BELUGA_POOL_COHERENCE"] == coherence

    engines = engine_connectors(docs)
    assert engines and len(engines) == 1  # one template: every replica the same
    for pod, c, conn in engines:
        assert conn["coherence"] == coherence
        assert conn["transport"] == "tcp"
        assert conn["tcp_host"] == f"{service['metadata']['name']}.ai.svc.cluster.local"
        assert conn["tcp_port"] == rpc_port
        assert conn["pool"] == flag(s_args, "--path")
        assert token_secret(pod, c, conn["token_file"]) == secret_name
    # every Ray pod can host engines: each holds the same token
    for pod in pod_templates(docs):
        if component(pod) == "ray":
            assert token_secret(pod, pod["spec"]["containers"][0], engines[0][2]["token_file"]) == secret_name

    generated = [d for d in kinds(docs, "Secret") if d["metadata"]["name"] == secret_name]
    if v["pool"]["token"]["existingSecret"]:
        assert secret_name == v["pool"]["token"]["existingSecret"] and not generated
    else:
        assert len(base64.b64decode(generated[0]["data"]["token"])) >= 32


def test_generated_token_is_random():
    tokens = {named(render({}), "Secret", "-pool-token")["data"]["token"] for _ in range(2)}
    assert len(tokens) == 2  # (`lookup` keeps the cluster's on upgrade; offline it finds none)


def effective(pod_sc: dict, c_sc: dict, key: str):
    return c_sc.get(key, pod_sc.get(key))


@pytest.mark.parametrize("case", ["defaults", "memory", "ray", "daemonset", "nonroot", "privileged", "apikeys"])
def test_security_contexts(case):
    docs = render(CASES[case])
    home = named(docs, "ConfigMap", "-settings")["data"]["HOME"]
    pods = pod_templates(docs)
    assert {component(p) for p in pods} >= {"router", "metadata"}
    for pod in pods:
        spec = pod["spec"]
        pod_sc = spec["securityContext"]
        empty_dirs = {vol["name"] for vol in spec["volumes"] if "emptyDir" in vol}
        for vol in spec["volumes"]:
            if "secret" in vol:
                assert vol["secret"]["defaultMode"] in (0o400, 0o440)
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert effective(pod_sc, sc, "seccompProfile") == {"type": "RuntimeDefault"}
            assert sc["readOnlyRootFilesystem"] is True
            # what is written goes to emptyDirs: /tmp, and HOME for the caches
            writable = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty_dirs}
            assert {"/tmp", home} <= writable
            if case == "privileged" and maps_pool(pod):  # the documented fallback
                assert sc["privileged"] is True and "allowPrivilegeEscalation" not in sc
            else:
                assert "privileged" not in sc and sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert sc["capabilities"].get("add", []) == (["IPC_LOCK"] if maps_pool(pod) else [])
            # non-root, except the pods that map a node's root-owned device or tmpfs folder (README)
            as_root = maps_pool(pod) and case != "nonroot"
            assert effective(pod_sc, sc, "runAsNonRoot") is (not as_root)
            assert (effective(pod_sc, sc, "runAsUser") == 0) is as_root


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}  # no matchExpressions here
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def peers_select(peers: list[dict], labels: dict) -> bool:
    """Whether a pod of this namespace with these labels is one of the peers."""
    return any("podSelector" in p and "namespaceSelector" not in p and "ipBlock" not in p
               and selects(p["podSelector"], labels) for p in peers)


def allowed(policy: dict, labels: dict, port) -> bool:
    """Whether a pod of this namespace with these labels may reach `port` of the pods of the policy."""
    return any((not rule.get("ports") or any(p["port"] == port for p in rule["ports"]))
               and ("from" not in rule or peers_select(rule["from"], labels))
               for rule in policy["spec"].get("ingress", []))


@pytest.mark.parametrize("case", ["defaults", "ray", "metrics", "nopolicy", "daemonset"])
def test_network_policies(case):
    docs = render(CASES[case])
    v = values(case)
    policies = kinds(docs, "NetworkPolicy")
    if case == "nopolicy":
        assert not policies
        return
    labels = {component(p): p["metadata"]["labels"] for p in pod_templates(docs)}
    engines = "ray" if case == "ray" else "worker"
    stranger = dict(labels["router"], **{"app.kubernetes.io/component": "someone-else"})

    def policy_for(comp):
        (p,) = [p for p in policies if selects(p["spec"]["podSelector"], labels[comp])]
        assert p["spec"]["policyTypes"] == ["Ingress"]
        return p

    # the metadata server: the RPC from the engines only; the admin port from adminFrom + metricsFrom
    meta = policy_for("metadata")
    assert allowed(meta, labels[engines], "rpc")
    assert not allowed(meta, labels["router"], "rpc") and not allowed(meta, stranger, "rpc")
    for rule in meta["spec"]["ingress"]:
        assert all(p["port"] in ("rpc", "admin") for p in rule["ports"])
        if any(p["port"] == "rpc" for p in rule["ports"]):
            assert [p["port"] for p in rule["ports"]] == ["rpc"]
            assert all(list(peer) == ["podSelector"] for peer in rule["from"])  # this namespace only
    admin = [r for r in meta["spec"]["ingress"] if r["ports"] == [{"port": "admin", "protocol": "TCP"}]]
    assert admin[0]["from"] == v["networkPolicy"]["adminFrom"] + v["networkPolicy"]["metricsFrom"]
    # the named ports are the server's
    server_ports = {p["name"] for p in container(named(docs, "Deployment", "-metadata"))["ports"]}
    assert {"rpc", "admin"} <= server_ports

    # the engines: from the router (and Prometheus); the metadata server and strangers get nothing
    eng = policy_for(engines)
    port = "http" if engines == "worker" else v["workers"]["port"]
    assert allowed(eng, labels["router"], port)
    assert not allowed(eng, labels["metadata"], port) and not allowed(eng, stranger, port)
    assert all("from" in rule for rule in eng["spec"]["ingress"])  # no rule open to everyone
    metrics = v["networkPolicy"]["metricsFrom"]
    assert any(rule["from"] == metrics for rule in eng["spec"]["ingress"]) == bool(metrics)
    if engines == "ray":  # Ray's nodes talk to each other on their own ports
        assert allowed(eng, labels["ray"], 6379)

    # the router: its port, open
    rt = policy_for("router")
    assert rt["spec"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]


def test_ray_dashboard_stays_on_loopback():
    (ray,) = kinds(render(CASES["ray"]), "RayCluster")
    head = ray["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    command = shlex.split(head["template"]["spec"]["containers"][0]["command"][-1])
    starts = [i for i, w in enumerate(command) if w == "start" and command[i - 1] == "ray"]
    assert starts
    for i in starts:  # every `ray start` the head runs names the loopback
        end = next((j for j in range(i, len(command)) if command[j] in ("&", "&&", ";")), len(command))
        assert "--dashboard-host=127.0.0.1" in command[i:end]
    for group in ray["spec"]["workerGroupSpecs"]:
        assert group["rayStartParams"].get("dashboard-host", "127.0.0.1") == "127.0.0.1"


@pytest.mark.parametrize("values,message", [
    ({"workers": {"replicas": -1}}, "/workers/replicas"),
    ({"pool": {"kind": "nvme"}}, "/pool/kind"),
    ({"router": {"policy": "sticky"}}, "/router/policy"),
    # the chart sets how workers reach the pool, and in which coherence mode: not overridable per worker
    ({"workers": {"connector": {"extraConfig": {"coherence": "coherent"}}}},
     "/workers/connector/extraConfig/coherence"),
    ({"workers": {"connector": {"extraConfig": {"transport": "shm"}}}}, "/workers/connector/extraConfig/transport"),
    ({"pool": {"devdax": {"resourceName": "not a resource"}}}, "/pool/devdax/resourceName"),
])
def test_bad_values_fail_with_the_schema_message(values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        helm.Chart.load("helm/beluga").render(values, name="rel", namespace="ai")


def test_devdax_needs_a_device_plugin_or_privileged():
    with pytest.raises(helm.HelmError, match="pool.devdax.resourceName is empty"):
        helm.Chart.load("helm/beluga").render({"pool": {"devdax": {"resourceName": ""}}}, name="rel", namespace="ai")
    render({"pool": {"kind": "memory", "devdax": {"resourceName": ""}}})  # no device: nothing to choose
