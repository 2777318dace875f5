"""The Helm chart checks (scripts/chart-check runs them).

- helm lint --strict and helm template, with Helm's own Go code
  (helm-python-sdk), for the default values and every file in values/;
- every rendered object, every example and every object the operator would
  build for an example, validated against the Kubernetes OpenAPI schemas of
  checks.KUBE_VERSION (kubernetes-validate, strict: unknown fields fail);
  a ServiceMonitor against a small strict subset of its CRD;
- the examples' BrokerGroups and Topics against the CRDs' openAPIV3Schema
  (jsonschema; CEL rules in x-kubernetes-validations must be present but are
  not evaluated, as jsonschema cannot);
- the chart's CRDs are the operator's (crds/*.yaml, `keelmq-operator crds`);
- the chart's RBAC grants every permission `keelmq-operator rbac` lists, in
  the right scope, and nothing more;
- the Dockerfiles: multi-stage, non-root, the broker's data volume, the
  binaries they copy are workspace binaries, the ports the probes use.

Checks that need the operator binary ($KEELMQ_OPERATOR_BIN) fail when it is
missing. For a local run without it, KEELMQ_CHART_CHECK_WITHOUT_OPERATOR=1
turns them into visible skips, except under CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

import checks
import helm_python as helm
from checks import CHART, CHART_TESTS, EXAMPLES, REPO, SOURCE_CRDS

VALUE_SETS = ["default"] + sorted(p.stem for p in (CHART_TESTS / "values").glob("*.yaml"))

BROKER_PORTS = {"client": 8081, "admin": 8082, "http": 8083, "replication": 10912}
BROKER_DATA_DIR = "/var/lib/keelmq"
BROKER_CONFIG = "/etc/keelmq/broker.toml"


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def chart_crds() -> list[dict]:
    crds = checks.load_crds(CHART / "crds")
    assert crds, "charts/keelmq/crds/ holds no CRD"
    return crds


class RenderCache:
    """The chart rendered once per values set, on first use, so that a broken
    values file fails the tests of that set only."""

    def __init__(self) -> None:
        self._cache: dict[str, checks.Rendered] = {}

    def __getitem__(self, name: str) -> checks.Rendered:
        if name not in self._cache:
            self._cache[name] = checks.render_chart(checks.load_values(name))
        return self._cache[name]

    def items(self):
        return [(name, self[name]) for name in VALUE_SETS]


@pytest.fixture(scope="session")
def rendered() -> RenderCache:
    return RenderCache()


@pytest.fixture(scope="session")
def examples() -> dict[str, list[dict]]:
    found = {p.name: checks.load_yaml_docs(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))}
    assert found, "no examples"
    return found


@pytest.fixture(scope="session")
def operator_bin():
    try:
        return checks.operator_bin()
    except checks.OperatorBinaryMissing as e:
        if os.environ.get("KEELMQ_CHART_CHECK_WITHOUT_OPERATOR") == "1" and os.environ.get("CI") != "true":
            pytest.skip(f"SKIPPED ON REQUEST (KEELMQ_CHART_CHECK_WITHOUT_OPERATOR=1): {e}")
        pytest.fail(f"{e}. Build it (cargo build --bin keelmq-operator) or run scripts/test.", pytrace=False)


@pytest.fixture(scope="session")
def operator_perms(operator_bin) -> list[dict]:
    perms = json.loads(checks.run_operator("rbac"))
    checks.check_operator_rbac_shape(perms)
    return perms


def kinds(objects: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def find(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


# --------------------------------------------------------------------------
# lint, values schema, render


@pytest.mark.parametrize("values_name", VALUE_SETS)
def test_helm_lint_strict(values_name):
    findings = checks.lint_chart(checks.load_values(values_name))
    assert not findings, "helm lint --strict:\n" + "\n".join(findings)


def test_values_schema_rejects_bad_values():
    bad = [
        {"log": {"format": "xml"}},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"replicaCount": 2, "leaderElection": {"enabled": False}},
        {"image": {"tag": 7}},
        {"unknownTopLevelKey": True},
        {"securityContext": {"readOnlyRootFilesystem": False}},
    ]
    accepted = []
    for values in bad:
        try:
            checks.render_chart(values)
        except helm.HelmValuesError:
            continue
        accepted.append(values)
    assert not accepted, f"values.schema.json accepts bad values: {accepted}"


@pytest.mark.parametrize("values_name", VALUE_SETS)
def test_rendered_objects_are_valid_kubernetes(rendered, chart_crds, values_name):
    objects = rendered[values_name].objects
    assert objects, "nothing rendered"
    errors = {checks.object_name(o): checks.object_errors(o, chart_crds) for o in objects}
    errors = {k: v for k, v in errors.items() if v}
    assert not errors, f"invalid objects at Kubernetes {checks.KUBE_VERSION}:\n" + yaml.safe_dump(errors)
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for o in objects:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"].get("namespace"), f"{checks.object_name(o)} has no namespace"


def test_default_render(rendered):
    r = rendered["default"]
    assert kinds(r.objects) == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service"]
    ), kinds(r.objects)
    assert "kubectl" in r.notes and "BrokerGroup" in r.notes and "every namespace" in r.notes


def test_deployment_is_hardened(rendered):
    for name, r in rendered.items():
        (dep,) = find(r.objects, "Deployment")
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        psc, sc = pod["securityContext"], c["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert c["resources"]["requests"] and c["resources"]["limits"], name
        port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, name
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, name
        assert f"--http-port={port}" in c["args"], name
        assert c["args"][0] == "run", name
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert "RUST_LOG" in env and "KEELMQ_WATCH_NAMESPACE" in env
        # a standby is ready (/readyz), so a rolling update starts the new pod
        # before it stops the old leader
        assert dep["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        }, name
        # the NetworkPolicies admit the operator's pods by these labels: they
        # must be the pods' own
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        wanted = dict(kv.split("=", 1) for kv in env["KEELMQ_OPERATOR_POD_LABELS"]["value"].split(","))
        assert wanted and all(pod_labels.get(k) == v for k, v in wanted.items()), (name, wanted, pod_labels)
        assert wanted == dep["spec"]["selector"]["matchLabels"], name
        # leader election is on unless turned off, and then never with two replicas
        assert "--leader-election=false" not in c["args"], name
        assert any(a.startswith("--lease-name=") for a in c["args"]), name


def test_single_namespace_values(rendered):
    values = checks.load_values("single-namespace")
    (ns,) = values["watchNamespaces"]
    r = rendered["single-namespace"]
    (dep,) = find(r.objects, "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KEELMQ_WATCH_NAMESPACE"] == ns
    roles = find(r.objects, "Role")
    assert sorted(o["metadata"]["namespace"] for o in roles) == sorted([ns, checks.RELEASE_NAMESPACE])
    # namespaced permissions never cluster-wide when one namespace is watched
    for cr in find(r.objects, "ClusterRole"):
        for rule in cr["rules"]:
            assert rule["resources"] not in (["statefulsets"], ["pods"], ["brokergroups"]), cr
    assert ns in r.notes


def test_two_releases_in_one_namespace_use_their_own_lease():
    """The README's way to manage several namespaces: one release per
    namespace. Releases installed into one namespace must not stand by on
    each other's Lease."""
    leases = []
    for release, ns in [("keelmq-orders", "orders"), ("keelmq-billing", "billing")]:
        r = checks.render_chart({"watchNamespaces": [ns]}, release=release)
        (dep,) = find(r.objects, "Deployment")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        (lease,) = [a.removeprefix("--lease-name=") for a in args if a.startswith("--lease-name=")]
        assert lease == dep["metadata"]["name"], (lease, dep["metadata"]["name"])
        lease_roles = [
            rule
            for role in find(r.objects, "Role")
            for rule in role["rules"]
            if rule["resources"] == ["leases"] and rule.get("resourceNames")
        ]
        assert lease_roles and all(rule["resourceNames"] == [lease] for rule in lease_roles), lease_roles
        leases.append(lease)
    assert len(set(leases)) == 2, leases
    pinned = checks.render_chart({"leaderElection": {"enabled": True, "leaseName": "my-lease"}})
    (dep,) = find(pinned.objects, "Deployment")
    assert "--lease-name=my-lease" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_metrics_values(rendered):
    r = rendered["metrics"]
    (sm,) = find(r.objects, "ServiceMonitor")
    (svc,) = find(r.objects, "Service")
    (dep,) = find(r.objects, "Deployment")
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= port_names
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    # and without it, no ServiceMonitor
    assert not find(rendered["default"].objects, "ServiceMonitor")


def test_broker_pod_monitor(rendered, operator_bin, examples, tmp_path):
    (pm,) = find(rendered["metrics"].objects, "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["messaging", "payments"]}
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["path"] == "/metrics" and ep["interval"] == "15s"
    # It selects the broker pods the operator makes, by a port they have.
    group = next(d for d in examples["brokergroup-quickstart.yaml"] if d["kind"] == "BrokerGroup")
    path = tmp_path / "group.yaml"
    path.write_text(yaml.safe_dump(group))
    objects = checks.load_yaml_docs(checks.run_operator("render", "--file", str(path)))
    (sts,) = find(objects, "StatefulSet")
    pod = sts["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items()), labels
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert ep["port"] in ports, ports
    # Off by default; all namespaces when none are named.
    assert not find(rendered["default"].objects, "PodMonitor")
    every = checks.render_chart({"metrics": {"brokerPodMonitor": {"enabled": True}}})
    (pm,) = find(every.objects, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"any": True}


def test_custom_image_and_resources(rendered):
    values = checks.load_values("custom")
    (dep,) = find(rendered["custom"].objects, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == f"{values['image']['repository']}@{values['image']['digest']}"
    assert c["resources"] == values["resources"]
    assert f"--log-format={values['log']['format']}" in c["args"]
    assert dep["spec"]["replicas"] == values["replicaCount"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RUST_LOG"] == values["log"]["level"]


# --------------------------------------------------------------------------
# CRDs and examples


def test_chart_crds_are_copies_of_the_operators(chart_crds):
    """charts/keelmq/crds/ must be byte-for-byte the operator's crds/*.yaml
    (scripts/chart-check --sync copies them)."""
    source = sorted(SOURCE_CRDS.glob("*.yaml"))
    assert source, f"{SOURCE_CRDS.relative_to(REPO)}/*.yaml not found: the operator's generated CRDs"
    chart = sorted((CHART / "crds").glob("*.yaml"))
    assert [p.name for p in chart] == [p.name for p in source], "the chart's CRD files differ from crds/"
    for s, c in zip(source, chart):
        assert s.read_bytes() == c.read_bytes(), f"{c.relative_to(REPO)} differs from {s.relative_to(REPO)}: run scripts/chart-check --sync"


def test_crds_are_valid(chart_crds):
    by_kind = {}
    for crd in chart_crds:
        assert not checks.object_errors(crd, []), checks.object_errors(crd, [])
        for v in checks.crd_versions(crd):
            by_kind[v.kind] = v
            assert v.group == "keelmq.io"
            assert crd["metadata"]["name"] == f"{v.plural}.{v.group}"
            jsonschema.Draft202012Validator.check_schema(checks.structural_to_jsonschema(v.schema))
    assert set(by_kind) == {"BrokerGroup", "Topic"}
    for v in by_kind.values():
        assert v.version == "v1alpha1" and v.served and v.storage and v.scope == "Namespaced"


def test_crds_carry_cel_rules(chart_crds):
    """The x-kubernetes-validations rules are present. They are CEL, evaluated
    by the API server; jsonschema does not evaluate them, so the examples are
    not checked against them here."""
    rules = {v.kind: checks.cel_rules(v.schema) for crd in chart_crds for v in checks.crd_versions(crd)}
    for kind in ("BrokerGroup", "Topic"):
        assert rules[kind], f"the {kind} CRD has no x-kubernetes-validations rule"
    # the rules the operator's design relies on
    flat = {kind: " ".join(r for _, r in rs) for kind, rs in rules.items()}
    assert "minInSyncReplicas" in flat["BrokerGroup"], rules["BrokerGroup"]
    assert any(where.endswith(".storage.size") for where, _ in rules["BrokerGroup"]), rules["BrokerGroup"]
    for kind, rs in rules.items():
        for where, rule in rs:
            assert rule.strip(), f"{kind} {where}: empty CEL rule"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_is_valid(examples, chart_crds, example):
    docs = examples[example]
    assert docs
    errors = {checks.object_name(o): checks.object_errors(o, chart_crds) for o in docs}
    errors = {k: v for k, v in errors.items() if v}
    assert not errors, f"{example}:\n" + yaml.safe_dump(errors)


def test_examples_cover_the_brief(examples):
    groups = [o for docs in examples.values() for o in docs if o["kind"] == "BrokerGroup"]
    assert any(o["kind"] == "Topic" for docs in examples.values() for o in docs)
    prod = examples["brokergroup-production.yaml"]
    (bg,) = find(prod, "BrokerGroup")
    spec = bg["spec"]
    assert spec["replicas"] == 3
    assert spec["replication"]["mode"] == "Sync" and spec["flushMode"] == "SyncFlush"
    aff = json.dumps(spec)
    assert "podAntiAffinity" in aff
    # the PodDisruptionBudget is the operator's (see the render test)
    assert not find(prod, "PodDisruptionBudget"), "the operator makes the PDB; a second one would fight it"
    minimal = examples["brokergroup-minimal.yaml"]
    assert len(minimal) == 1 and len(groups) == 3


def quantity(q) -> float:
    """A Kubernetes quantity as a number (the suffixes the examples use)."""
    text = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def test_quickstart_example_needs_nothing_a_cluster_may_lack(examples):
    """The quick start of both READMEs applies this group, so it must run on
    any cluster: the default StorageClass, no PriorityClass, no node
    constraints, anti-affinity preferred only, and small requests."""
    (bg,) = find(examples["brokergroup-quickstart.yaml"], "BrokerGroup")
    spec = bg["spec"]
    assert "storageClassName" not in spec.get("storage", {}), "must use the default StorageClass"
    assert quantity(spec.get("storage", {}).get("size", "10Gi")) <= quantity("10Gi")
    pod = spec.get("podTemplate", {})
    for key in ("priorityClassName", "nodeSelector", "tolerations"):
        assert key not in pod, f"the quick start must not need {key}"
    affinity = pod.get("affinity", {})
    assert set(affinity) <= {"podAntiAffinity"}, affinity
    for terms in affinity.values():
        assert set(terms) <= {"preferredDuringSchedulingIgnoredDuringExecution"}, f"required affinity: {terms}"
    requests = spec.get("resources", {}).get("requests", {})
    assert quantity(requests.get("cpu", "0")) <= 0.5 and quantity(requests.get("memory", "0")) <= quantity("1Gi"), requests
    assert spec.get("replicas", 2) >= 2, "a group that can fail over"
    # the README applies topic.yaml next: its group is this one
    (topic,) = find(examples["topic.yaml"], "Topic")
    assert topic["spec"]["brokerGroup"] == bg["metadata"]["name"]


def test_docs_quick_starts_apply_the_quickstart_example():
    """Both READMEs start from brokergroup-quickstart.yaml, never apply the
    production example as is, and name only examples that exist."""
    for doc in (REPO / "README.md", CHART / "README.md"):
        text = doc.read_text()
        named = set(re.findall(r"examples/([\w.-]+\.yaml)", text))
        assert "brokergroup-quickstart.yaml" in named, f"{doc.relative_to(REPO)} does not use the quick-start example"
        for name in named:
            assert (EXAMPLES / name).is_file(), f"{doc.relative_to(REPO)} names examples/{name}, which does not exist"
        assert not re.search(r"apply -f \S*brokergroup-production\.yaml", text), (
            f"{doc.relative_to(REPO)} applies the production example, which needs adapting first"
        )


def notes_manifests(notes: str) -> list[dict]:
    """The objects of NOTES.txt's `<<'YAML'` here-documents."""
    docs, block = [], None
    for line in notes.splitlines():
        if block is None:
            if line.rstrip().endswith("<<'YAML'"):
                block = []
        elif line.strip() == "YAML":
            # the shell ends a here-document only at an unindented terminator
            assert line == "YAML", f"indented here-document terminator {line!r}: a pasted command never ends"
            docs += checks.load_yaml_docs(textwrap.dedent("\n".join(block)))
            block = None
        else:
            block.append(line)
    assert block is None, "unterminated here-document in NOTES.txt"
    return docs


@pytest.mark.parametrize("values_name", ["default", "single-namespace"])
def test_notes_objects_are_valid_and_fit_together(rendered, chart_crds, values_name):
    """What NOTES.txt tells the user to apply is valid, and its Topic
    belongs to its BrokerGroup; it names no file by a relative path."""
    notes = rendered[values_name].notes
    docs = notes_manifests(notes)
    groups, topics = find(docs, "BrokerGroup"), find(docs, "Topic")
    assert groups and topics, f"NOTES.txt should create a BrokerGroup and a Topic: {kinds(docs)}"
    errors = {checks.object_name(o): checks.object_errors(o, chart_crds) for o in docs}
    errors = {k: v for k, v in errors.items() if v}
    assert not errors, yaml.safe_dump(errors)
    names = {g["metadata"]["name"] for g in groups}
    for t in topics:
        assert t["spec"]["brokerGroup"] in names, f"Topic {t['metadata']['name']} names group {t['spec']['brokerGroup']}, NOTES creates {names}"
    assert not re.search(r"-f examples/", notes), "a path relative to the chart directory"


# --------------------------------------------------------------------------
# the operator binary


def test_operator_crds_match(operator_bin, chart_crds):
    printed = checks.load_yaml_docs(checks.run_operator("crds"))
    key = lambda c: c["metadata"]["name"]  # noqa: E731
    assert sorted(printed, key=key) == sorted(chart_crds, key=key), (
        "`keelmq-operator crds` differs from the chart's CRDs: regenerate crds/*.yaml, then scripts/chart-check --sync"
    )


def test_chart_permissions_file_matches_operator(operator_perms):
    committed = json.loads((CHART / "files" / "operator-rbac.json").read_text())
    norm = lambda ps: sorted(json.dumps({k: sorted(v) if isinstance(v, list) else v for k, v in p.items()}, sort_keys=True) for p in ps)  # noqa: E731
    assert norm(committed) == norm(operator_perms), (
        "charts/keelmq/files/operator-rbac.json differs from `keelmq-operator rbac`: run scripts/chart-check --sync"
    )


@pytest.mark.parametrize("values_name", VALUE_SETS)
def test_rbac_grants_exactly_what_the_operator_uses(operator_perms, rendered, values_name):
    problems = checks.compare_rbac(operator_perms, rendered[values_name].objects, checks.load_values(values_name))
    assert not problems, "\n".join(problems)


def test_operator_accepts_the_charts_flags(operator_bin, rendered):
    help_text = checks.run_operator("run", "--help")
    for name, r in rendered.items():
        (dep,) = find(r.objects, "Deployment")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        for a in args[1:]:
            flag = a.split("=")[0]
            assert flag in help_text, f"{name}: the chart passes {flag}, `keelmq-operator run --help` does not list it"
    for env in ("KEELMQ_WATCH_NAMESPACE", "POD_NAMESPACE", "KEELMQ_OPERATOR_POD_LABELS"):
        assert env in help_text, f"`keelmq-operator run --help` does not mention {env}"


def example_broker_groups() -> list[tuple[str, dict]]:
    out = []
    for p in sorted(EXAMPLES.glob("*.yaml")):
        for o in checks.load_yaml_docs(p.read_text()):
            if o.get("kind") == "BrokerGroup":
                out.append((p.name, o))
    return out


def operator_peer(rendered) -> tuple[str, str, dict]:
    """(namespace, --operator-pod-labels, pod labels) of the chart's operator."""
    (dep,) = find(rendered["default"].objects, "Deployment")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    return (
        dep["metadata"]["namespace"],
        env["KEELMQ_OPERATOR_POD_LABELS"]["value"],
        dep["spec"]["template"]["metadata"]["labels"],
    )


@pytest.mark.parametrize("example,group", example_broker_groups(), ids=lambda v: v if isinstance(v, str) else "")
def test_operator_render_is_valid_and_matches_the_image(operator_bin, chart_crds, rendered, tmp_path, example, group):
    path = tmp_path / "group.yaml"
    path.write_text(yaml.safe_dump(group))
    op_namespace, op_labels, op_pod_labels = operator_peer(rendered)
    objects = checks.load_yaml_docs(
        checks.run_operator(
            "render", "--file", str(path), "--operator-namespace", op_namespace, "--operator-pod-labels", op_labels
        )
    )
    assert objects, f"render of {example} printed nothing"
    errors = {checks.object_name(o): checks.object_errors(o, chart_crds) for o in objects}
    errors = {k: v for k, v in errors.items() if v}
    assert not errors, f"objects the operator builds for {example}:\n" + yaml.safe_dump(errors)
    sts = find(objects, "StatefulSet")
    assert sts, f"no StatefulSet for {example}: {kinds(objects)}"
    for s in sts:
        problems = broker_pod_problems(s["spec"]["template"]["spec"], s)
        problems += pod_security_problems(s["spec"]["template"]["spec"])
        assert not problems, f"{example}: " + "; ".join(problems)
    # The NetworkPolicy: admin and replication only from the group's pods and
    # the chart's operator pods; client and HTTP from anywhere.
    (np,) = find(objects, "NetworkPolicy")
    problems = network_policy_problems(np, sts[0]["spec"]["template"]["metadata"]["labels"], op_namespace, op_pod_labels)
    assert not problems, f"{example}: " + "; ".join(problems)
    # A PodDisruptionBudget (one broker down at a time), and the selectors of
    # the operator's PDB and of the example's anti-affinity select the broker
    # pods the operator builds.
    pdbs = find(objects, "PodDisruptionBudget")
    assert pdbs, f"no PodDisruptionBudget for {example}: {kinds(objects)}"
    for pdb in pdbs:
        assert pdb["spec"].get("maxUnavailable") == 1, pdb["spec"]
    pod_labels = [s["spec"]["template"]["metadata"].get("labels") or {} for s in sts]
    selectors = [(f"PodDisruptionBudget {o['metadata']['name']}", o["spec"]["selector"].get("matchLabels") or {}) for o in pdbs]
    selectors += [
        (f"PodDisruptionBudget {o['metadata']['name']} in the example", o["spec"]["selector"].get("matchLabels") or {})
        for o in checks.load_yaml_docs((EXAMPLES / example).read_text())
        if o.get("kind") == "PodDisruptionBudget"
    ]
    selectors += [(f"affinity {path}", sel) for path, sel in label_selectors(group["spec"].get("podTemplate", {}).get("affinity"))]
    for what, sel in selectors:
        assert sel, f"{example}: {what} has no matchLabels"
        assert any(all(labels.get(k) == v for k, v in sel.items()) for labels in pod_labels), (
            f"{example}: {what} selects {sel}, but the broker pods are labelled {pod_labels}"
        )


def label_selectors(obj, path="") -> list[tuple[str, dict]]:
    """Every labelSelector.matchLabels under an affinity."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "labelSelector" and isinstance(v, dict):
                out.append((path, v.get("matchLabels") or {}))
            else:
                out += label_selectors(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += label_selectors(v, f"{path}[{i}]")
    return out


def broker_pod_problems(pod: dict, owner: dict) -> list[str]:
    """The broker container the operator builds, against the broker image:
    its ports, probes and data directory (see docker/broker.Dockerfile)."""
    problems = []
    containers = [c for c in pod["containers"] if "broker" in c["name"] or "keelmq" in c.get("image", "")]
    if not containers:
        return [f"{checks.object_name(owner)}: no broker container"]
    c = containers[0]
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if set(ports.values()) != set(BROKER_PORTS.values()):
        problems.append(f"container ports {ports}, expected {BROKER_PORTS}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        port = ports.get(get.get("port"), get.get("port"))
        if get.get("path") != path or port != BROKER_PORTS["http"]:
            problems.append(f"{probe} is {get}, expected {path} on {BROKER_PORTS['http']}")
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    if BROKER_DATA_DIR not in mounts:
        problems.append(f"no volume mounted at {BROKER_DATA_DIR}: {mounts}")
    if not any(BROKER_CONFIG.startswith(m.rstrip("/") + "/") or m == BROKER_CONFIG for m in mounts):
        problems.append(f"nothing mounted at {BROKER_CONFIG}: {mounts}")
    return problems


def pod_security_problems(pod: dict) -> list[str]:
    """Where a broker pod breaks Pod Security "restricted" (Kubernetes 1.33),
    lacks the fsGroup that makes a fresh volume writable for the broker's
    user, a read-only root filesystem or a startup probe."""
    problems = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"{key} set")
    for v in pod.get("volumes") or []:
        if "hostPath" in v:
            problems.append(f"hostPath volume {v['name']}")
    if not psc.get("fsGroup"):
        problems.append("no fsGroup: a freshly formatted volume is not writable for the broker's user")
    if psc.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    for c in pod["containers"]:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem writable")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            problems.append(f"{name}: hostPort")
        if not (c.get("startupProbe") or {}).get("httpGet"):
            problems.append(f"{name}: no startup probe (a long recovery would be killed by liveness)")
    return problems


def network_policy_problems(np: dict, broker_labels: dict, op_namespace: str, op_pod_labels: dict) -> list[str]:
    """The operator's NetworkPolicy for a group: it selects the broker pods;
    8081 and 8083 are open; 8082 and 10912 only from the group's pods and the
    operator's pods in the operator's namespace."""
    problems = []
    spec = np["spec"]
    selects = lambda sel, labels: bool(sel) and all(labels.get(k) == v for k, v in sel.items())  # noqa: E731
    if not selects(spec["podSelector"].get("matchLabels"), broker_labels):
        problems.append(f"podSelector {spec['podSelector']} does not select the broker pods {broker_labels}")
    if spec.get("policyTypes") != ["Ingress"]:
        problems.append(f"policyTypes {spec.get('policyTypes')}")
    by_port: dict[int, list] = {}
    for rule in spec.get("ingress") or []:
        for p in rule.get("ports") or []:
            by_port.setdefault(p["port"], []).append(rule.get("from"))
    for name in ("client", "http"):
        if by_port.get(BROKER_PORTS[name]) != [None]:
            problems.append(f"{name} port {BROKER_PORTS[name]} is not open to all: {by_port.get(BROKER_PORTS[name])}")
    for name in ("admin", "replication"):
        rules = by_port.get(BROKER_PORTS[name]) or []
        if len(rules) != 1 or not rules[0]:
            problems.append(f"{name} port {BROKER_PORTS[name]} is open to all or missing: {rules}")
            continue
        peers = rules[0]
        group_peer = [p for p in peers if set(p) == {"podSelector"} and selects(p["podSelector"].get("matchLabels"), broker_labels)]
        op_peer = [
            p
            for p in peers
            if set(p) == {"podSelector", "namespaceSelector"}
            and p["namespaceSelector"].get("matchLabels") == {"kubernetes.io/metadata.name": op_namespace}
            and selects(p["podSelector"].get("matchLabels"), op_pod_labels)
        ]
        if not group_peer or not op_peer or len(peers) != 2:
            problems.append(f"{name} port: peers {peers}, expected the group's pods and the operator's pods in {op_namespace}")
    return problems


# --------------------------------------------------------------------------
# Dockerfiles


def test_broker_dockerfile():
    problems = checks.dockerfile_problems(
        REPO / "docker" / "broker.Dockerfile",
        expect_bins={"keelmq-broker", "keelmq"},
        expect_ports=set(BROKER_PORTS.values()),
        expect_volume=BROKER_DATA_DIR,
    )
    assert not problems, "\n".join(problems)


def test_operator_dockerfile(rendered):
    (dep,) = find(rendered["default"].objects, "Deployment")
    port = dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    problems = checks.dockerfile_problems(
        REPO / "docker" / "operator.Dockerfile",
        expect_bins={"keelmq-operator"},
        expect_ports={port},
        expect_volume=None,
    )
    assert not problems, "\n".join(problems)


def test_dockerignore():
    problems = checks.dockerignore_problems(REPO / ".dockerignore")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------
# the checks can fail: each fed a broken input


FAKE_PERMS = [
    {"apiGroups": ["keelmq.io"], "resources": ["brokergroups"], "verbs": ["get", "list", "watch"], "namespaced": True},
    {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get", "create", "patch"], "namespaced": True},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["get"], "namespaced": False},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"], "namespaced": True},
]


@pytest.fixture(scope="session")
def fake_chart(tmp_path_factory) -> Path:
    """A copy of the chart whose permissions file holds FAKE_PERMS (with a
    cluster-scoped permission, which the real operator may not use)."""
    d = tmp_path_factory.mktemp("chart") / "keelmq"
    shutil.copytree(CHART, d)
    (d / "files" / "operator-rbac.json").write_text(json.dumps(FAKE_PERMS))
    return d


@pytest.mark.parametrize("values_name", VALUE_SETS)
def test_rbac_template_with_cluster_scoped_permissions(fake_chart, values_name):
    values = checks.load_values(values_name)
    objects = checks.render_chart(values, chart_dir=fake_chart).objects
    assert checks.compare_rbac(FAKE_PERMS, objects, values) == []
    crs = find(objects, "ClusterRole")
    assert any(r["resources"] == ["customresourcedefinitions"] for cr in crs for r in cr["rules"])


@pytest.mark.parametrize("values_name", ["default", "single-namespace"])
def test_rbac_comparison_fails_on_broken_rbac(fake_chart, values_name):
    values = checks.load_values(values_name)
    objects = checks.render_chart(values, chart_dir=fake_chart).objects
    # a verb missing from the chart
    broken = json.loads(json.dumps(objects))
    for o in broken:
        for rule in o.get("rules") or []:
            if rule["resources"] == ["statefulsets"]:
                rule["verbs"].remove("patch")
    assert any("does not grant" in p and "patch" in p for p in checks.compare_rbac(FAKE_PERMS, broken, values))
    # a verb more than the operator uses
    perms = json.loads(json.dumps(FAKE_PERMS))
    perms[1]["verbs"].remove("create")
    assert any("does not use" in p and "create" in p for p in checks.compare_rbac(perms, objects, values))
    # a namespaced permission granted cluster-wide in single-namespace mode
    if values.get("watchNamespaces"):
        cluster_objects = checks.render_chart({}, chart_dir=fake_chart).objects
        assert checks.compare_rbac(FAKE_PERMS, cluster_objects, values)
    # a wildcard
    broken = json.loads(json.dumps(objects))
    next(o for o in broken if o["kind"] in ("Role", "ClusterRole"))["rules"][0]["verbs"] = ["*"]
    assert any("wildcard" in p for p in checks.compare_rbac(FAKE_PERMS, broken, values))
    # a permission missing from the operator's list entirely (lease not listed)
    assert any("does not use" in p for p in checks.compare_rbac(FAKE_PERMS[:3], objects, values))


def test_validation_fails_on_broken_objects(rendered, chart_crds, examples):
    (dep,) = find(json.loads(json.dumps(rendered["default"].objects)), "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    assert checks.object_errors(dep, chart_crds)
    dep = find(json.loads(json.dumps(rendered["default"].objects)), "Deployment")[0]
    dep["spec"]["replicas"] = "one"
    assert checks.object_errors(dep, chart_crds)
    (sm,) = find(json.loads(json.dumps(rendered["metrics"].objects)), "ServiceMonitor")
    sm["spec"]["endpoints"][0]["intervall"] = "30s"
    assert checks.object_errors(sm, chart_crds)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert checks.object_errors(unknown, chart_crds)
    (bg,) = find(json.loads(json.dumps(examples["brokergroup-production.yaml"])), "BrokerGroup")
    bg["spec"]["replicaton"] = bg["spec"].pop("replication")
    assert checks.object_errors(bg, chart_crds)
    (bg,) = find(json.loads(json.dumps(examples["brokergroup-production.yaml"])), "BrokerGroup")
    bg["spec"]["replication"]["mode"] = "SYNC"
    assert checks.object_errors(bg, chart_crds)
    bg["spec"]["replication"]["mode"] = "Sync"
    bg["spec"]["replicas"] = "three"
    assert checks.object_errors(bg, chart_crds)


def test_dockerfile_check_fails_on_broken_dockerfiles(tmp_path):
    good = (REPO / "docker" / "broker.Dockerfile").read_text()
    args = dict(expect_bins={"keelmq-broker", "keelmq"}, expect_ports=set(BROKER_PORTS.values()), expect_volume=BROKER_DATA_DIR)
    breakages = {
        "no USER": good.replace("USER 65532:65532", ""),
        "root": good.replace("USER 65532:65532", "USER 0"),
        "no VOLUME": good.replace("VOLUME /var/lib/keelmq", ""),
        "single stage": good.split("FROM gcr.io")[0],
        "unknown bin": good.replace("--bin keelmq-broker", "--bin keelmq-brokr"),
        "port": good.replace("EXPOSE 8081 8082 8083 10912", "EXPOSE 8081"),
        "old rust": good.replace("ARG RUST_VERSION=1.95", "ARG RUST_VERSION=1.70"),
        "older runtime glibc": good.replace("ARG DEBIAN_RELEASE=bookworm", "ARG DEBIAN_RELEASE=trixie"),
    }
    for what, text in breakages.items():
        p = tmp_path / "broker.Dockerfile"
        p.write_text(text)
        assert checks.dockerfile_problems(p, **args), f"the Dockerfile check missed: {what}"
    ignore = tmp_path / ".dockerignore"
    ignore.write_text("target\n")
    assert checks.dockerignore_problems(ignore)
    ignore.write_text(".git\n.venv\ntarget\nbroker\n")
    assert checks.dockerignore_problems(ignore)


def test_broker_pod_check_fails_on_a_wrong_pod():
    pod = {
        "containers": [
            {
                "name": "broker",
                "ports": [{"name": "http", "containerPort": 8083}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                "volumeMounts": [{"mountPath": "/data"}],
            }
        ]
    }
    assert len(broker_pod_problems(pod, {"kind": "StatefulSet", "metadata": {"name": "x"}})) >= 4
    problems = " ".join(pod_security_problems(pod))
    for what in ("fsGroup", "runAsNonRoot", "allowPrivilegeEscalation", "ALL", "seccompProfile", "root filesystem", "startup probe"):
        assert what in problems, f"the pod security check missed {what}: {problems}"


def test_network_policy_check_fails_on_a_wrong_policy():
    broker = {"app.kubernetes.io/instance": "g", "app.kubernetes.io/component": "broker"}
    op = {"app.kubernetes.io/component": "operator"}
    good = {
        "spec": {
            "podSelector": {"matchLabels": broker},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"port": 8081}, {"port": 8083}]},
                {
                    "from": [
                        {"podSelector": {"matchLabels": broker}},
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}, "podSelector": {"matchLabels": op}},
                    ],
                    "ports": [{"port": 8082}, {"port": 10912}],
                },
            ],
        }
    }
    assert network_policy_problems(good, broker, "ops", op) == []
    assert network_policy_problems(good, broker, "elsewhere", op), "operator namespace"
    open_admin = json.loads(json.dumps(good))
    open_admin["spec"]["ingress"][0]["ports"].append({"port": 8082})
    assert network_policy_problems(open_admin, broker, "ops", op), "admin open to all"
    whole_ns = json.loads(json.dumps(good))
    del whole_ns["spec"]["ingress"][1]["from"][1]["podSelector"]
    assert network_policy_problems(whole_ns, broker, "ops", op), "a whole namespace admitted"
