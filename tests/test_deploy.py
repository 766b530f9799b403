"""The container image and the Kubernetes/KServe manifests (Dockerfile, deploy/).

Offline checks that a broken manifest fails: every core object against the
Kubernetes API's own schemas (kubernetes-validate, strict: unknown fields
rejected), KServe's ServingRuntime and InferenceService against our schemas
written from KServe's CRDs (deploy/schemas/, jsonschema). Then consistency
with the program: the container's flags parse with `keras-llm serve`'s own
parser, probes and scrape annotations name its ports and routes, the HPA's
metrics are gauges it exports, and a real server started the way the pod
starts it (the image's entry point, the Deployment's env and args) answers
the probes, the Dockerfile's HEALTHCHECK and a scrape, then drains on SIGTERM
within the pod's termination grace period.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from referencing import Registry, Resource

from keras_llm.serving.server import build_parser
from tests.helpers import free_ports

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# The oldest Kubernetes the manifests claim (gRPC probes, autoscaling/v2,
# policy/v1 are GA there) and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", "1.37")
CORE = ("models-pvc.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")
KSERVE = {"kserve/servingruntime.yaml": "servingruntime.v1alpha1.json",
          "kserve/inferenceservice.yaml": "inferenceservice.v1beta1.json"}
# KServe's defaults (pkg/constants/constants.go): where the storage
# initializer puts the model, and the HTTP port of a container without ports.
KSERVE_MODEL_DIR = "/mnt/models"
KSERVE_HTTP_PORT = 8080
ENTRYPOINT_SCRIPT = "deploy/docker-entrypoint.sh"


# ----- reading the files -----------------------------------------------------

def docs(name):
    with open(DEPLOY / name, encoding="utf-8") as handle:
        return [d for d in yaml.safe_load_all(handle) if d]


def doc(name, kind=None, metadata_name=None):
    found = [d for d in docs(name) if kind in (None, d.get("kind"))
             and metadata_name in (None, d.get("metadata", {}).get("name"))]
    assert len(found) == 1, (name, kind, metadata_name)
    return found[0]


def container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def dockerfile():
    """(instruction, rest) of each Dockerfile instruction, continuations joined."""
    instructions, pending = [], ""
    for line in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def instruction(word):
    found = [rest for w, rest in dockerfile() if w == word]
    assert len(found) == 1, word
    return found[0]


def dockerfile_env():
    env = {}
    for word, rest in dockerfile():
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def healthcheck():
    """The HEALTHCHECK's options and its command (exec form)."""
    options, _, command = instruction("HEALTHCHECK").partition(" CMD ")
    return dict(o.lstrip("-").split("=", 1) for o in options.split()), json.loads(command)


def kserve_validator(schema_file):
    schemas = [json.loads(p.read_text(encoding="utf-8"))
               for p in (DEPLOY / "schemas").glob("*.json")]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)
    schema = json.loads((DEPLOY / "schemas" / schema_file).read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validation_errors(name, manifest):
    """What is wrong with `manifest` (a document of file `name`), [] if nothing."""
    if name in KSERVE:
        return [e.message for e in kserve_validator(KSERVE[name]).iter_errors(manifest)]
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{version}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:  # no such kind in that version
            errors.append(f"{version}: {error.message}")
    return errors


def render_entrypoint(tmp_path, env, args=()):
    """The argv the image's entry point hands `keras-llm` (a stub that prints it)."""
    stub = tmp_path / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "keras-llm").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                    "print(json.dumps(sys.argv[1:]))\n")
    (stub / "keras-llm").chmod(0o755)
    out = subprocess.run(["sh", str(REPO / ENTRYPOINT_SCRIPT), *args], check=True,
                         capture_output=True, text=True,
                         env={"PATH": f"{stub}:{os.environ['PATH']}", **env})
    argv = json.loads(out.stdout)
    assert argv[0] == "serve"
    return argv[1:]


def env_of(spec_container):
    return {e["name"]: e["value"] for e in spec_container.get("env", [])}


def deployment_flags(tmp_path):
    """`keras-llm serve`'s parsed flags in the Deployment's pod."""
    c = container(doc("deployment.yaml"))
    assert "command" not in c  # the image's entry point
    env = {**dockerfile_env(), **env_of(c)}
    return build_parser().parse_args(render_entrypoint(tmp_path, env, c["args"]))


def runtime_flags():
    """`keras-llm serve`'s parsed flags in the KServe runtime's container,
    {{.Name}} replaced by the InferenceService's name."""
    c = doc("kserve/servingruntime.yaml")["spec"]["containers"][0]
    assert c["command"] == ["keras-llm", "serve"]
    name = doc("kserve/inferenceservice.yaml")["metadata"]["name"]
    return build_parser().parse_args([a.replace("{{.Name}}", name) for a in c["args"]])


def http_routes():
    """The HTTP server's routes (its Frontend over no server)."""
    from keras_llm.serving.http import Frontend  # pylint: disable=import-outside-toplevel

    return {route.path for route in Frontend(server=None).app.routes}


def exported_metrics():
    """Names of the metric families `keras-llm serve` defines."""
    from keras_llm.serving.server import Metrics  # pylint: disable=import-outside-toplevel

    return {family.name for family in Metrics(servables=None).registry.collect()}


def quantity(text):
    """A Kubernetes quantity ("4", "500m", "8Gi") as a number."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units.get(unit, 1)


def drain_budget_s(flags):
    """Longest SIGTERM drain: the engine, then gRPC, then HTTP each wait up
    to --grace_period_s (Server.drain), HTTP 5 s more (HTTPServer.stop)."""
    return 3 * flags.grace_period_s + 5


# ----- schemas ---------------------------------------------------------------

@pytest.mark.parametrize("name", CORE + tuple(KSERVE))
def test_every_manifest_is_valid(name):
    for manifest in docs(name):
        assert validation_errors(name, manifest) == [], (name, manifest["kind"])


def test_our_kserve_schemas_are_valid_json_schemas():
    for path in (DEPLOY / "schemas").glob("*.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text(encoding="utf-8")))


def _rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


BREAKAGES = {
    "readinessProbe misspelled": ("deployment.yaml", lambda d: _rename(
        container(d), "readinessProbe", "readinesProbe")),
    "terminationGracePeriodSeconds as a string": ("deployment.yaml", lambda d: d["spec"][
        "template"]["spec"].update(terminationGracePeriodSeconds="100")),
    "clusterIP misspelled": ("service.yaml", lambda d: _rename(d["spec"], "clusterIP",
                                                                "clusterIp")),
    "HPA target without its type": ("hpa.yaml", lambda d: d["spec"]["metrics"][0]["pods"][
        "target"].pop("type")),
    "PDB in policy/v1beta1 (removed)": ("pdb.yaml", lambda d: d.update(
        apiVersion="policy/v1beta1")),
    "supportedModelFormats misspelled": ("kserve/servingruntime.yaml", lambda d: _rename(
        d["spec"], "supportedModelFormats", "supportedModelFormat")),
    "no kserve-container": ("kserve/servingruntime.yaml", lambda d: d["spec"]["containers"][0]
                            .update(name="server")),
    "container field misspelled": ("kserve/servingruntime.yaml", lambda d: _rename(
        d["spec"]["containers"][0], "resources", "resource")),
    "storageUri misspelled": ("kserve/inferenceservice.yaml", lambda d: _rename(
        d["spec"]["predictor"]["model"], "storageUri", "storageURI")),
    "unknown protocol": ("kserve/inferenceservice.yaml", lambda d: d["spec"]["predictor"][
        "model"].update(protocolVersion="v3")),
    "cpu target above 100 %": ("kserve/inferenceservice.yaml", lambda d: d["spec"][
        "predictor"].update(scaleTarget=150)),
    "legacy deployment mode": ("kserve/inferenceservice.yaml", lambda d: d["metadata"][
        "annotations"].update({"serving.kserve.io/deploymentMode": "RawDeployment"})),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_manifest_fails_validation(breakage):
    name, damage = BREAKAGES[breakage]
    manifest = docs(name)[0]
    damage(manifest)
    assert validation_errors(name, manifest)


def test_the_kustomizations_list_every_manifest():
    assert sorted(doc("kustomization.yaml")["resources"]) == sorted(CORE)
    assert sorted(f"kserve/{r}" for r in doc("kserve/kustomization.yaml")["resources"]) == \
        sorted(KSERVE)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="no kubectl")
def test_what_kustomize_renders_is_valid():
    for directory, names in (("deploy", CORE), ("deploy/kserve", tuple(KSERVE))):
        rendered = subprocess.run(["kubectl", "kustomize", str(REPO / directory)], check=True,
                                  capture_output=True, text=True, timeout=60).stdout
        objects = [d for d in yaml.safe_load_all(rendered) if d]
        assert len(objects) == sum(len(docs(n)) for n in names)
        for manifest in objects:
            name = next((n for n in KSERVE if docs(n)[0]["kind"] == manifest["kind"]), CORE[0])
            assert validation_errors(name, manifest) == []


# ----- the image -------------------------------------------------------------

def _dockerignore_regex(pattern):
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token,
                                                                         re.escape(token))
    return re.compile(out)


def dockerignored(path):
    """Whether .dockerignore keeps `path` out of the build context (the last
    pattern matching it or a folder above it decides, as Docker's)."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        regex = _dockerignore_regex(pattern.lstrip("!"))
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerfile_installs_what_readme_installs_and_runs_as_a_user():
    assert instruction("FROM") == "python:3.11-slim"
    runs = [rest for word, rest in dockerfile() if word == "RUN"]
    assert any("pip install -r requirements.txt" in r for r in runs)
    assert any("pip install --no-deps ." in r for r in runs)
    user = instruction("USER").split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user)  # runAsNonRoot can check it
    assert instruction("EXPOSE").split() == ["8500", "8501"]
    pod = doc("deployment.yaml")["spec"]["template"]["spec"]["securityContext"]
    runtime = doc("kserve/servingruntime.yaml")["spec"]["containers"][0]["securityContext"]
    assert pod["runAsUser"] == runtime["runAsUser"] == int(user[0])
    assert pod["runAsNonRoot"] and runtime["runAsNonRoot"]


def test_the_build_context_holds_what_the_dockerfile_copies():
    copies = [shlex.split(rest) for word, rest in dockerfile() if word == "COPY"]
    sources = {s for *paths, _ in copies for s in paths}
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    package_dirs = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    package_dirs |= set(project["tool"]["setuptools"]["package-dir"].values())
    assert {"requirements.txt", "pyproject.toml", project["project"]["readme"],
            ENTRYPOINT_SCRIPT} | package_dirs <= sources
    tracked = subprocess.run(["git", "ls-files", *sorted(sources)], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
    assert tracked and not [p for p in tracked if dockerignored(p)]
    for path in ("tests/test_deploy.py", "notebooks", ".git/HEAD", "deploy/deployment.yaml",
                 "serving/__pycache__/server.cpython-311.pyc", "keras_llm.egg-info/PKG-INFO"):
        assert dockerignored(path), path
    entrypoint = json.loads(instruction("ENTRYPOINT"))
    assert [ENTRYPOINT_SCRIPT, entrypoint[0]] in copies and len(entrypoint) == 1
    assert os.access(REPO / ENTRYPOINT_SCRIPT, os.X_OK)


def test_the_image_defaults_parse_and_appended_flags_win(tmp_path):
    flags = build_parser().parse_args(render_entrypoint(tmp_path, dockerfile_env()))
    assert (flags.host, flags.port, flags.rest_api_port) == ("0.0.0.0", 8500, 8501)
    assert (flags.model_name, flags.model_base_path) == ("model", "/models/model")
    flags = build_parser().parse_args(render_entrypoint(
        tmp_path, {**dockerfile_env(), "MODEL_NAME": "m"}, ["--port=9000", "--max_slots=4"]))
    assert (flags.port, flags.max_slots, flags.model_base_path) == (9000, 4, "/models/m")
    options, command = healthcheck()
    assert command[:2] == ["python", "-c"] and "/health" in command[2]
    assert "REST_API_PORT" in command[2] and float(options["timeout"].rstrip("s")) > 4


# ----- the manifests against the server ----------------------------------------

def test_the_deployment_matches_the_server(tmp_path):
    deployment = doc("deployment.yaml")
    pod = deployment["spec"]["template"]
    c = container(deployment)
    flags = deployment_flags(tmp_path)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": flags.port, "http": flags.rest_api_port}
    assert flags.host == "0.0.0.0"  # the server's default, loopback, is unreachable
    routes = http_routes()
    for probe in ("startupProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["path"] in routes
        assert ports.get(get["port"], get["port"]) == flags.rest_api_port
    assert c["livenessProbe"]["grpc"]["port"] == flags.port  # grpc.health.v1, always on
    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == flags.rest_api_port
    assert annotations["prometheus.io/path"] in routes
    # the model: a read-only volume holding MODEL_BASE_PATH
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    models = next(m for m in mounts.values()
                  if flags.model_base_path.startswith(m["mountPath"].rstrip("/") + "/"))
    assert models["readOnly"] and volumes[models["name"]]["persistentVolumeClaim"][
        "claimName"] == doc("models-pvc.yaml")["metadata"]["name"]
    # read-only root: the XLA cache ($HOME/.cache/keras_llm) and /tmp are volumes
    assert c["securityContext"]["readOnlyRootFilesystem"]
    assert {dockerfile_env()["HOME"], "/tmp"} <= {m["mountPath"] for m in mounts.values()}
    # resources: threads = CPU limit, reload budget under the memory limit
    limits = c["resources"]["limits"]
    assert c["resources"]["requests"] == limits
    assert flags.num_threads == quantity(limits["cpu"])
    assert flags.reload_memory_budget_mb * 2**20 < quantity(limits["memory"])
    # termination: preStop, then the whole drain, before the kubelet's SIGKILL
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= (
        float(pre_stop[1]) + drain_budget_s(flags))


def test_the_services_hpa_and_pdb_select_the_pods(tmp_path):
    deployment = doc("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"]  # the HPA's
    port_names = {p["name"] for p in container(deployment)["ports"]}
    flags = deployment_flags(tmp_path)
    headless = doc("service.yaml", metadata_name="keras-llm")
    assert headless["spec"]["clusterIP"] == "None"
    for service in docs("service.yaml"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
            assert port["port"] == {"grpc": flags.port, "http": flags.rest_api_port}[
                port["targetPort"]]
    pdb = doc("pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = doc("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    targets = {m["pods"]["metric"]["name"]: quantity(m["pods"]["target"]["averageValue"])
               for m in hpa["spec"]["metrics"]}
    assert set(targets) == {"keras_llm_requests_waiting", "keras_llm_requests_running"}
    assert set(targets) <= exported_metrics()
    assert targets["keras_llm_requests_running"] <= flags.max_slots


def test_the_prometheus_adapter_serves_the_hpa_metrics():
    rules = doc("prometheus-adapter-values.yaml")["rules"]["custom"]
    for metric in doc("hpa.yaml")["spec"]["metrics"]:
        name = metric["pods"]["metric"]["name"]
        rule = next(r for r in rules if r["name"]["as"] == name)
        assert re.fullmatch(rule["name"]["matches"], name)
        assert rule["seriesQuery"].startswith(name + "{")
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.GroupBy>>" in rule["metricsQuery"]


def test_the_kserve_runtime_matches_the_server_and_the_inference_service():
    runtime = doc("kserve/servingruntime.yaml")
    isvc = doc("kserve/inferenceservice.yaml")
    c = runtime["spec"]["containers"][0]
    flags = runtime_flags()
    assert flags.host == "0.0.0.0" and flags.model_name == isvc["metadata"]["name"]
    assert "ports" not in c and flags.rest_api_port == KSERVE_HTTP_PORT
    assert flags.model_base_path == KSERVE_MODEL_DIR
    routes = http_routes()
    get = c["readinessProbe"]["httpGet"]
    assert get["path"] == "/health" and get["port"] == flags.rest_api_port
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == flags.rest_api_port
    assert annotations["prometheus.kserve.io/path"] in routes
    assert flags.num_threads == quantity(c["resources"]["limits"]["cpu"])
    assert c["image"] == container(doc("deployment.yaml"))["image"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in
                                           runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] >= drain_budget_s(flags)


# ----- a real server, started as the pod starts it -----------------------------

def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_a_server_started_as_the_pod_answers_probes_healthcheck_and_scrape(tmp_path):
    from keras_llm.export.saved_model import export_model  # pylint: disable=import-outside-toplevel
    from tests.helpers import tiny_language_model  # pylint: disable=import-outside-toplevel

    deployment = doc("deployment.yaml")
    c = container(deployment)
    env = {**os.environ, **dockerfile_env(), **env_of(c)}
    export_model(tiny_language_model(seed=5, merges=["h e"]), tmp_path / "models",
                 env["MODEL_NAME"], max_new_tokens=4, progress=False)
    grpc_port, rest_port = free_ports(2)
    (tmp_path / "home").mkdir()
    env.update(MODEL_BASE_PATH=str(tmp_path / "models"), GRPC_PORT=str(grpc_port),
               REST_API_PORT=str(rest_port), KERAS_LLM_HOST="127.0.0.1",
               HOME=str(tmp_path / "home"),
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    started = time.monotonic()
    proc = subprocess.Popen(["sh", str(REPO / ENTRYPOINT_SCRIPT), *c["args"]], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        ready = f"http://127.0.0.1:{rest_port}{c['readinessProbe']['httpGet']['path']}"
        status = None
        while status != 200 and time.monotonic() - started < 180:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                status, _ = _get(ready)
            except OSError:
                time.sleep(0.3)
        assert status == 200
        _, command = healthcheck()  # Docker runs it in the container's environment
        assert subprocess.run(command, env=env, timeout=30).returncode == 0
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # the liveness probe
            request = health_pb2.HealthCheckRequest(
                service=c["livenessProbe"]["grpc"].get("service", ""))
            answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        status, text = _get(f"http://127.0.0.1:{rest_port}{annotations['prometheus.io/path']}")
        assert status == 200
        for metric in doc("hpa.yaml")["spec"]["metrics"]:
            name = metric["pods"]["metric"]["name"]
            assert re.search(rf'^{name}{{model="{env["MODEL_NAME"]}"}} \d', text, re.M), name
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends after preStop
        budget = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert proc.wait(timeout=budget) == 0
        assert '"event": "stopped"' in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
