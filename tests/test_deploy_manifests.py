"""deploy/kubernetes: the manifests validate offline and say what the product needs; their pods run as written.

No cluster can run here, so the manifests are checked three ways. (1) Every object validates with
kubernetes-validate in strict mode (unknown fields are errors) against the newest schema it bundles and an older
one clusters still run. (2) What the schema cannot know is read against the product: each container runs a real
`pipeline` subcommand with options it has, the configs the pods mount load with `pipeline.config.load_config`, the
Services' ports are the configs' ports, GPU workers ask for GPUs, every container has resources, probes and a
locked-down security context. (3) The last test runs the pods' containers as a kubelet would lay them out
(`Sandbox`): each in its own mount namespace over a read-only copy of this machine's root, as the manifests'
non-root user, with only the volumes its Deployment declares, written from the ConfigMap and the Secrets (filled
with real keys as README.md says), all in one network namespace where the Services' names resolve; the exec
probes run inside the containers the same way. A simulated scan written into the data volume must come out as a
complete store, made by the GPU worker Deployment's worker (on the CPU here) and seen by the web view.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import pipeline
from pipeline.config import Config, ConfigError, load_config
from pipeline.store import StoreReader, schema, store_status
from pipeline.store.schema import Attr

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
NAMESPACE = "beamline-pipeline"
PIPELINE = Path(sys.executable).parent / "pipeline"
# the newest schema kubernetes-validate bundles, and an older version that clusters still run
VERSIONS = sorted({"1.33.0", kubernetes_validate.latest_version()})
# the volume types the "restricted" Pod Security Standard allows (namespace.yaml enforces it)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


# -- reading the manifests -------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(path for path in DEPLOY.glob("*.yaml") if path.name != "kustomization.yaml")


def load_objects() -> dict[str, dict[str, Any]]:
    """Every object by file name (one object a file, as kustomization.yaml lists them)."""
    objects = {}
    for path in manifest_files():
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert len(documents) == 1, f"{path.name}: one object per file, found {len(documents)}"
        objects[path.name] = documents[0]
    return objects


def find(objects: dict[str, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in objects.values() if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"one {kind} {name}, found {len(found)}"
    return found[0]


def deployments(objects: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects.values() if obj["kind"] == "Deployment"}


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: one container"
    return dict(containers[0])


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    """A Secret's files as text, from stringData or (base64) data, as the kubelet writes them."""
    data = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def source_files(objects: dict[str, dict[str, Any]], volume: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """The files a configMap or secret volume shows: path -> (content, mode), items and modes as the kubelet does."""
    if "configMap" in volume:
        source, data = volume["configMap"], dict(find(objects, "ConfigMap", volume["configMap"]["name"])["data"])
    else:
        source, data = volume["secret"], secret_data(find(objects, "Secret", volume["secret"]["secretName"]))
    mode = int(source.get("defaultMode", 0o644))
    items = source.get("items") or [{"key": key, "path": key} for key in data]
    missing = [item["key"] for item in items if item["key"] not in data]
    assert not missing, f"volume {volume['name']}: keys {missing} not in its source"
    return {item["path"]: (data[item["key"]], int(item.get("mode", mode))) for item in items}


def pipeline_commands(objects: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(where, argv) of every container command and exec probe."""
    found = []
    for name, deployment in deployments(objects).items():
        container = only_container(deployment)
        found.append((f"{name} command", [*container["command"], *container.get("args", [])]))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "exec" in container.get(probe, {}):
                found.append((f"{name} {probe}", list(container[probe]["exec"]["command"])))
    return found


def quantity(text: str | int) -> float:
    """A Kubernetes quantity ("250m", "2", "512Mi", "1Gi") as a number."""
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match is not None and match.group(2) in ("", *suffixes), f"not a quantity: {text!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1)


# -- the configs the pods mount ----------------------------------------------------------------


def generate_keys(directory: Path, *names: str) -> dict[str, str]:
    """`pipeline keys generate NAME` for each name: the files' contents by file name (what a filled Secret holds)."""
    files = {}
    for name in names:
        subprocess.run([str(PIPELINE), "keys", "generate", name, "--out", str(directory)], check=True, capture_output=True)
        for suffix in (".key", ".key_secret"):
            files[name + suffix] = (directory / (name + suffix)).read_text()
    return files


def filled(objects: dict[str, dict[str, Any]], keys: dict[str, str], token: str) -> dict[str, dict[str, Any]]:
    """The manifests after README.md's steps: the Curve keys Secret made from real keys (as `kubectl create secret
    generic --from-file` makes it), a real web token."""
    objects = copy.deepcopy(objects)
    curve = find(objects, "Secret", "pipeline-curve-keys")
    names = sorted(secret_data(curve))
    assert set(names) <= set(keys), f"the Secret's keys {names} are files that `pipeline keys generate` makes"
    curve.pop("stringData")
    curve["data"] = {name: base64.b64encode(keys[name].encode()).decode() for name in names}
    web = find(objects, "Secret", "pipeline-web-config")
    text = web["stringData"]["web.yaml"]
    assert "token: REPLACE-ME" in text
    web["stringData"]["web.yaml"] = text.replace("token: REPLACE-ME", f"token: {token}")
    return objects


def write_volume(objects: dict[str, dict[str, Any]], volume: dict[str, Any], directory: Path, fs_group: int | None) -> None:
    """A configMap or secret volume as the kubelet writes it: files in a timestamped directory, `..data` pointing at
    it, each name a link through `..data`; root-owned, group fsGroup when the pod has one."""
    stamp = directory / "..2026_01_01_00_00_00.000000000"
    stamp.mkdir(parents=True)
    for name, (content, mode) in source_files(objects, volume).items():
        target = stamp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(mode)
        if fs_group is not None and os.geteuid() == 0:
            os.chown(target, 0, fs_group)
        (directory / name).symlink_to(Path("..data") / name)
    (directory / "..data").symlink_to(stamp.name)


def lay_out_volumes(objects: dict[str, dict[str, Any]], deployment: dict[str, Any], root: Path, data: Path) -> dict[str, Path]:
    """Every volume of `deployment`'s pod in a directory under `root` (the persistentVolumeClaim: `data`)."""
    spec = deployment["spec"]["template"]["spec"]
    fs_group = spec.get("securityContext", {}).get("fsGroup")
    volumes = {}
    for volume in spec["volumes"]:
        kinds = set(volume) - {"name"}
        assert kinds <= RESTRICTED_VOLUMES, f"{volume['name']}: {kinds} is not allowed under the restricted Pod Security Standard"
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] == "pipeline-data"
            volumes[volume["name"]] = data
            continue
        directory = root / deployment["metadata"]["name"] / volume["name"]
        if "emptyDir" in volume:
            directory.mkdir(parents=True)
            directory.chmod(0o777)  # the kubelet's emptyDir mode
        else:
            write_volume(objects, volume, directory, fs_group)
        volumes[volume["name"]] = directory
    return volumes


def mounts(deployment: dict[str, Any], volumes: dict[str, Path]) -> list[tuple[Path, str, bool]]:
    """(host directory, mount path, read-only) of each volume mount of the container."""
    return [(volumes[mount["name"]], mount["mountPath"], bool(mount.get("readOnly", False)))
            for mount in only_container(deployment).get("volumeMounts", [])]


def rewrite(text: str, mapping: dict[str, str]) -> str:
    """`text` with each mount path (or other key of `mapping`) replaced in one pass, the longest match first, and
    only where it ends a path component (`/tmp` in `/tmp/x`, not in `/tmpx`)."""
    pattern = "|".join(re.escape(old) for old in sorted(mapping, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])({pattern})(?![\w.-])", lambda match: mapping[match.group(1)], text)


def config_path(deployment: dict[str, Any]) -> str:
    """The --config file a container's command names (a path inside the pod)."""
    command = only_container(deployment)["command"]
    return str(command[command.index("--config") + 1])


def load_mounted_config(objects: dict[str, dict[str, Any]], deployment: dict[str, Any], root: Path, data: Path) -> Config:
    """The config as the container would load it, with its mount paths moved under `root` (no sandbox needed)."""
    volumes = lay_out_volumes(objects, deployment, root, data)
    mapping = {mount_path: str(host) for host, mount_path, _ in mounts(deployment, volumes)}
    inside = config_path(deployment)
    text = rewrite(Path(rewrite(inside, mapping)).read_text(), mapping)
    moved = root / f"{deployment['metadata']['name']}.yaml"
    moved.write_text(text)
    return load_config(moved)


# -- (1) the schema ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: path.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    obj = yaml.safe_load(path.read_text())
    validated = kubernetes_validate.validate(obj, version, strict=True)
    assert validated == version.rsplit(".", 1)[0]  # the schema of that version was found and used


@pytest.mark.parametrize("where, wrong", [("container", "livenesProbe"), ("pod", "securityContext.runAsNonroot")])
def test_misspelled_field_fails_strict_validation(where: str, wrong: str) -> None:
    deployment = copy.deepcopy(find(load_objects(), "Deployment", "pipeline-daemon"))
    if where == "container":
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        container[wrong] = container.pop("livenessProbe")
    else:
        context = deployment["spec"]["template"]["spec"]["securityContext"]
        context["runAsNonroot"] = context.pop("runAsNonRoot")
    latest = VERSIONS[-1]
    with pytest.raises(kubernetes_validate.ValidationError) as error:
        kubernetes_validate.validate(deployment, latest, strict=True)
    assert wrong.rsplit(".", 1)[-1] in str(error.value) and "was unexpected" in str(error.value)
    kubernetes_validate.validate(deployment, latest, strict=False)  # only strict mode catches it


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "namespace", "resources", "images"}
    assert kustomization["kind"] == "Kustomization" and kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert sorted(kustomization["resources"]) == [path.name for path in manifest_files()]
    assert kustomization["namespace"] == NAMESPACE
    objects = load_objects()
    cluster_wide = {"Namespace", "PersistentVolume"}
    for name, obj in objects.items():
        if obj["kind"] not in cluster_wide:
            assert obj["metadata"]["namespace"] == NAMESPACE, name
    assert find(objects, "Namespace", NAMESPACE)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    images = {only_container(d)["image"].rsplit(":", 1)[0] for d in deployments(objects).values()}
    assert images == {image["name"] for image in kustomization["images"]}


# -- (2) the manifests against the product ----------------------------------------------------


@pytest.fixture(scope="module")
def help_texts() -> dict[str, str]:
    """`pipeline SUB --help` of each subcommand the manifests run, from the venv's own `pipeline`."""
    texts = {}
    for _where, argv in pipeline_commands(load_objects()):
        if argv[0] == "pipeline" and argv[1] not in texts:
            done = subprocess.run([str(PIPELINE), argv[1], "--help"], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"`pipeline {argv[1]} --help`: {done.stderr.strip()}"
            texts[argv[1]] = done.stdout
    return texts


def test_every_command_is_a_real_pipeline_subcommand(help_texts: dict[str, str]) -> None:
    objects = load_objects()
    commands = pipeline_commands(objects)
    assert {argv[1] for _, argv in commands if argv[0] == "pipeline"} == {"run", "worker", "web", "status"}
    for where, argv in commands:
        if argv[0] == "pipeline":
            for option in (arg for arg in argv[2:] if arg.startswith("--")):
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_texts[argv[1]]), \
                    f"{where}: `pipeline {argv[1]}` has no option {option}"
            if "--config" in argv:  # the config it names comes from a volume of that pod
                assert argv[argv.index("--config") + 1].startswith("/etc/pipeline/config/"), where
        else:  # a probe script the ConfigMap ships, run with the image's python
            assert argv[0] == "python" and argv[1].startswith("/etc/pipeline/probes/"), where
            script = find(objects, "ConfigMap", "pipeline-config")["data"][Path(argv[1]).name]
            compile(script, argv[1], "exec")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder with a short path: the daemon pod's control socket (.../pods/pipeline-daemon/run/daemon/control) must
    fit Linux's 107 bytes, which pytest's tmp_path under xdist does not leave room for (the config refuses it)."""
    folder = Path(tempfile.mkdtemp(prefix="pd-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_configs_load_with_pipeline_config(short_tmp: Path) -> None:
    objects = filled(load_objects(), generate_keys(short_tmp / "keys", "daemon", "gpu-worker"), secrets.token_urlsafe())
    daemon = load_mounted_config(objects, find(objects, "Deployment", "pipeline-daemon"), short_tmp / "pods", short_tmp / "data")
    worker = load_mounted_config(objects, find(objects, "Deployment", "pipeline-gpu-worker"), short_tmp / "pods", short_tmp / "data")
    web = load_mounted_config(objects, find(objects, "Deployment", "pipeline-web"), short_tmp / "pods", short_tmp / "data")
    assert daemon.workers.local == 0 and daemon.workers.bind == "tcp://0.0.0.0:5555"
    assert daemon.watch.mode == "polling"  # GPFS written by other hosts: no inotify events
    assert daemon.workers.curve_secret_key is not None and daemon.workers.curve_secret_key.name == "daemon.key_secret"
    assert daemon.workers.authorized_keys is not None and sorted(p.name for p in daemon.workers.authorized_keys.glob("*.key")) == ["gpu-worker.key"]
    assert daemon.daemon.control.startswith("ipc://") and daemon.daemon.metrics_address == "0.0.0.0"
    assert worker.workers.device == daemon.workers.device == "cuda"
    assert worker.workers.server_public_key is not None and worker.workers.server_public_key.name == "daemon.key"
    assert worker.models == daemon.models  # the daemon records its models section in every store as what made it
    assert web.web.host == "0.0.0.0" and web.web.token is not None
    assert [str(root) for root in web.web.roots] == [str(d) for d in daemon.watch.dirs]  # rewritten alike


def test_placeholder_web_token_refuses_to_start(short_tmp: Path) -> None:
    objects = load_objects()  # as shipped: the token is REPLACE-ME
    with pytest.raises(ConfigError, match=r"web\.token: too short"):
        load_mounted_config(objects, find(objects, "Deployment", "pipeline-web"), short_tmp / "pods", short_tmp / "data")


def run_daemon_with_shipped_secret(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`pipeline run` with the daemon's config and the Curve keys Secret as shipped (placeholders), on this host."""
    objects = load_objects()
    deployment = find(objects, "Deployment", "pipeline-daemon")
    volumes = lay_out_volumes(objects, deployment, tmp_path / "pods", tmp_path / "data")
    mapping = {mount_path: str(host) for host, mount_path, _ in mounts(deployment, volumes)}
    mapping |= {"0.0.0.0:5555": "127.0.0.1:0", "metrics_port: 9464": "metrics_port: 0"}  # no fixed port on a shared host
    config = tmp_path / "daemon.yaml"
    config.write_text(rewrite(Path(rewrite(config_path(deployment), mapping)).read_text(), mapping))
    return subprocess.run([str(PIPELINE), "run", "--config", str(config)], capture_output=True, text=True, timeout=120)


def test_placeholder_curve_keys_refuse_to_start(short_tmp: Path) -> None:
    """The daemon given the Secret as shipped exits at once, naming the key file, instead of running with no keys."""
    done = run_daemon_with_shipped_secret(short_tmp)
    assert done.returncode != 0
    assert "/pods/pipeline-daemon/daemon-key/daemon.key_secret" in done.stdout + done.stderr


def test_placeholder_curve_keys_are_named_in_one_line(short_tmp: Path) -> None:
    done = run_daemon_with_shipped_secret(short_tmp)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_services_match_the_configs_and_containers(short_tmp: Path) -> None:
    objects = filled(load_objects(), generate_keys(short_tmp / "keys", "daemon", "gpu-worker"), secrets.token_urlsafe())
    pods = short_tmp / "pods"
    daemon_config = load_mounted_config(objects, find(objects, "Deployment", "pipeline-daemon"), pods, short_tmp / "data")
    web_config = load_mounted_config(objects, find(objects, "Deployment", "pipeline-web"), pods, short_tmp / "data")
    expected = {
        ("pipeline-daemon", "workers"): int(str(daemon_config.workers.bind).rsplit(":", 1)[1]),
        ("pipeline-daemon", "metrics"): daemon_config.daemon.metrics_port,
        ("pipeline-web", "http"): web_config.web.port,
    }
    for (service_name, port_name), config_port in expected.items():
        service = find(objects, "Service", service_name)
        selected = [d for d in deployments(objects).values()
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"{service_name} selects one Deployment's pods"
        deployment = selected[0]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == port_name]
        (container_port,) = [p for p in only_container(deployment)["ports"] if p["name"] == port["targetPort"]]
        assert port["port"] == container_port["containerPort"] == config_port, f"{service_name} {port_name}"
    daemon_service = find(objects, "Service", "pipeline-daemon")
    assert daemon_service["metadata"]["annotations"]["prometheus.io/port"] == str(expected["pipeline-daemon", "metrics"])
    # the workers reach the daemon through its Service, at the port the daemon binds, and their probe looks at that port
    worker = only_container(find(objects, "Deployment", "pipeline-gpu-worker"))
    endpoint = worker["command"][worker["command"].index("--connect") + 1]
    assert endpoint == f"tcp://pipeline-daemon.{NAMESPACE}.svc.cluster.local:{expected['pipeline-daemon', 'workers']}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"][-1] == str(expected["pipeline-daemon", "workers"])
    # the control socket is not on the network: a socket file in the daemon pod's own emptyDir
    daemon = find(objects, "Deployment", "pipeline-daemon")
    (run_mount,) = [m for m in only_container(daemon)["volumeMounts"] if daemon_config.daemon.control.startswith(f"ipc://{m['mountPath']}/")]
    (run_volume,) = [v for v in daemon["spec"]["template"]["spec"]["volumes"] if v["name"] == run_mount["name"]]
    assert "emptyDir" in run_volume
    assert all(p["name"] in ("workers", "metrics") for p in daemon_service["spec"]["ports"])


def test_gpu_workers_request_gpus() -> None:
    objects = load_objects()
    for name, deployment in deployments(objects).items():
        resources = only_container(deployment)["resources"]
        gpus = resources["requests"].get("nvidia.com/gpu"), resources["limits"].get("nvidia.com/gpu")
        if name == "pipeline-gpu-worker":
            assert gpus == (1, 1)  # one GPU a pod; an extended resource's limit must equal its request
            assert deployment["spec"]["replicas"] >= 1
        else:
            assert gpus == (None, None), f"{name} needs no GPU"
    worker_config = yaml.safe_load(find(objects, "ConfigMap", "pipeline-config")["data"]["worker.yaml"])
    assert worker_config["workers"]["device"] == "cuda" and worker_config["models"]["model_batch"] >= 8


def test_every_container_has_resources_probes_and_a_locked_down_context() -> None:
    for name, deployment in deployments(load_objects()).items():
        spec = deployment["spec"]["template"]["spec"]
        pod_context = spec["securityContext"]
        assert pod_context["runAsNonRoot"] is True and pod_context["runAsUser"] > 0, name
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        if any("persistentVolumeClaim" in volume for volume in spec["volumes"]):
            assert "fsGroup" not in pod_context, f"{name}: fsGroup would change the group of the beamline's data"
        for volume in spec["volumes"]:
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, f"{name}: volume {volume['name']}"
        container = only_container(deployment)
        context = container["securityContext"]
        assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}, name
        for kind in ("cpu", "memory"):
            request, limit = container["resources"]["requests"][kind], container["resources"]["limits"][kind]
            assert 0 < quantity(request) <= quantity(limit), f"{name} {kind}: {request} > {limit}"
        for probe in ("readinessProbe", "livenessProbe"):
            assert "exec" in container[probe] or "httpGet" in container[probe], f"{name} has no {probe}"
            assert container[probe]["timeoutSeconds"] >= 5, f"{name} {probe}: the probe imports Python"
        env = {item["name"]: item["value"] for item in container["env"]}
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert env["HOME"] in writable and "/tmp" in writable, f"{name}: HOME and /tmp on volumes (the root is read-only)"


def test_daemon_is_one_replica_recreated() -> None:
    daemon = find(load_objects(), "Deployment", "pipeline-daemon")
    assert daemon["spec"]["replicas"] == 1
    assert daemon["spec"]["strategy"] == {"type": "Recreate"}  # never two daemons writing the same stores
    assert daemon["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60  # SIGTERM drains frames in flight


def test_data_volume_is_the_beamline_path_in_every_pod_that_mounts_it() -> None:
    objects = load_objects()
    volume = find(objects, "PersistentVolume", "pipeline-data-gpfs")
    claim = find(objects, "PersistentVolumeClaim", "pipeline-data")
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert volume["spec"]["claimRef"] == {"namespace": NAMESPACE, "name": "pipeline-data"}
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert claim["spec"]["accessModes"] == volume["spec"]["accessModes"] == ["ReadWriteMany"]
    host_path = volume["spec"]["hostPath"]["path"]
    daemon_config = yaml.safe_load(find(objects, "ConfigMap", "pipeline-config")["data"]["daemon.yaml"])
    for name in ("pipeline-daemon", "pipeline-web"):
        deployment = find(objects, "Deployment", name)
        spec = deployment["spec"]["template"]["spec"]
        (data,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        (mount,) = [m for m in only_container(deployment)["volumeMounts"] if m["name"] == data["name"]]
        assert mount["mountPath"] == host_path, f"{name}: the same path as on the hosts (stores record it)"
        assert bool(mount.get("readOnly")) == (name == "pipeline-web")
    assert all(Path(d).is_relative_to(host_path) for d in daemon_config["watch"]["dirs"])
    assert "pipeline-gpu-worker" not in [name for name, d in deployments(objects).items()
                                         if any("persistentVolumeClaim" in v for v in d["spec"]["template"]["spec"]["volumes"])]


# -- (3) the pods, run as a kubelet would lay them out -----------------------------------------

SANDBOX_SCRIPT = r"""
set -eu
root="$1"; shift; hosts="$1"; shift; opened="$1"; shift; pod="$1"; shift; count="$1"; shift
hostname "$pod"
mount -t tmpfs -o mode=0755 sandbox "$root"
mkdir "$root/upper" "$root/work" "$root/fs"
mount -t overlay overlay -o "lowerdir=/,upperdir=$root/upper,workdir=$root/work" "$root/fs"
fs="$root/fs"
i=0
while [ "$i" -lt "$count" ]; do
  source="$1"; target="$2"; mode="$3"; shift 3; i=$((i + 1))
  mkdir -p "$fs$target"
  mount --bind "$source" "$fs$target"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$fs$target"; fi
done
mount --bind "$hosts" "$fs/etc/hosts"
mount -t proc proc "$fs/proc"
mount --rbind /dev "$fs/dev"
mount --rbind /sys "$fs/sys"
for directory in $opened; do chmod o+x "$fs$directory"; done
mount -o remount,bind,ro "$fs"
exec chroot "$fs" "$@"
"""


# `ip link set lo up` through the ioctl it makes (SIOCSIFFLAGS with IFF_UP | IFF_LOOPBACK | IFF_RUNNING)
LOOPBACK_UP = "import fcntl, socket, struct; fcntl.ioctl(socket.socket(), 0x8914, struct.pack('16sH', b'lo', 0x1 | 0x8 | 0x40))"


def closed_ancestors(path: Path) -> list[str]:
    """Directories above `path` that other users cannot enter (here the interpreter may sit under /root, mode 0700;
    in the image it is open to the pod's user)."""
    return [str(parent) for parent in Path(path).resolve().parents if parent != Path("/") and not parent.stat().st_mode & 0o001]


@dataclass
class Container:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    user: list[str]
    env: list[str]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def exec(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside this container, as its user with its environment: what a kubelet does for an exec probe."""
        assert self.process.poll() is None, f"{self.name} exited with {self.process.returncode}:\n{self.output()[-3000:]}"
        return subprocess.run(["nsenter", f"--target={self.process.pid}", "--mount", "--net", "--uts", "--root", "--wd", *self.user,
                               "env", "-i", *self.env, *argv], capture_output=True, text=True, timeout=timeout)

    def probe(self, kind: str, deployment: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        spec = only_container(deployment)[kind]
        return self.exec(spec["exec"]["command"], timeout=spec["timeoutSeconds"] + 30)  # the machine is shared: slack

    def stop(self, grace: float) -> int:
        """SIGTERM, then the pod's grace period, then SIGKILL, as the kubelet does; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Sandbox:
    """Pods in one network namespace (a `sleep` holds it), each container in its own mount namespace: a read-only
    overlay of this machine's root with the pod's volumes mounted where the manifest says, /etc/hosts naming the
    Services, run as the pod's user with no new privileges and the container's environment."""

    root: Path
    objects: dict[str, dict[str, Any]]
    data: Path
    keys: dict[str, str]
    holder: subprocess.Popen[bytes] | None = None
    containers: list[Container] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "3600"])
        netns = f"/proc/{self.holder.pid}/ns/net"
        for _ in range(100):  # unshare has made the namespace once the link differs from ours
            if os.path.exists(netns) and os.readlink(netns) != os.readlink("/proc/self/ns/net"):
                break
            time.sleep(0.05)
        subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-c", LOOPBACK_UP], check=True)  # no iproute2 needed
        names = " ".join(f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local {service['metadata']['name']}.{NAMESPACE}.svc"
                         for service in self.objects.values() if service["kind"] == "Service")
        self.hosts = self.root / "hosts"
        self.hosts.write_text(f"127.0.0.1 localhost {names}\n")
        self.opened = " ".join(sorted({*closed_ancestors(Path(sys.executable)), *closed_ancestors(Path(pipeline.__file__))}))

    def start(self, deployment: dict[str, Any], name: str, extra_args: tuple[str, ...] = (), command: list[str] | None = None,
              objects: dict[str, dict[str, Any]] | None = None) -> Container:
        """One container of `deployment`'s pod (its volumes laid out afresh under `name`, from `objects` if given),
        running its command (or `command`)."""
        pod_root = self.root / name
        volumes = lay_out_volumes(objects or self.objects, deployment, pod_root / "volumes", self.data)
        (pod_root / "fs").mkdir()
        spec = deployment["spec"]["template"]["spec"]
        context = spec["securityContext"]
        user = ["setpriv", f"--reuid={context['runAsUser']}", f"--regid={context['runAsGroup']}", "--no-new-privs",
                f"--groups={context['fsGroup']}" if "fsGroup" in context else "--clear-groups"]
        container = only_container(deployment)
        env = [f"{item['name']}={item['value']}" for item in container.get("env", [])]
        env += [f"PATH={Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", f"HOSTNAME={name}"]
        argv = command or [*container["command"], *container.get("args", []), *extra_args]
        bound = mounts(deployment, volumes)
        # the installation is the image's: where a pod's volume lies over it here (a checkout under /tmp, where every pod
        # mounts an emptyDir), it is bound again on top, read-only, as it would be in the image
        installed = [DEPLOY.parents[1], Path(sys.prefix)]
        bound += [(path, str(path), True) for path in installed if any(path.is_relative_to(target) for _, target, _ in bound)]
        mount_args = [str(arg) for host, target, read_only in bound for arg in (host, target, "ro" if read_only else "rw")]
        log = self.root / f"{name}.log"
        assert self.holder is not None
        process = subprocess.Popen(["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "unshare", "--mount", "--uts", "--propagation", "private",
                                    "sh", "-c", SANDBOX_SCRIPT, "sandbox", str(pod_root / "fs"), str(self.hosts), self.opened, name, str(len(bound)),
                                    *mount_args, *user, "env", "-i", *env, *argv],
                                   stdout=log.open("wb"), stderr=subprocess.STDOUT)
        started = Container(name, process, log, user, env)
        self.containers.append(started)
        return started

    def run(self, deployment: dict[str, Any], name: str, command: list[str], timeout: float = 120,
            objects: dict[str, dict[str, Any]] | None = None) -> tuple[int, str]:
        """A one-off command in a fresh container of `deployment`'s pod: its exit status and output."""
        container = self.start(deployment, name, command=command, objects=objects)
        try:
            code = container.process.wait(timeout=timeout)
        finally:
            container.stop(grace=5)
        return code, container.output()

    def close(self) -> None:
        for container in self.containers:
            if container.process.poll() is None:
                container.process.kill()
                container.process.wait()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()


def wait_for(check: Callable[[], Any], timeout: float, what: str, *logs: Container) -> Any:
    """Call `check()` until it returns something true; that value, or AssertionError naming `what` with the ends of
    the `logs` containers' output as they are then."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {container.name}:\n{container.output()[-3000:]}" for container in logs)
            raise AssertionError(f"not within {timeout:.0f} s: {what}{tails}")
        time.sleep(1.0)


def passed(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str] | None:
    return done if done.returncode == 0 else None


def web_get(container: Container, path: str) -> subprocess.CompletedProcess[str]:
    """GET `path` from inside the web container with the token of its mounted config (as web-probe.py does)."""
    script = ("import sys, urllib.request, yaml; w = yaml.safe_load(open(sys.argv[1]))['web']; "
              "r = urllib.request.Request(f\"http://127.0.0.1:{w['port']}{sys.argv[2]}\", headers={'Authorization': 'Bearer ' + w['token']}); "
              "print(urllib.request.urlopen(r, timeout=20).read().decode())")
    return container.exec(["python", "-c", script, "/etc/pipeline/config/web.yaml", path])


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("needs root for mount and network namespaces (CI and the development machines run as root)")
    keys = generate_keys(tmp_path / "keys", "daemon", "gpu-worker", "intruder")
    objects = filled(load_objects(), keys, secrets.token_urlsafe())
    daemon = find(objects, "Deployment", "pipeline-daemon")
    data = tmp_path / "data"  # the beamline's file system, owned by the facility account the pods run as
    data.mkdir()
    os.chown(data, daemon["spec"]["template"]["spec"]["securityContext"]["runAsUser"], daemon["spec"]["template"]["spec"]["securityContext"]["runAsGroup"])
    (tmp_path / "sandbox").mkdir()
    box = Sandbox(tmp_path / "sandbox", objects, data, keys)
    try:
        yield box
    finally:
        box.close()


@pytest.mark.daemon
def test_pods_run_as_the_manifests_say(sandbox: Sandbox) -> None:
    import torch

    objects = sandbox.objects
    daemon_deployment = find(objects, "Deployment", "pipeline-daemon")
    worker_deployment = find(objects, "Deployment", "pipeline-gpu-worker")
    web_deployment = find(objects, "Deployment", "pipeline-web")
    daemon_config = yaml.safe_load(find(objects, "ConfigMap", "pipeline-config")["data"]["daemon.yaml"])
    visit = daemon_config["watch"]["dirs"][0]
    on_cpu = () if torch.cuda.is_available() else ("--device", "cpu")  # no GPU here: the same worker on the CPU
    # the visit's directory exists before the beamtime starts, owned by the facility account (`pipeline web` refuses
    # a root that is not there yet; the daemon would wait for it)
    data_path = find(objects, "PersistentVolume", "pipeline-data-gpfs")["spec"]["hostPath"]["path"]
    host_visit = sandbox.data / Path(visit).relative_to(data_path)
    host_visit.mkdir(parents=True)
    for directory in (host_visit, *host_visit.relative_to(sandbox.data).parents):
        os.chown(sandbox.data / directory, sandbox.data.stat().st_uid, sandbox.data.stat().st_gid)

    # the daemon's probe says no while nothing answers, yes once the daemon runs
    status = only_container(daemon_deployment)["livenessProbe"]["exec"]["command"]
    code, output = sandbox.run(daemon_deployment, "daemon-before", status)
    assert code == 1 and "no daemon answers" in output
    daemon = sandbox.start(daemon_deployment, "daemon")
    answer = wait_for(lambda: passed(daemon.probe("startupProbe", daemon_deployment)), 120, "the daemon's startup probe passes", daemon)
    assert "daemon pid" in answer.stdout and "workers at tcp://0.0.0.0:5555" in answer.stdout
    assert daemon.probe("readinessProbe", daemon_deployment).returncode == 0
    # the container is what the manifest says: its user, a read-only root, its volumes writable
    context = daemon_deployment["spec"]["template"]["spec"]["securityContext"]
    assert daemon.exec(["python", "-c", "import os; print(os.getuid(), os.getgid())"]).stdout.split() == [str(context["runAsUser"]), str(context["runAsGroup"])]
    refused_write = daemon.exec(["python", "-c", "open('/etc/pipeline/written-by-the-daemon', 'w')"])
    assert refused_write.returncode != 0 and "Read-only file system" in refused_write.stderr
    assert daemon.exec(["python", "-c", "open('/tmp/written-by-the-daemon', 'w')"]).returncode == 0

    # a worker whose key the daemon does not know: connected by TCP at most, never ready, never given frames
    intruder_objects = copy.deepcopy(objects)
    curve = find(intruder_objects, "Secret", "pipeline-curve-keys")
    curve["data"]["gpu-worker.key_secret"] = base64.b64encode(sandbox.keys["intruder.key_secret"].encode()).decode()
    intruder = sandbox.start(worker_deployment, "intruder", on_cpu, objects=intruder_objects)
    wait_for(lambda: "connected to" in intruder.output(), 180, "the intruder loads its models", intruder)
    for _ in range(3):
        refused = intruder.probe("readinessProbe", worker_deployment)
        assert refused.returncode == 1 and "0 connection(s)" in refused.stdout
    assert json.loads(daemon.exec(["pipeline", "status", "--json", "--config", "/etc/pipeline/config/daemon.yaml"]).stdout)["dispatch"]["workers"] == []
    assert intruder.stop(grace=60) == 0

    # the real worker: ready once its models are loaded and the daemon took its key
    worker = sandbox.start(worker_deployment, "gpu-worker-0", on_cpu)
    wait_for(lambda: passed(worker.probe("startupProbe", worker_deployment)), 240, "the worker's startup probe passes", worker, daemon)
    assert worker.probe("livenessProbe", worker_deployment).returncode == 0
    joined = json.loads(daemon.exec(["pipeline", "status", "--json", "--config", "/etc/pipeline/config/daemon.yaml"]).stdout)["dispatch"]["workers"]
    assert [w["name"].split(":")[0] for w in joined] == ["gpu-worker-0"]

    # the metrics port, through the Service's name, from another pod of the namespace
    metrics = sandbox.run(web_deployment, "scraper", ["python", "-c", "import urllib.request; print(urllib.request.urlopen("
                                                      f"'http://pipeline-daemon.{NAMESPACE}.svc.cluster.local:9464/metrics', timeout=20).read().decode())"])
    assert metrics[0] == 0 and "pipeline_workers 1.0" in metrics[1], metrics[1][-2000:]

    # the web view: ready, alive, and a wrong token is refused
    web = sandbox.start(web_deployment, "web")
    wait_for(lambda: passed(web.probe("readinessProbe", web_deployment)), 120, "the web view is ready", web)
    assert web.probe("livenessProbe", web_deployment).returncode == 0
    wrong_objects = copy.deepcopy(objects)
    wrong_web = find(wrong_objects, "Secret", "pipeline-web-config")["stringData"]
    wrong_web["web.yaml"] = re.sub(r"token: \S+", f"token: {secrets.token_urlsafe()}", wrong_web["web.yaml"])
    code, output = sandbox.run(web_deployment, "wrong-token", only_container(web_deployment)["livenessProbe"]["exec"]["command"],
                               objects=wrong_objects)
    assert code == 1 and "401" in output

    # a scan written into the visit (as the facility account) comes out as a complete store beside it
    beamline = ["pipeline", "simulate", "--out", visit, "--layout", "gda9", "--scans", "1", "--frames", "6", "--rate", "50", "--no-progress"]
    code, output = sandbox.run(daemon_deployment, "beamline", beamline, timeout=300)
    assert code == 0, output
    store = wait_for(lambda: [s for s in host_visit.rglob("*.zarr") if store_status(s) in schema.FINAL_STATUSES], 600,
                     "the scan's store is final", daemon, worker)[0]
    reader = StoreReader(store)
    assert reader.status == schema.STATUS_COMPLETE
    assert reader.frames_total == 6 and reader.done_frames().tolist() == list(range(6))
    assert str(reader.attrs[Attr.SOURCE_FILE]).startswith(visit + "/")  # the path users see on the hosts
    # the web view looks at the stores once a second (`web.poll_interval_s`), so it says so within a few
    def web_statuses() -> list[str]:
        return [scan["status"] for scan in json.loads(web_get(web, "/api/scans").stdout)["scans"]]
    wait_for(lambda: web_statuses() == ["complete"], 30, "the web view lists the scan as complete", web)

    # SIGTERM, as `kubectl delete` sends it: each stops within its grace period, cleanly
    for container, deployment in ((web, web_deployment), (worker, worker_deployment), (daemon, daemon_deployment)):
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert container.stop(grace) == 0, f"{container.name}:\n{container.output()[-2000:]}"
    for container in (daemon, worker, web):
        assert "Traceback" not in container.output(), container.output()[-3000:]
