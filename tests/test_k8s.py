"""The Kubernetes manifests (k8s/) and the images they run, checked offline.

`kubectl kustomize` renders the base and every overlay; every built-in object validates strictly
against the Kubernetes schemas kubernetes-validate ships; the ServiceMonitor (a custom resource it has
no schema for) against the part of the CRD we use, written out below. Then what the deployment promises:
locked-down, probed, sized containers; dev is `make run` in one pod; production splits API and GPU
trainers. The images: the Bentos built offline and the Dockerfile `bentoml containerize` would use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.resources
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from bentoml._internal.bento import Bento
from bentoml._internal.container import construct_containerfile
from service_helpers import BENTOML, REPO

from service.settings import PREFIX, Settings

pytestmark = pytest.mark.process  # runs kubectl and bentoml build

K8S = REPO / "k8s"
RENDERED = ("base", "overlays/dev", "overlays/production")
# The oldest Kubernetes the manifests are for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
KUBECTL_SECONDS = 60
BUILD_SECONDS = 120
# Any attempt to reach a package index (pip, uv, a lock step) fails at once instead of hanging.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "", "PIP_NO_INDEX": "1", "UV_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}

# The Bento image (the generated Dockerfile; test_bento_image checks these against it).
BENTO_UID = 1034
BENTO_SOURCE = "/home/bentoml/bento/src"
PORT = 3000

# ServiceMonitor is a custom resource: kubernetes-validate has no schema for it. This is the part of
# monitoring.coreos.com/v1 ServiceMonitor that k8s/ uses, with the types, patterns and required fields
# of the prometheus-operator CRD, operator v0.84.1:
# https://github.com/prometheus-operator/prometheus-operator/blob/v0.84.1/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml
# It is closed with additionalProperties: false so that a misspelt field, or one this subset lacks,
# fails. Using another field of the CRD means adding it here from the CRD.
DURATION = {"type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "additionalProperties": False,
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                    "labels": STRING_MAP, "annotations": STRING_MAP}},
        "spec": {
            "type": "object", "required": ["endpoints", "selector"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {"matchLabels": STRING_MAP}},
                "endpoints": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "scheme": {"enum": ["http", "https"]},
                                   "interval": DURATION, "scrapeTimeout": DURATION}}},
            },
        },
    },
}


# What a BentoML service's config holds unless it says otherwise: its request timeout, its metrics' prefix.
BENTOML_SERVICE_DEFAULTS = yaml.safe_load(
    importlib.resources.files("bentoml._internal.configuration.v2").joinpath("default_configuration.yaml").read_text()
)["services"]


def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl is not on PATH: these tests render k8s/ with `kubectl kustomize` (/usr/bin/kubectl)"
    return found


def kustomize(folder: Path) -> list[dict]:
    # An empty kubeconfig: rendering must not depend on, or reach, any cluster.
    env = dict(os.environ, KUBECONFIG=os.devnull)
    done = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, env=env,
                          timeout=KUBECTL_SECONDS)
    assert done.returncode == 0, f"kubectl kustomize {folder}: {done.stderr}"
    return [o for o in yaml.safe_load_all(done.stdout) if o]


@functools.cache
def rendered(name: str) -> tuple[dict, ...]:
    return tuple(kustomize(K8S / name))


def one(objects, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def deployments(objects) -> list[dict]:
    return [o for o in objects if o["kind"] == "Deployment"]


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def environment(objects, c: dict) -> dict[str, dict]:
    """Every variable a container gets, from its ConfigMaps and its own env: name -> {"value"} or {"valueFrom"}."""
    env = {}
    for source in c.get("envFrom", []):
        data = one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
        env.update({k: {"value": v} for k, v in data.items()})
    env.update({e["name"]: {k: v for k, v in e.items() if k != "name"} for e in c.get("env", [])})
    return env


def quantity(text: str | int) -> float:
    """A Kubernetes quantity, for comparing requests with limits: '500m', '2', '4Gi', '16G'."""
    text = str(text)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, suffix = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text).groups()
    return float(number) * (suffixes[suffix] if suffix else 1)


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def validate(obj: dict) -> None:
    if obj["kind"] == "ServiceMonitor":
        jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
        return
    for version in KUBERNETES_VERSIONS:
        # SchemaNotFoundError (a kind no Kubernetes schema knows) fails too: the CLI only warns on it.
        kubernetes_validate.validate(obj, version, strict=True)


# --- rendering and schemas ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", RENDERED)
def test_renders_and_every_object_validates_strictly(name):
    objects = rendered(name)
    assert objects, f"{name} rendered nothing"
    for obj in objects:
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as err:
            path = ".".join(map(str, err.path))
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {path}: {err.message}")
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"finetune-serve"}


def test_the_validation_rejects_what_a_cluster_would():
    objects = rendered("overlays/production")
    deployment = yaml.safe_load(yaml.safe_dump(one(objects, "Deployment", "finetune-serve-api")))
    container(deployment)["readinessProbe"]["httpGet"]["paht"] = "/readyz"  # a misspelt field, deep down
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        validate(deployment)
    deployment = yaml.safe_load(yaml.safe_dump(one(objects, "Deployment", "finetune-serve-api")))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="two"):
        validate(deployment)

    monitor = one(objects, "ServiceMonitor")
    misspelt = yaml.safe_load(yaml.safe_dump(monitor))
    misspelt["spec"]["endpoints"][0]["pth"] = misspelt["spec"]["endpoints"][0].pop("path")
    with pytest.raises(jsonschema.ValidationError, match="pth"):
        validate(misspelt)
    bad_interval = yaml.safe_load(yaml.safe_dump(monitor))
    bad_interval["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad_interval)


# --- what every pod promises ---------------------------------------------------------------------

@pytest.mark.parametrize("name", RENDERED)
def test_every_container_is_locked_down_probed_and_sized(name):
    objects = rendered(name)
    assert deployments(objects)
    for deployment in deployments(objects):
        where = f"{name}: {deployment['metadata']['name']}"
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == BENTO_UID and pod["securityContext"]["fsGroup"] == BENTO_UID, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["enableServiceLinks"] is False, where  # no FINETUNE_SERVE_*_PORT from Service names
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert c["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}, where
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert quantity(requests[resource]) <= quantity(limits[resource]), (where, resource)
            assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu"), where

            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports == {"http": PORT}, where
            for probe, path in (("startupProbe", "/livez"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
                assert c[probe]["httpGet"] == {"path": path, "port": "http"}, (where, probe)
            # Startup: time enough to import torch; readiness leaves the pod out of the Service quickly.
            assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120, where
            sleep, seconds = c["lifecycle"]["preStop"]["exec"]["command"]
            assert sleep == "sleep" and int(seconds) >= 5, where
            assert pod["terminationGracePeriodSeconds"] > int(seconds), where

            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"] if not m.get("readOnly")}
            assert "emptyDir" in mounts["/tmp"], where

            def writable(path: str) -> dict:
                under = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
                assert under, f"{where}: {path} lies on the read-only root filesystem"
                return mounts[max(under, key=len)]

            env = environment(objects, c)
            for variable in ("FINETUNE_SERVE_HOME", "FINETUNE_SERVE_CACHE", "BENTOML_HOME", "XDG_CACHE_HOME",
                             "MPLCONFIGDIR"):
                writable(env[variable]["value"])
            assert "persistentVolumeClaim" in writable(env["FINETUNE_SERVE_HOME"]["value"]), where
            assert "emptyDir" in writable(env["FINETUNE_SERVE_CACHE"]["value"]), where
            assert env["BENTOML_DO_NOT_TRACK"] == {"value": "true"}, where
            if "Trainer" not in c["args"][2]:  # whatever serves the API asks for the key
                api_key = env["FINETUNE_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
                assert (api_key["name"], api_key["key"]) == ("finetune-serve", "api-key"), where


@pytest.mark.parametrize("name", RENDERED)
def test_every_setting_the_manifests_give_is_one_the_service_reads(name):
    objects = rendered(name)
    for deployment in deployments(objects):
        env = environment(objects, container(deployment))
        given = {k.removeprefix(PREFIX).lower(): v for k, v in env.items() if k.startswith(PREFIX)}
        unknown = set(given) - set(Settings.model_fields)
        assert not unknown, f"{name}: {deployment['metadata']['name']} sets {unknown}, which service/settings.py lacks"
        for field, source in given.items():
            if "valueFrom" in source:
                assert source["valueFrom"]["secretKeyRef"]["name"] == "finetune-serve", field
        # The plain values pass the service's own checks (SettingsError names the variable otherwise).
        Settings(**{field: source["value"] for field, source in given.items() if "value" in source})


def bento_services(import_path: str) -> dict:
    """The BentoML services one `bentoml serve <import_path>` runs: its own and those it runs in-process."""
    module, _, attribute = import_path.partition(":")
    service = getattr(importlib.import_module(module), attribute)
    return service.all_services(exclude_urls=True)


@pytest.mark.parametrize("name", RENDERED)
def test_termination_outlasts_the_longest_request(name):
    """A pod drains: after the preStop sleep, BentoML finishes the requests it holds within the grace period."""
    for deployment in deployments(rendered(name)):
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        served = c["args"][c["args"].index("serve") + 1]
        assert c["args"] == ["bentoml", "serve", served, "--port", str(PORT)]
        assert c["workingDir"] == BENTO_SOURCE
        timeout = max({**BENTOML_SERVICE_DEFAULTS["traffic"], **s.config.get("traffic", {})}["timeout"]
                      for s in bento_services(served).values())
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + timeout + 10, \
            f"{name}: {deployment['metadata']['name']} ({served}) may be killed mid-request"


@pytest.mark.parametrize("name", RENDERED)
def test_services_policies_and_monitoring_point_at_real_pods(name):
    objects = rendered(name)
    pods = [(d["spec"]["template"]["metadata"]["labels"], container(d)) for d in deployments(objects)]
    for service in (o for o in objects if o["kind"] == "Service"):
        chosen = [c for labels, c in pods if selects(service["spec"]["selector"], labels)]
        assert chosen, f"{name}: Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            assert all(port["targetPort"] in {p["name"] for p in c["ports"]} for c in chosen), port
    for deployment in deployments(objects):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        claims = [v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [one(objects, "PersistentVolumeClaim")["metadata"]["name"]]
        assert any(selects(p["spec"]["podSelector"]["matchLabels"], labels)
                   for p in objects if p["kind"] == "NetworkPolicy"), f"{name}: no NetworkPolicy for {labels}"
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        scraped = [s for s in objects if s["kind"] == "Service" and selects(monitor["spec"]["selector"]["matchLabels"],
                                                                            s["metadata"]["labels"])]
        assert {s["metadata"]["name"] for s in scraped} == {s["metadata"]["name"] for s in objects if s["kind"] == "Service"}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in scraped)


# --- the overlays ------------------------------------------------------------------------------------

def test_dev_is_make_run_in_one_pod():
    objects = rendered("overlays/dev")
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy",
                                                  "PersistentVolumeClaim", "Service"]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    c = container(deployment)
    make_run = re.search(r"bentoml serve (\S+)", (REPO / "Makefile").read_text()).group(1)
    assert c["args"][2] == make_run == "service.bento:FinetuneServe"
    env = environment(objects, c)
    assert "FINETUNE_SERVE_DATABASE_URL" not in env  # SQLite in FINETUNE_SERVE_HOME
    assert "FINETUNE_SERVE_TRAINER_URL" not in env  # the trainer runs in this pod
    assert env["FINETUNE_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True  # open until the Secret exists
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(objects).replace("nvidia.com/gpu.present", "")
    assert one(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_production_splits_the_api_from_gpu_trainers():
    objects = rendered("overlays/production")
    api, trainer = one(objects, "Deployment", "finetune-serve-api"), one(objects, "Deployment", "finetune-serve-trainer")
    api_c, trainer_c = container(api), container(trainer)
    assert api_c["args"][2] == "service.bento:Api" and trainer_c["args"][2] == "service.bento:Trainer"
    api_env, trainer_env = environment(objects, api_c), environment(objects, trainer_c)
    for env in (api_env, trainer_env):
        database = env["FINETUNE_SERVE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert database == {"name": "finetune-serve", "key": "database-url"}  # PostgreSQL, required
    assert "optional" not in api_env["FINETUNE_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]  # never an open API
    # Its policy admits the API pods alone, and its /wake and /status ask for the API's key, which the API sends.
    assert trainer_env["FINETUNE_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "finetune-serve",
                                                                                 "key": "api-key"}
    assert one(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]

    # The API wakes the trainers through their Service; the network policies let it.
    url = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", api_env["FINETUNE_SERVE_TRAINER_URL"]["value"])
    trainer_service = one(objects, "Service", url.group(1))
    (port,) = trainer_service["spec"]["ports"]
    assert port["port"] == int(url.group(2))
    trainer_labels = trainer["spec"]["template"]["metadata"]["labels"]
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    assert selects(trainer_service["spec"]["selector"], trainer_labels)
    api_policy = one(objects, "NetworkPolicy", "finetune-serve-api")
    assert any(any(selects(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), trainer_labels)
                   for peer in rule.get("to", [])) and port["targetPort"] in [p["port"] for p in rule["ports"]]
               for rule in api_policy["spec"]["egress"])
    trainer_policy = one(objects, "NetworkPolicy", "finetune-serve-trainer")
    assert any(selects(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), api_labels)
               for rule in trainer_policy["spec"]["ingress"] for peer in rule["from"])

    # GPUs on the trainers alone, on GPU nodes, all of them visible to the training worker.
    gpus = trainer_c["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and trainer_c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert "nvidia.com/gpu" not in api_c["resources"]["limits"]
    trainer_pod = trainer["spec"]["template"]["spec"]
    assert trainer_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in trainer_pod["tolerations"]
    # BentoML hands the Trainer's worker as many of the pod's GPUs as its resources ask.
    assert trainer_env["FINETUNE_SERVE_TRAINER_DEVICES"] == {"value": gpus}
    assert trainer["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # a rollout never asks for spare GPUs
    assert "/dev/shm" in {m["mountPath"] for m in trainer_c["volumeMounts"]}
    assert api_c["image"].rsplit(":", 1)[0] + "-gpu" == trainer_c["image"].rsplit(":", 1)[0]


def test_production_autoscales_on_cpu_and_the_adapters_latency_metric():
    objects = rendered("overlays/production")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "finetune-serve-api"}
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a node drain can always proceed
    assert selects(pdb["spec"]["selector"]["matchLabels"],
                   one(objects, "Deployment", "finetune-serve-api")["spec"]["template"]["metadata"]["labels"])

    # The custom metric is the one prometheus-adapter-values.yaml makes, from BentoML's request histogram.
    adapter = yaml.safe_load((K8S / "overlays/production/prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert metrics["Pods"]["pods"]["metric"]["name"] == rule["name"]["as"]
    api = container(one(objects, "Deployment", "finetune-serve-api"))
    namespaces = {{**BENTOML_SERVICE_DEFAULTS["metrics"], **s.config.get("metrics", {})}["namespace"]
                  for s in bento_services(api["args"][2]).values()}
    (histogram,) = {namespace + "_request_duration_seconds_bucket" for namespace in namespaces}
    assert rule["seriesQuery"].startswith(histogram + "{")
    assert re.fullmatch(rule["name"]["matches"], histogram)
    assert "/predict" in rule["metricsQuery"]


# --- the images --------------------------------------------------------------------------------------

def build_bento(tmp_path: Path, bentofile: str) -> Path:
    home = tmp_path / "bentoml"
    env = dict(os.environ, BENTOML_HOME=str(home), **OFFLINE)
    done = subprocess.run([str(BENTOML), "build", "-f", bentofile, "--output", "tag", "."], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=BUILD_SECONDS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tag = next(line for line in done.stdout.splitlines() if line.startswith("__tag__:")).removeprefix("__tag__:")
    name, version = tag.split(":")
    return home / "bentos" / name / version


def dockerfile_says(bento: Path) -> dict:
    """What the Dockerfile that `bentoml containerize` builds from says; generated as it does, no Docker needed."""
    with construct_containerfile(Bento.from_path(str(bento)), enable_buildkit=True) as (_, dockerfile):
        text = Path(dockerfile).read_text()
    return {
        "from": re.findall(r"^FROM (\S+)", text, re.M),
        "uid": int(re.search(r"^ARG BENTO_USER_UID=(\d+)$", text, re.M).group(1)),
        "user": re.findall(r"^USER (\S+)$", text, re.M),
        "bento_path": re.search(r"^ARG BENTO_PATH=(\S+)$", text, re.M).group(1),
        "expose": [int(p) for p in re.findall(r"^EXPOSE (\d+)$", text, re.M)],
        "entrypoint": re.search(r"^ENTRYPOINT \[ \"(\S+)\" \]$", text, re.M).group(1),
        "installs": re.search(r"pip install -r (\S+)", text).group(1),
        "env": dict(re.findall(r"^ENV (\w+)=(.*)$", text, re.M)),
        "args": dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M)),
    }


def requirement_names(bento: Path) -> list[str]:
    return [line for line in (bento / "env/python/requirements.txt").read_text().splitlines() if line]


def test_bento_image(tmp_path):
    """What `bentoml containerize finetune-serve:latest` builds, and that the manifests run it as it is."""
    bento = build_bento(tmp_path, "bentofile.yaml")
    docker = dockerfile_says(bento)
    assert docker["from"] == ["python:3.11-slim"]
    assert docker["user"] == ["bentoml"] and docker["uid"] == BENTO_UID
    assert docker["bento_path"] + "/src" == BENTO_SOURCE
    assert PORT in docker["expose"]
    assert docker["installs"] == "$BENTO_PATH/env/python/requirements.txt"
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert requirement_names(bento) == bentofile["python"]["packages"] + [f"bentoml=={importlib.metadata.version('bentoml')}"]
    for module in ("service/bento.py", "service/settings.py", "finetune_core/train.py"):
        assert (bento / "src" / module).is_file(), module

    # The entrypoint runs the manifests' args as they are; a first argument `serve` would get the
    # Bento's path appended after the import path (so the manifests start with `bentoml`).
    entrypoint = bento / "env/docker/entrypoint.sh"
    assert docker["entrypoint"] == docker["bento_path"] + "/env/docker/entrypoint.sh"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "bentoml").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "bentoml").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "BENTO_PATH": docker["bento_path"]}

    def entrypoint_runs(*args: str) -> str:
        done = subprocess.run(["bash", str(entrypoint), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    for name in RENDERED:
        for deployment in deployments(rendered(name)):
            args = container(deployment)["args"]
            assert entrypoint_runs(*args) == " ".join(args[1:])
    assert entrypoint_runs("serve", "service.bento:Api").endswith(docker["bento_path"])


def test_gpu_bento_image(tmp_path):
    """bentofile.gpu.yaml: the same Bento, with ONNX Runtime's CUDA build, for the trainer pods."""
    cpu = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    gpu = yaml.safe_load((REPO / "bentofile.gpu.yaml").read_text())
    swaps = {"onnxruntime>=1.20": "onnxruntime-gpu[cuda,cudnn]>=1.31",  # onnxruntime-genai asks for onnxruntime,
             "onnxruntime-genai>=0.18": "onnxruntime-genai-cuda>=0.18"}  # its CUDA build for onnxruntime-gpu
    assert [p for p in cpu["python"]["packages"] if p.startswith("onnxruntime")] == list(swaps)
    assert gpu["python"]["packages"] == [swaps.get(p, p) for p in cpu["python"]["packages"]]
    assert gpu["name"] == cpu["name"] + "-gpu"
    assert {k: v for k, v in gpu.items() if k not in ("name", "description", "python", "envs")} == \
           {k: v for k, v in cpu.items() if k not in ("name", "description", "python", "envs")}
    assert {k: v for k, v in gpu["python"].items() if k != "packages"} == \
           {k: v for k, v in cpu["python"].items() if k != "packages"}
    # onnxruntime-gpu 1.31 is built for CUDA 13 (its [cuda] extra asks nvidia-cuda-runtime~=13.0); the
    # pinned torch from PyPI must be the CUDA 13 build, so that both load one CUDA runtime and one cuDNN.
    torch_pin = next(p for p in cpu["python"]["packages"] if p.startswith("torch=="))
    assert importlib.metadata.version("torch") == torch_pin.removeprefix("torch==")
    assert any(r.startswith("nvidia-cudnn-cu13") for r in importlib.metadata.requires("torch"))

    bento = build_bento(tmp_path, "bentofile.gpu.yaml")
    docker = dockerfile_says(bento)
    assert docker["from"] == ["python:3.11-slim"] and docker["uid"] == BENTO_UID
    assert docker["args"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert docker["env"]["NVIDIA_DRIVER_CAPABILITIES"] == "$NVIDIA_DRIVER_CAPABILITIES"
    requirements = requirement_names(bento)
    assert "onnxruntime-gpu[cuda,cudnn]>=1.31" in requirements and "onnxruntime-genai-cuda>=0.18" in requirements
    assert not [r for r in requirements if re.match(r"onnxruntime\b(?!-)", r) or r.startswith("onnxruntime-genai>")]
    trainer = one(rendered("overlays/production"), "Deployment", "finetune-serve-trainer")
    assert container(trainer)["image"].split("/")[-1].split(":")[0] == bento.parent.name


def test_the_readmes_kubernetes_section_names_what_exists():
    readme = (REPO / "README.md").read_text()
    section = re.search(r"\n## Kubernetes\n(.*?)\n## ", readme, re.S).group(1)
    for path in set(re.findall(r"\b(k8s/[\w./-]*\w|bentofile[\w.]*\.yaml)", section)):
        assert (REPO / path).exists(), f"README.md, Kubernetes: {path} does not exist"
    containerized = set(re.findall(r"containerize\s+\S+\s+-t\s+(registry\.example\.com/\S+)", section))
    production = {container(d)["image"] for d in deployments(rendered("overlays/production"))}
    assert containerized == production
    dev = {container(d)["image"] for d in deployments(rendered("overlays/dev"))}
    assert dev == set(re.findall(r"containerize\s+\S+\s+-t\s+(finetune-serve:[\w.-]+)", section))
