"""docker-compose.yml, deploy/k8s and deploy/Dockerfile agree with the service: every
CRM_ERP_SYNC_* variable they set is a setting and valid, every command exists, endpoints,
ports, probes, labels and names line up. No network needed (.ci/validate-deploy adds
kubeconform against the Kubernetes schemas, and `docker compose config` where it can)."""

from __future__ import annotations

import dataclasses
import operator
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from service.cli import build_parser
from service.settings import CONFIG_FILE_VAR, ENV_PREFIX, Settings
from tests.conftest import KAFKA_IMAGE

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s" / "base"
EXAMPLES = REPO / "deploy" / "k8s" / "examples"
SETTINGS_VARS = {Settings.env_var(f.name) for f in dataclasses.fields(Settings)}
SECRET_VARS = {Settings.env_var(f.name) for f in dataclasses.fields(Settings)
               if f.metadata.get("secret")}


def sync_vars(env: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k.startswith(ENV_PREFIX)}


def assert_known_and_valid(env: dict[str, str], where: str) -> Settings:
    unknown = set(env) - SETTINGS_VARS - {CONFIG_FILE_VAR}
    assert not unknown, f"{where} sets variables that are no setting: {sorted(unknown)}"
    return Settings.from_env(env)  # raises ConfigError naming a bad one


def assert_command(args: list[str], where: str) -> None:
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `crm-erp-sync {' '.join(args)}` is no command") from exc


# ---- docker-compose.yml ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def test_compose_has_the_whole_sync(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "crm-db", "erp-db", "setup", "producer", "consumer",
            "crm-writer"} <= set(services)
    assert services["kafka"]["image"] == KAFKA_IMAGE
    assert services["crm-db"]["image"] == services["erp-db"]["image"] == "postgres:15"
    assert "wal_level=logical" in services["crm-db"]["command"]
    assert services["consumer"]["deploy"]["replicas"] == 2
    assert services["producer"]["deploy"]["replicas"] == 2
    for name in ("kafka", "crm-db", "erp-db", "producer", "consumer"):
        assert "healthcheck" in services[name], name
    for name in ("producer", "consumer", "crm-writer"):
        assert services[name]["depends_on"]["setup"]["condition"] == \
            "service_completed_successfully"


def test_compose_and_the_docker_tests_run_the_kafka_of_the_local_stack() -> None:
    """newcomer6 F13: the tests run on the local stack's Kafka (deploy/local/pom.xml); compose
    and the testcontainers fallback use the official image of that same version."""
    version = re.search(r"<kafka\.version>([^<]+)</kafka\.version>",
                        (REPO / "deploy" / "local" / "pom.xml").read_text())
    assert version is not None
    assert f"apache/kafka:{version.group(1)}" == KAFKA_IMAGE


def test_compose_environment_matches_the_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    own = {n: s for n, s in services.items() if s.get("image") == "crm-erp-sync:local"}
    assert set(own) == {"setup", "producer", "consumer", "crm-writer"}
    for name, service in own.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (REPO / service["build"]["dockerfile"]).is_file()
        assert_command(service["command"], f"compose service {name}")
        settings = assert_known_and_valid(sync_vars(service["environment"]), name)
        # The endpoints name services of this file, with their ports and credentials.
        host, port = settings.kafka_bootstrap.split(":")
        kafka_env = services[host]["environment"]
        assert f"PLAINTEXT://{host}:{port}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
        assert f":{port}" in kafka_env["KAFKA_LISTENERS"]
        for dsn in (settings.crm_dsn, settings.erp_dsn):
            url = urlsplit(dsn)
            db = services[url.hostname or ""]
            assert url.port == 5432
            assert db["environment"]["POSTGRES_USER"] == url.username
            assert db["environment"]["POSTGRES_PASSWORD"] == url.password
            assert db["environment"]["POSTGRES_DB"] == url.path.lstrip("/")
        assert urlsplit(settings.crm_dsn).hostname == "crm-db"
        assert urlsplit(settings.erp_dsn).hostname == "erp-db"
        if name in ("producer", "consumer"):
            assert settings.http_port > 0
            probe = " ".join(service["healthcheck"]["test"])
            assert f":{settings.http_port}/readyz" in probe
            grace = service["stop_grace_period"]
            assert int(grace.rstrip("s")) > settings.shutdown_timeout_s


def test_compose_file_is_valid_for_docker_compose() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True,
                                        check=False).returncode != 0:
        pytest.skip("no docker compose client here (validated structurally above)")
    done = subprocess.run([docker, "compose", "-f", "docker-compose.yml", "config", "-q"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_dockerfile_runs_the_cli_as_a_non_root_user() -> None:
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert 'ENTRYPOINT ["crm-erp-sync"]' in text
    env = dict(re.findall(r"(CRM_ERP_SYNC_\w+)=(\S+)", text))
    assert set(env) <= SETTINGS_VARS


# ---- deploy/k8s --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


@pytest.fixture(scope="module")
def manifests(kustomization: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), resource
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} twice"
            out[key] = doc
    return out


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {k: v for k, v in pairs}


CONFIG = "crm-erp-sync-config"
FILE_VARS = ("CRM_ERP_SYNC_MAPPINGS_FILE", "CRM_ERP_SYNC_SOURCE_PROFILE")


def generator(kustomization: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [g for g in kustomization["configMapGenerator"] if g["name"] == name]
    return found


def config_env(kustomization: dict[str, Any]) -> dict[str, str]:
    """The settings ConfigMap's variables, as sync.env gives them."""
    return {k: v for f in generator(kustomization, CONFIG)["envs"]
            for k, v in env_file(K8S / f).items()}


def with_local_files(kustomization: dict[str, Any], pod: dict[str, Any],
                     env: dict[str, str]) -> dict[str, str]:
    """``env`` with each file a pod reads from a generated ConfigMap (FILE_VARS) replaced by
    the file in deploy/k8s/base it is generated from: so Settings' start-up check that the
    files exist checks what the pod would see. Fails when the pod does not mount it."""
    (container,) = pod["spec"]["containers"]
    out = dict(env)
    for var in FILE_VARS:
        kind, name, key = mounted(pod["spec"], container, env[var])
        assert kind == "configMap", var
        assert key in generator(kustomization, name)["files"], (var, name)
        out[var] = str(K8S / key)
    # The CA the DSNs' sslrootcert= and CRM_ERP_SYNC_KAFKA_SSL_CAFILE name (Settings refuses
    # one that does not exist): mounted from the ConfigMap in ca.yaml, which stands in here.
    cafile = env.get("CRM_ERP_SYNC_KAFKA_SSL_CAFILE")
    if cafile:
        kind, name, key = mounted(pod["spec"], container, cafile)
        assert (kind, name) == ("configMap", "crm-erp-sync-ca"), cafile
        ca_map = yaml.safe_load((K8S / "ca.yaml").read_text())
        assert key in ca_map["data"], cafile
        out = {k: v.replace(cafile, str(K8S / "ca.yaml")) for k, v in out.items()}
    return out


@pytest.fixture(scope="module")
def k8s_settings(kustomization: dict[str, Any],
                 manifests: dict[tuple[str, str], dict[str, Any]]) -> Settings:
    config = config_env(kustomization)
    secret = manifests[("Secret", "crm-erp-sync-secrets")]["stringData"]
    assert set(secret) <= SECRET_VARS, "a Secret key is no secret setting"
    assert not set(config) & SECRET_VARS, "a secret in the ConfigMap"
    producer = pod_spec(manifests, "Deployment", "crm-erp-sync-producer")[1]
    return assert_known_and_valid(with_local_files(kustomization, producer,
                                                   {**config, **secret}), "deploy/k8s")


def test_every_resource_file_is_in_the_kustomization(kustomization: dict[str, Any]) -> None:
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def pod_spec(manifests: dict[tuple[str, str], dict[str, Any]], kind: str,
             name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    obj = manifests[(kind, name)]
    return obj, obj["spec"]["template"]


@pytest.mark.parametrize(("name", "command"), [("crm-erp-sync-producer", "produce"),
                                               ("crm-erp-sync-consumer", "consume")])
def test_deployments_probe_and_configure_the_service(
        manifests: dict[tuple[str, str], dict[str, Any]], k8s_settings: Settings,
        name: str, command: str) -> None:
    deployment, template = pod_spec(manifests, "Deployment", name)
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = template["spec"]
    assert ("ServiceAccount", spec["serviceAccountName"]) in manifests
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["terminationGracePeriodSeconds"] > k8s_settings.shutdown_timeout_s
    (container,) = spec["containers"]
    assert container["args"][0] == command
    assert_command(container["args"], name)
    refs = {next(iter(r)): next(iter(r.values()))["name"] for r in container["envFrom"]}
    assert refs == {"configMapRef": "crm-erp-sync-config", "secretRef": "crm-erp-sync-secrets"}
    (port,) = container["ports"]
    assert port["name"] == "http" and port["containerPort"] == k8s_settings.http_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    if command == "produce":
        assert deployment["spec"]["replicas"] == 2  # one active, one standby
    else:
        assert deployment["spec"]["replicas"] == k8s_settings.topic_partitions


def test_budgets_and_service_select_the_pods(
        manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    pods = {name: pod_spec(manifests, "Deployment", name)[1]["metadata"]["labels"]
            for name in ("crm-erp-sync-producer", "crm-erp-sync-consumer")}
    budgets = [m for (kind, _), m in manifests.items() if kind == "PodDisruptionBudget"]
    covered = set()
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"]
        matched = [n for n, labels in pods.items() if selector.items() <= labels.items()]
        assert len(matched) == 1, budget["metadata"]["name"]
        covered.update(matched)
    assert covered == set(pods)
    service = manifests[("Service", "crm-erp-sync-metrics")]
    assert all(service["spec"]["selector"].items() <= labels.items() for labels in pods.values())
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_setup_job_runs_setup(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    _, template = pod_spec(manifests, "Job", "crm-erp-sync-setup")
    (container,) = template["spec"]["containers"]
    assert container["args"][0] == "setup"
    assert_command(container["args"], "setup job")
    assert template["spec"]["restartPolicy"] in ("OnFailure", "Never")


def secret_refs(container: dict[str, Any]) -> set[str]:
    return {r["secretRef"]["name"] for r in container.get("envFrom", []) if "secretRef" in r}


def test_setup_runs_as_administrators_and_only_setup_does(
        manifests: dict[tuple[str, str], dict[str, Any]], kustomization: dict[str, Any]
        ) -> None:
    """`setup` creates the publication and schemas the restricted roles may not (newcomer6
    F10): its Job has a Secret of its own, with other roles than the pods' Secret, and no
    long-running pod or example CronJob is given the administrators' one."""
    _, template = pod_spec(manifests, "Job", "crm-erp-sync-setup")
    (container,) = template["spec"]["containers"]
    assert secret_refs(container) == {"crm-erp-sync-setup-secrets"}
    admin = manifests[("Secret", "crm-erp-sync-setup-secrets")]["stringData"]
    pods = manifests[("Secret", "crm-erp-sync-secrets")]["stringData"]
    assert set(admin) <= SECRET_VARS
    for var in ("CRM_ERP_SYNC_CRM_DSN", "CRM_ERP_SYNC_ERP_DSN"):
        assert "CHANGE-ME" in admin[var] and "sslmode=verify-full" in admin[var]
        admin_url, pod_url = urlsplit(admin[var]), urlsplit(pods[var])
        assert admin_url.username != pod_url.username, var
        assert (admin_url.hostname, admin_url.path) == (pod_url.hostname, pod_url.path), var
    assert_known_and_valid(with_local_files(kustomization, template,
                                            {**config_env(kustomization), **admin}),
                           "the setup Job")
    others = [pod_spec(manifests, "Deployment", n)[1] for n in
              ("crm-erp-sync-producer", "crm-erp-sync-consumer")]
    others += [yaml.safe_load(p.read_text())["spec"]["jobTemplate"]["spec"]["template"]
               for p in sorted(EXAMPLES.glob("*.yaml"))]
    for other in others:
        for c in other["spec"]["containers"]:
            assert secret_refs(c) == {"crm-erp-sync-secrets"}, c["name"]


def test_the_placeholder_secret_says_so(
        manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret = manifests[("Secret", "crm-erp-sync-secrets")]["stringData"]
    for var in ("CRM_ERP_SYNC_CRM_DSN", "CRM_ERP_SYNC_ERP_DSN"):
        assert "CHANGE-ME" in secret[var]
        assert "sslmode=verify-full" in secret[var]


def all_pods(manifests: dict[tuple[str, str], dict[str, Any]]
             ) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod template) of every pod the base and the examples run."""
    pods = [(n, pod_spec(manifests, k, n)[1]) for k, n in
            [("Deployment", "crm-erp-sync-producer"), ("Deployment", "crm-erp-sync-consumer"),
             ("Job", "crm-erp-sync-setup")]]
    pods += [(p.name, yaml.safe_load(p.read_text())["spec"]["jobTemplate"]["spec"]["template"])
             for p in sorted(EXAMPLES.glob("*.yaml"))]
    return pods


def mounted(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str, str]:
    """(volume kind, its ConfigMap's or Secret's name, the key) that the file ``path`` of
    ``container`` comes from: a read-only directory mount (a subPath mount never sees an
    update). Fails when nothing mounts it."""
    for mount in container.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(directory):
            assert "subPath" not in mount, path
            assert mount.get("readOnly") is True, path
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            for kind, name in (("configMap", "name"), ("secret", "secretName")):
                if kind in volume:
                    return kind, volume[kind][name], path[len(directory):]
            raise AssertionError(f"{path}: volume {mount['name']} is no ConfigMap or Secret")
    raise AssertionError(f"{path} is mounted in no volume of {container['name']}")


def test_tls_is_verified_against_a_ca_every_pod_mounts(
        manifests: dict[tuple[str, str], dict[str, Any]], k8s_settings: Settings,
        kustomization: dict[str, Any]) -> None:
    """newcomer6 F11: verify-full needs a CA file (the image's user has no home for libpq's
    default, the root filesystem is read-only), and the production default talks to Kafka
    over TLS with SASL, as the Secret's SASL password implies."""
    assert k8s_settings.kafka_security_protocol == "SASL_SSL"
    assert k8s_settings.kafka_sasl_mechanism.startswith("SCRAM-")
    assert k8s_settings.kafka_sasl_username
    cafile = config_env(kustomization)["CRM_ERP_SYNC_KAFKA_SSL_CAFILE"]  # as the pods see it
    assert cafile.startswith("/") and k8s_settings.kafka_ssl_cafile
    for name in ("crm-erp-sync-secrets", "crm-erp-sync-setup-secrets"):
        secret = manifests[("Secret", name)]["stringData"]
        assert "CHANGE-ME" in secret["CRM_ERP_SYNC_KAFKA_SASL_PASSWORD"], name
        for var in ("CRM_ERP_SYNC_CRM_DSN", "CRM_ERP_SYNC_ERP_DSN"):
            query = parse_qs(urlsplit(secret[var]).query)
            assert query["sslmode"] == ["verify-full"], (name, var)
            assert query["sslrootcert"] == [cafile], (name, var)
    for where, pod in all_pods(manifests):
        (container,) = pod["spec"]["containers"]
        kind, name, key = mounted(pod["spec"], container, cafile)
        assert kind == "configMap", where
        assert key in manifests[("ConfigMap", name)]["data"], where


def test_every_pod_reads_the_mappings_and_source_profile_from_mounted_configmaps(
        manifests: dict[tuple[str, str], dict[str, Any]], kustomization: dict[str, Any]
        ) -> None:
    """newcomer6 F12: README's live reload edits the mappings file through a ConfigMap
    mounted as a directory; the producer's profile (BottleCRM's needs its org id) must be
    the operator's, not the image's. Every process checks both files exist at start, so
    every pod mounts both; the mappings' ConfigMap keeps its name (no hash), so an update
    reaches the running consumers instead of rolling them."""
    from service.cdc.profile import load_profile
    from service.erp.mappings import Mappings

    config = config_env(kustomization)
    for where, pod in all_pods(manifests):
        assert_known_and_valid(with_local_files(kustomization, pod, config), where)
    mappings = config["CRM_ERP_SYNC_MAPPINGS_FILE"]
    consumer = pod_spec(manifests, "Deployment", "crm-erp-sync-consumer")[1]
    (container,) = consumer["spec"]["containers"]
    _, name, key = mounted(consumer["spec"], container, mappings)
    assert generator(kustomization, name)["options"]["disableNameSuffixHash"] is True
    assert Mappings.load(K8S / key).order_status  # the shipped copy is valid
    _, name, key = mounted(consumer["spec"], container, config["CRM_ERP_SYNC_SOURCE_PROFILE"])
    assert "disableNameSuffixHash" not in generator(kustomization, name).get("options", {})
    assert load_profile(K8S / key).tables


def test_kustomize_builds_when_kubectl_is_here() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl (the CI script installs kustomize)")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(done.stdout)]
    assert sorted(kinds) == sorted(["Namespace", "ServiceAccount", "ConfigMap", "ConfigMap",
                                    "ConfigMap", "ConfigMap", "Secret", "Secret", "Job",
                                    "Deployment", "Deployment", "PodDisruptionBudget",
                                    "PodDisruptionBudget", "Service"])


# ---- deploy/k8s/examples -----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_cronjobs_run_real_commands_with_the_base_config(
        path: Path, manifests: dict[tuple[str, str], dict[str, Any]],
        kustomization: dict[str, Any]) -> None:
    (job,) = list(yaml.safe_load_all(path.read_text()))
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "CronJob"
    spec = job["spec"]
    assert len(spec["schedule"].split()) == 5, "a five-field cron schedule"
    assert spec["concurrencyPolicy"] == "Forbid"  # never two runs at once
    template = spec["jobTemplate"]["spec"]["template"]
    pod = template["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert ("ServiceAccount", pod["serviceAccountName"]) in manifests
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert_command(container["args"], path.name)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    refs = {next(iter(r)): next(iter(r.values()))["name"] for r in container["envFrom"]}
    assert refs == {"configMapRef": CONFIG,
                    "secretRef": manifests[("Secret", "crm-erp-sync-secrets")]["metadata"]
                    ["name"]}


def test_the_reconcile_cronjob_lets_a_drift_fail_once() -> None:
    (job,) = yaml.safe_load_all((EXAMPLES / "reconcile-cronjob.yaml").read_text())
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "reconcile"
    # exit 1 is "drift found": re-running the Job would only find it again
    assert job["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0


# ---- deploy/prometheus -------------------------------------------------------------------------
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the processes export (counters with _total, histograms with their
    suffixes) -> its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import ConsumerMetrics, ProducerMetrics

    out: dict[str, set[str]] = {}
    for metrics in (ConsumerMetrics(), ProducerMetrics()):
        for value in vars(metrics).values():
            if not isinstance(value, MetricWrapperBase):
                continue
            name, labels = value._name, set(value._labelnames)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            for suffix in suffixes.get(value._type, [""]):
                out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def test_alert_rules_name_only_exported_metrics_and_their_labels() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    exported = exported_metrics()
    names = set()
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            names.add(rule["alert"])
            assert rule["labels"]["severity"] in ("info", "warning", "page")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            expr = rule["expr"]
            assert expr.count("(") == expr.count(")"), rule["alert"]
            used = re.findall(r"\b(crm_erp_sync_\w+)(\{[^}]*\})?", expr)
            assert used, f"{rule['alert']} names no metric of ours"
            for metric, matchers in used:
                assert metric in exported, f"{rule['alert']}: {metric} is not exported"
                for label in re.findall(r"(\w+)\s*[!=~]", matchers):
                    assert label in exported[metric], f"{rule['alert']}: {metric}.{label}"
            for by in re.findall(r"by \(([^)]*)\) \((crm_erp_sync_\w+)", expr):
                wanted = {b.strip() for b in by[0].split(",")}
                assert wanted <= exported[by[1]], f"{rule['alert']}: by {wanted}"
    assert {"CrmErpSyncReconcileDrift", "CrmErpSyncReconcileNotRun"} <= names


# `AGG(metric) OP N` (no `by`), optionally with the `or vector(0)` fallback.
_WHOLE_AGGREGATE = re.compile(r"\(?(sum|max|min|count)\((crm_erp_sync_\w+)\)"
                              r"(?P<fallback> or vector\(0\)\))? (?P<op>==|!=|<=|>=|<|>) "
                              r"(?P<n>\d+)")
_OPS = {"==": operator.eq, "!=": operator.ne, "<=": operator.le, ">=": operator.ge,
        "<": operator.lt, ">": operator.gt}


def test_an_alert_that_fires_on_zero_also_fires_when_nothing_exports_the_metric() -> None:
    """With no process exporting a metric (all of them down: the case such an alert is for)
    there is no series, and an aggregate of no series is empty, not 0: the comparison yields
    nothing and the alert stays silent. So an alert that fires at 0 must fall back to 0."""
    rules = {rule["alert"]: rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]}
    fires_on_nothing = set()
    for name, expr in rules.items():
        whole = _WHOLE_AGGREGATE.fullmatch(expr.strip())
        if whole is None or not _OPS[whole["op"]](0, int(whole["n"])):
            continue  # not a whole-fleet aggregate, or 0 is fine: nothing to check
        assert whole["fallback"], f"{name}: {expr!r} is silent when no process exports it"
        fires_on_nothing.add(name)
    assert {"CrmErpSyncNoActiveProducer", "CrmErpSyncNoConsumer"} <= fires_on_nothing
    producer = _WHOLE_AGGREGATE.fullmatch(rules["CrmErpSyncNoActiveProducer"])
    assert producer is not None and not _OPS[producer["op"]](1, int(producer["n"]))


def test_alert_rules_pass_promtool_when_it_is_here() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool here (structure and metric names checked above)")
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
