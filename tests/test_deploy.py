"""deploy/: every file parses, Kubernetes manifests validate offline, alert rules and dashboard
queries are well-formed, every metric they name is one the server exports, and the Dockerfile
and Deployments keep the properties the README promises (non-root, probes on /health, a grace
period that covers preStop + the server's shutdown timeout, a GPU variant that asks for a GPU).

Each check that could hide a mistake has a test that feeds it a broken input and sees it fail.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("prometheus_client")

from kubernetes_validate.utils import ValidationError  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from course_lib.serving.metrics import ServerMetrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
#: Kubernetes versions the manifests must validate against (schemas bundled with
#: kubernetes-validate, strict mode: unknown fields are errors): the oldest we support and the
#: newest it ships, fixed so a kubernetes-validate upgrade can't change the verdict silently.
K8S_VERSIONS = ("1.30", "1.37")

YAML_FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))
JSON_FILES = sorted(DEPLOY.rglob("*.json"))
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ADAPTER = DEPLOY / "prometheus" / "prometheus-adapter-values.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
HPA = DEPLOY / "k8s" / "hpa.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"


def _docs(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under deploy/ (a document with apiVersion and kind)."""
    return [(p, d) for p in YAML_FILES for d in _docs(p)
            if isinstance(d, dict) and "apiVersion" in d and "kind" in d]


def _kind(kind: str) -> list[dict]:
    return [d for _, d in _manifests() if d["kind"] == kind]


def test_files_exist():
    for path in (DOCKERFILE, ALERTS, ADAPTER, PROMETHEUS, DASHBOARD, HPA, DEPLOY / "README.md",
                 DEPLOY / "k8s" / "deployment.yaml", DEPLOY / "k8s" / "deployment-gpu.yaml",
                 DEPLOY / "k8s" / "service.yaml", ROOT / ".dockerignore"):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


# ------------------------------------------------------------------ parsing and k8s schemas
@pytest.mark.parametrize("path", YAML_FILES + JSON_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_file_parses(path):
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    else:
        assert _docs(path), f"{path.name}: no YAML documents"


def test_manifests_validate_offline():
    manifests = _manifests()
    kinds = sorted(d["kind"] for _, d in manifests)
    assert kinds.count("Deployment") == 2 and {"Service", "HorizontalPodAutoscaler"} <= set(kinds)
    for path, doc in manifests:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                pytest.fail(f"{path.name} {doc['kind']} (k8s {version}): {where}: {e.message}")


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        readinessprobe=d["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")),
    lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="45s"),
    lambda d: d["spec"].pop("selector"),
], ids=["misspelled-field", "wrong-type", "missing-required"])
def test_broken_manifest_fails_validation(mutate):
    broken = copy.deepcopy(_docs(DEPLOY / "k8s" / "deployment.yaml")[0])
    mutate(broken)
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# ------------------------------------------------------------------ PromQL
_PAIRS = {")": "(", "]": "[", "}": "{"}


def promql_problem(expr: str) -> str | None:
    """Why ``expr`` is not well-formed PromQL, or None. Brackets and quotes are always
    checked; with the optional ``promql_parser`` package installed, the full grammar too."""
    stack: list[str] = []
    quote = None
    for i, ch in enumerate(expr):
        if quote:
            if ch == quote and expr[i - 1] != "\\":
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in _PAIRS:
            if not stack or stack.pop() != _PAIRS[ch]:
                return f"unbalanced {ch!r} at {i}"
    if quote or stack:
        return f"unclosed {quote or stack[-1]!r}"
    if not expr.strip():
        return "empty expression"
    try:
        import promql_parser
    except ImportError:
        return None
    try:
        promql_parser.parse(expr)
    except ValueError as e:
        return f"PromQL: {e}"
    return None


def test_promql_check_can_fail():
    assert promql_problem("sum(rate(vllm:x_bucket[5m]))") is None
    assert promql_problem("sum(rate(vllm:x_bucket[5m])") is not None
    assert promql_problem("sum(rate(vllm:x_bucket[5m)))") is not None
    assert promql_problem('rate(x{a="(("}[5m])') is None      # brackets inside strings ignored
    try:
        import promql_parser  # noqa: F401
    except ImportError:
        return
    assert promql_problem("rate(vllm:x_bucket[5m]) >") is not None  # grammar, not brackets


def _grafana_exprs() -> list[str]:
    """Dashboard queries with Grafana's variables replaced by values PromQL accepts."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"].removeprefix("label_values(").rsplit(",", 1)[0]
              for v in dash["templating"]["list"] if v["type"] == "query"]
    subs = {"$__rate_interval": "5m", "$__interval": "1m", "$model_name": ".*"}
    out = []
    for e in exprs:
        for var, value in subs.items():
            e = e.replace(var, value)
        out.append(e)
    return out


def _alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
            for r in g["rules"]]


def test_alert_rules_structure():
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(doc) == {"groups"} and doc["groups"]
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    alerts = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group.keys()
        assert group["rules"], f"group {group['name']} has no rules"
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels",
                                 "annotations"}, rule.keys()
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
            assert re.fullmatch(r"(\d+[smhdwy])+", rule["for"]), (rule["alert"], rule["for"])
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert promql_problem(rule["expr"]) is None, (rule["alert"],
                                                          promql_problem(rule["expr"]))
            alerts.append(rule["alert"])
    assert len(alerts) == len(set(alerts)), "alert names must be unique"
    # The chapter's alerts (latency, errors, utilisation) plus the queue.
    text = " ".join(r["expr"] for r in _alert_rules())
    for metric in ("vllm:e2e_request_latency_seconds_bucket", 'finished_reason="abort"',
                   "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"):
        assert metric in text, f"no alert uses {metric}"


@pytest.mark.parametrize("expr", _grafana_exprs())
def test_dashboard_queries_parse(expr):
    assert promql_problem(expr) is None, promql_problem(expr)


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    text = json.dumps(dash)
    for needed in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                   "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total",
                   "vllm:generation_tokens_total", "vllm:num_requests_running",
                   "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:num_preemptions_total", "by (finished_reason)"):
        assert needed in text, f"dashboard has no panel on {needed}"


# ------------------------------------------------------------------ metric names
_METRIC = re.compile(r"vllm:[A-Za-z_][A-Za-z0-9_:]*")


def exported_sample_names() -> set[str]:
    """Every series name the server's /metrics shows once a request has finished."""
    metrics = ServerMetrics("tiny", lambda: {})
    metrics.observe_finished({"ttft": 0.05, "e2e": 0.4, "queue_time": 0.01, "itl": [0.02, 0.03]},
                             "stop")
    text = metrics.render().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def unexported_names(text: str, exported: set[str]) -> set[str]:
    return {m.rstrip(":") for m in _METRIC.findall(text)} - exported


def test_unexported_name_would_be_reported():
    exported = exported_sample_names()
    assert {"vllm:e2e_request_latency_seconds_bucket", "vllm:request_success_total",
            "vllm:num_requests_waiting", "vllm:generation_tokens_total"} <= exported
    assert unexported_names("rate(vllm:e2e_request_latency_seconds_bucket[5m])", exported) == set()
    assert unexported_names("rate(vllm:gpu_cache_usage_perc[5m]) > 0",
                            exported) == {"vllm:gpu_cache_usage_perc"}
    # A family name is not a series: the histogram's name without _bucket is reported.
    assert unexported_names('"^vllm:time_to_first_token_seconds$"',
                            exported) == {"vllm:time_to_first_token_seconds"}


@pytest.mark.parametrize("path", [ALERTS, ADAPTER, HPA, DASHBOARD, PROMETHEUS],
                         ids=lambda p: p.name)
def test_referenced_metrics_are_exported(path):
    text = path.read_text(encoding="utf-8")
    assert unexported_names(text, exported_sample_names()) == set()


def test_hpa_metric_is_the_adapters_renamed_series():
    exported = exported_sample_names()
    rules = yaml.safe_load(ADAPTER.read_text(encoding="utf-8"))["rules"]["custom"]
    renamed = {}
    for rule in rules:
        series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"]).group(0)
        assert series in exported, series
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series), rule["name"]
        assert 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]
        renamed[rule["name"]["as"]] = series
    (hpa,) = _kind("HorizontalPodAutoscaler")
    pod_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]
                   if m["type"] == "Pods"]
    assert pod_metrics and all(name in renamed for name in pod_metrics), (pod_metrics, renamed)
    assert renamed[pod_metrics[0]] == "vllm:num_requests_waiting"
    # ... and the Prometheus job gives the series the namespace/pod labels the adapter needs.
    jobs = {j["job_name"]: j for j in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    k8s = [j for j in jobs.values() if "kubernetes_sd_configs" in j]
    assert k8s, "no kubernetes_sd job in prometheus.yml"
    targets = {r.get("target_label") for r in k8s[0]["relabel_configs"]}
    assert {"namespace", "pod"} <= targets


def test_prometheus_config():
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS.parent / rule_file).is_file(), rule_file
    names = [j["job_name"] for j in config["scrape_configs"]]
    assert len(names) == len(set(names))
    assert any("static_configs" in j for j in config["scrape_configs"])


# ------------------------------------------------------------------ Dockerfile
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_problems(text: str) -> list[str]:
    ins = dockerfile_instructions(text)
    get = lambda name: [a for i, a in ins if i == name]  # noqa: E731
    problems = []
    users = get("USER")
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append("no non-root USER")
    if not any("/health" in a for a in get("HEALTHCHECK")):
        problems.append("HEALTHCHECK does not check /health")
    if "8000" not in " ".join(get("EXPOSE")).split():
        problems.append("no EXPOSE 8000")
    if get("STOPSIGNAL") != ["SIGTERM"]:
        problems.append("STOPSIGNAL is not SIGTERM")
    args = " ".join(get("ARG"))
    if "TORCH_INDEX" not in args or "BASE" not in args or get("FROM") != ["${BASE}"]:
        problems.append("no CUDA build args (ARG BASE for FROM, ARG TORCH_INDEX)")
    if [json.loads(a) for a in get("ENTRYPOINT")] != [["python", "-m", "course_lib", "serve"]]:
        problems.append("ENTRYPOINT is not the exec-form python -m course_lib serve")
    return problems


def test_dockerfile_properties():
    assert dockerfile_problems(DOCKERFILE.read_text(encoding="utf-8")) == []


def test_dockerfile_check_can_fail():
    good = DOCKERFILE.read_text(encoding="utf-8")
    assert "no non-root USER" in dockerfile_problems(good.replace("USER 10001:10001", "USER root"))
    assert "STOPSIGNAL is not SIGTERM" in dockerfile_problems(good.replace("STOPSIGNAL SIGTERM",
                                                                          "STOPSIGNAL SIGINT"))
    assert any("/health" in p for p in dockerfile_problems(good.replace("/health", "/")))


def test_dockerignore_lets_in_what_the_image_copies():
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    ins = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    sources = [s for i, a in ins if i == "COPY" for s in a.split()[:-1] if not s.startswith("--")]
    assert sources and set(sources) <= allowed, (sources, allowed)
    for source in sources:
        assert (ROOT / source).exists(), source


# ------------------------------------------------------------------ Deployments
def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _prestop_seconds(container: dict) -> float:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    if len(cmd) == 2 and cmd[0] == "sleep":
        return float(cmd[1])
    if len(cmd) == 3 and cmd[:2] in (["sh", "-c"], ["/bin/sh", "-c"]):
        words = shlex.split(cmd[2])
        if words[:1] == ["sleep"] and len(words) == 2:
            return float(words[1])
    return 0.0


def deployment_problems(deployment: dict) -> list[str]:
    """What keeps ``deployment`` from draining gracefully and being probed on /health."""
    spec = deployment["spec"]["template"]["spec"]
    c = _container(deployment)
    args = c.get("args", [])
    problems = []
    shutdown = _flag(args, "--shutdown-timeout")
    shutdown = float(shutdown) if shutdown is not None else 30.0  # the server's default
    prestop = _prestop_seconds(c)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if prestop <= 0:
        problems.append("no preStop sleep")
    if grace <= prestop + shutdown:
        problems.append(f"terminationGracePeriodSeconds {grace} <= preStop {prestop} + "
                        f"--shutdown-timeout {shutdown} (no margin)")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    port_arg = _flag(args, "--port")
    if port_arg is None or int(port_arg) not in ports.values() or _flag(args, "--host") != "0.0.0.0":
        problems.append("--port/--host do not match the container port (or host is not 0.0.0.0)")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c.get(probe, {}).get("httpGet", {})
        port = get.get("port")
        if get.get("path") != "/health" or ports.get(port, port) not in ports.values():
            problems.append(f"{probe} is not an httpGet on /health at the container port")
    live = c.get("livenessProbe", {})
    if live.get("periodSeconds", 10) * live.get("failureThreshold", 3) <= shutdown:
        problems.append("livenessProbe would restart a draining server (window <= shutdown)")
    env = {e["name"]: e for e in c.get("env", [])}
    if "secretKeyRef" not in env.get("COURSE_LIB_API_KEY", {}).get("valueFrom", {}):
        problems.append("COURSE_LIB_API_KEY does not come from a Secret")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") not in {str(p) for p in ports.values()}:
        problems.append("prometheus.io/port annotation is not the container port")
    if not spec.get("securityContext", {}).get("runAsNonRoot"):
        problems.append("pod does not require runAsNonRoot")
    return problems


def _deployments() -> dict[str, dict]:
    return {p.name: d for p, d in _manifests() if d["kind"] == "Deployment"}


def _gpus(deployment: dict) -> int:
    limits = _container(deployment).get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def test_deployments_drain_gracefully_and_probe_health():
    deployments = _deployments()
    assert set(deployments) == {"deployment.yaml", "deployment-gpu.yaml"}
    for name, deployment in deployments.items():
        assert deployment_problems(deployment) == [], name
    assert _gpus(deployments["deployment-gpu.yaml"]) >= 1
    assert _gpus(deployments["deployment.yaml"]) == 0


def test_deployment_check_can_fail():
    good = _deployments()["deployment.yaml"]
    short = copy.deepcopy(good)
    short["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    assert any("terminationGracePeriodSeconds" in p for p in deployment_problems(short))
    longer = copy.deepcopy(good)
    args = _container(longer)["args"]
    args[args.index("--shutdown-timeout") + 1] = "120"
    assert any("terminationGracePeriodSeconds" in p for p in deployment_problems(longer))
    wrong_path = copy.deepcopy(good)
    _container(wrong_path)["readinessProbe"]["httpGet"]["path"] = "/healthz"
    assert any("readinessProbe" in p for p in deployment_problems(wrong_path))
    wrong_port = copy.deepcopy(good)
    _container(wrong_port)["livenessProbe"]["httpGet"]["port"] = 9000
    assert any("livenessProbe" in p for p in deployment_problems(wrong_port))


def test_objects_point_at_each_other():
    (deployment,) = {d["metadata"]["name"]: d for d in _kind("Deployment")}.values()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service,) = _kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p.get("name") for p in _container(deployment)["ports"]}
    assert all(p["targetPort"] in port_names | {8000} for p in service["spec"]["ports"])
    (hpa,) = _kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    for pdb in _kind("PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The image's USER is the uid the pod runs as.
    user = [a for i, a in dockerfile_instructions(DOCKERFILE.read_text()) if i == "USER"][-1]
    ctx = deployment["spec"]["template"]["spec"]["securityContext"]
    assert str(ctx["runAsUser"]) == user.split(":")[0]


def test_args_parse_with_the_serve_command():
    """The Deployments' args and the Dockerfile's CMD parse with `course-lib serve`'s parser."""
    cli = pytest.importorskip("course_lib.cli")
    if not hasattr(cli, "build_parser"):
        pytest.skip("course_lib.cli has no build_parser()")
    cmd = [a for i, a in dockerfile_instructions(DOCKERFILE.read_text()) if i == "CMD"]
    arg_lists = {"Dockerfile CMD": json.loads(cmd[-1])}
    arg_lists |= {name: _container(d)["args"] for name, d in _deployments().items()}
    for where, args in arg_lists.items():
        try:
            parsed = cli.build_parser().parse_args(["serve", *args])
        except SystemExit:
            pytest.fail(f"{where}: `course-lib serve {' '.join(args)}` does not parse")
        assert parsed.host == "0.0.0.0" and parsed.port == 8000, where
        if "--shutdown-timeout" in args:
            assert float(parsed.shutdown_timeout) == float(_flag(args, "--shutdown-timeout"))
