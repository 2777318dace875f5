"""The chart checks' building blocks: rendering with Helm's own Go code
(helm-python-sdk), schema validation, the RBAC comparison and a Dockerfile
reader. Pure functions where possible, so that test_chart.py can feed each
of them a broken input and see it fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "keelmq"
CHART_TESTS = REPO / "charts" / "tests"
EXAMPLES = CHART / "examples"
SOURCE_CRDS = REPO / "crds"

# The Kubernetes version every object is validated against: the API level the
# operator is built for (k8s-openapi feature v1_33), and one the chart's
# kubeVersion (>=1.30) admits.
KUBE_VERSION = "1.33.0"

RELEASE = "keelmq"
RELEASE_NAMESPACE = "keelmq-system"

# How long one call of the operator binary may take.
BIN_TIMEOUT_S = 60


# --------------------------------------------------------------------------
# YAML and rendering


def load_yaml_docs(text: str) -> list[dict]:
    """Every non-empty document of a multi-document YAML string."""
    return [d for d in yaml.safe_load_all(text) if d]


def load_values(name: str) -> dict:
    """A values file from charts/tests/values (name without .yaml), or {} for "default"."""
    if name == "default":
        return {}
    return yaml.safe_load((CHART_TESTS / "values" / f"{name}.yaml").read_text()) or {}


@dataclass
class Rendered:
    objects: list[dict]
    notes: str
    # template path -> objects, for messages
    by_template: dict[str, list[dict]] = field(default_factory=dict)


def render_chart(
    values: dict, chart_dir: Path = CHART, namespace: str = RELEASE_NAMESPACE, release: str = RELEASE
) -> Rendered:
    """`helm template` with Helm's Go code: values are checked against
    values.schema.json first, as `helm install` does."""
    with helm.Chart.load(str(chart_dir)) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    objects: list[dict] = []
    by_template: dict[str, list[dict]] = {}
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        if not path.endswith((".yaml", ".yml")):
            continue
        docs = load_yaml_docs(text)
        by_template[path] = docs
        objects.extend(docs)
    return Rendered(objects, notes, by_template)


def lint_chart(values: dict, chart_dir: Path = CHART) -> list[str]:
    """`helm lint --strict` findings of severity warning or error, as text."""
    report = helm.lint(
        str(chart_dir),
        values,
        strict=True,
        namespace=RELEASE_NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    found = [f"{m.get('path')}: {m.get('error')}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    found += [str(e) for e in report.get("errors") or []]
    return found


def object_name(obj: dict) -> str:
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    return f"{obj.get('kind')}/{(ns + '/') if ns else ''}{md.get('name')}"


# --------------------------------------------------------------------------
# Schema validation


# The Prometheus Operator's ServiceMonitor is not a built-in kind, so
# kubernetes-validate has no schema for it. This is a small, strict subset of
# monitoring.coreos.com/v1 ServiceMonitor covering the fields the chart uses
# (names and types as in the Prometheus Operator's CRD); an unknown or
# misspelt field fails.
SERVICE_MONITOR_SCHEMA: dict = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


# The same for a PodMonitor (monitoring.coreos.com/v1), which the chart makes
# for the brokers: its endpoints are `podMetricsEndpoints`, the rest as a
# ServiceMonitor's subset above.
POD_MONITOR_SCHEMA: dict = json.loads(json.dumps(SERVICE_MONITOR_SCHEMA))
POD_MONITOR_SCHEMA["properties"]["kind"] = {"const": "PodMonitor"}
_pm_spec = POD_MONITOR_SCHEMA["properties"]["spec"]
_pm_spec["required"] = ["selector", "podMetricsEndpoints"]
_pm_spec["properties"]["podMetricsEndpoints"] = _pm_spec["properties"].pop("endpoints")


def validate_builtin(obj: dict) -> None:
    """A built-in Kubernetes object against the OpenAPI schema of KUBE_VERSION,
    strict: unknown fields are errors. Raises on any problem, including a
    kind the schemas do not know."""
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def crd_group(obj: dict) -> str:
    api_version = obj.get("apiVersion", "")
    return api_version.split("/")[0] if "/" in api_version else ""


def structural_to_jsonschema(schema: Any, strict: bool = True) -> Any:
    """A Kubernetes structural schema (a CRD's openAPIV3Schema) as JSON Schema.

    What the API server does that JSON Schema does not say by itself:
    nullable, x-kubernetes-int-or-string and x-kubernetes-embedded-resource
    are translated; with strict, an object with properties and no
    additionalProperties (which the API server would silently prune) rejects
    unknown fields, so that a misspelt field in an example is an error.
    x-kubernetes-validations (CEL) rules are kept as inert keywords: jsonschema
    does not evaluate CEL.
    """
    if isinstance(schema, list):
        return [structural_to_jsonschema(s, strict) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "definitions", "$defs"):
            out[key] = {k: structural_to_jsonschema(v, strict) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = structural_to_jsonschema(value, strict)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural_to_jsonschema(v, strict) for v in value]
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        if "anyOf" not in out:
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if schema.get("nullable") and "type" in out:
        t = out["type"]
        out["type"] = list(dict.fromkeys((t if isinstance(t, list) else [t]) + ["null"]))
    if (
        strict
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def cel_rules(schema: Any, path: str = "") -> list[tuple[str, str]]:
    """Every x-kubernetes-validations rule in a schema: (JSON path, rule)."""
    found: list[tuple[str, str]] = []
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations") or []:
            found.append((path or ".", rule.get("rule", "")))
        for key, value in schema.items():
            if key in ("properties", "patternProperties"):
                for name, sub in value.items():
                    found += cel_rules(sub, f"{path}.{name}")
            elif key in ("items", "additionalProperties"):
                found += cel_rules(value, f"{path}[]")
            elif key in ("allOf", "anyOf", "oneOf"):
                for sub in value:
                    found += cel_rules(sub, path)
    return found


@dataclass
class CrdVersion:
    group: str
    kind: str
    plural: str
    version: str
    scope: str
    schema: dict  # openAPIV3Schema, as written
    served: bool
    storage: bool


def crd_versions(crd: dict) -> list[CrdVersion]:
    spec = crd["spec"]
    return [
        CrdVersion(
            group=spec["group"],
            kind=spec["names"]["kind"],
            plural=spec["names"]["plural"],
            version=v["name"],
            scope=spec["scope"],
            schema=v["schema"]["openAPIV3Schema"],
            served=v.get("served", False),
            storage=v.get("storage", False),
        )
        for v in spec["versions"]
    ]


def load_crds(directory: Path) -> list[dict]:
    crds: list[dict] = []
    for path in sorted(directory.glob("*.yaml")):
        crds.extend(load_yaml_docs(path.read_text()))
    return crds


def custom_resource_errors(obj: dict, crds: Iterable[dict]) -> list[str]:
    """Errors of a custom resource against the served CRD version that
    defines it (jsonschema, strict on unknown fields; CEL not evaluated)."""
    group, _, version = obj.get("apiVersion", "").partition("/")
    for crd in crds:
        for v in crd_versions(crd):
            if v.group == group and v.version == version and v.kind == obj.get("kind"):
                if not v.served:
                    return [f"{obj.get('apiVersion')} {v.kind} is not served"]
                errors = []
                md = obj.get("metadata") or {}
                if not md.get("name"):
                    errors.append("metadata.name is missing")
                if v.scope == "Cluster" and md.get("namespace"):
                    errors.append("a cluster-scoped resource has a namespace")
                # The API server adds apiVersion, kind and metadata to every
                # custom resource's root schema itself.
                root = dict(v.schema)
                root["properties"] = {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    **(v.schema.get("properties") or {}),
                }
                validator = jsonschema.Draft202012Validator(structural_to_jsonschema(root))
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
                    where = ".".join(str(p) for p in e.absolute_path) or "(root)"
                    errors.append(f"{where}: {e.message}")
                return errors
    return [f"no CRD defines {obj.get('apiVersion')} {obj.get('kind')}"]


def object_errors(obj: dict, crds: Iterable[dict]) -> list[str]:
    """Validation errors of one object of any kind the chart or examples use."""
    group = crd_group(obj)
    if group == "keelmq.io":
        return custom_resource_errors(obj, crds)
    if group == "monitoring.coreos.com":
        schema = POD_MONITOR_SCHEMA if obj.get("kind") == "PodMonitor" else SERVICE_MONITOR_SCHEMA
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    try:
        validate_builtin(obj)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(root)"
        return [f"{where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


# --------------------------------------------------------------------------
# RBAC

LEASE = ("coordination.k8s.io", "leases")

OPERATOR_RBAC_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["apiGroups", "resources", "verbs", "namespaced"],
        "additionalProperties": False,
        "properties": {
            "apiGroups": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "resources": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            "verbs": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            "namespaced": {"type": "boolean"},
        },
    },
}

# (scope, apiGroup, resource, verb); scope is "*" for a ClusterRoleBinding
# (every namespace and the cluster-scoped resources) or a namespace.
Grant = tuple[str, str, str, str]


def check_operator_rbac_shape(perms: Any) -> None:
    jsonschema.validate(perms, OPERATOR_RBAC_SCHEMA)
    for p in perms:
        for s in ("apiGroups", "resources", "verbs"):
            if "*" in p[s]:
                raise ValueError(f"the operator asks for a wildcard in {s}: {p}")


def required_grants(
    perms: list[dict], watch_namespaces: list[str], release_namespace: str, leader_election: bool
) -> set[Grant]:
    """What the chart must grant, and all it may grant, for these operator
    permissions (the `keelmq-operator rbac` JSON)."""
    out: set[Grant] = set()
    for p in perms:
        for g in p["apiGroups"]:
            for r in p["resources"]:
                for v in p["verbs"]:
                    if (g, r) == LEASE:
                        if leader_election:
                            out.add((release_namespace, g, r, v))
                    elif p["namespaced"]:
                        for ns in watch_namespaces or ["*"]:
                            out.add((ns, g, r, v))
                    else:
                        out.add(("*", g, r, v))
    return out


def chart_grants(objects: list[dict], sa_name: str, sa_namespace: str, lease_name: str) -> tuple[set[Grant], list[str]]:
    """What the rendered objects grant the operator's ServiceAccount, and any
    problems found on the way (wildcards, names restricted where the operator
    needs more, bindings to roles the chart does not render)."""
    problems: list[str] = []
    roles: dict[tuple[str, str, str], list[dict]] = {}
    for o in objects:
        if o.get("kind") in ("Role", "ClusterRole") and crd_group(o) == "rbac.authorization.k8s.io":
            if o.get("aggregationRule"):
                problems.append(f"{object_name(o)} aggregates other roles")
            ns = o["metadata"].get("namespace", "") if o["kind"] == "Role" else ""
            roles[(o["kind"], ns, o["metadata"]["name"])] = o.get("rules") or []
    grants: set[Grant] = set()
    for o in objects:
        if o.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = o.get("subjects") or []
        if not any(
            s.get("kind") == "ServiceAccount" and s.get("name") == sa_name and s.get("namespace") == sa_namespace
            for s in subjects
        ):
            continue
        ref = o["roleRef"]
        scope = "*" if o["kind"] == "ClusterRoleBinding" else o["metadata"]["namespace"]
        key = (ref["kind"], "" if ref["kind"] == "ClusterRole" else o["metadata"]["namespace"], ref["name"])
        if key not in roles:
            problems.append(f"{object_name(o)} binds {ref['kind']} {ref['name']}, which the chart does not render")
            continue
        for rule in roles[key]:
            if rule.get("nonResourceURLs"):
                problems.append(f"{key[0]} {key[2]} grants nonResourceURLs {rule['nonResourceURLs']}")
            for s in ("apiGroups", "resources", "verbs"):
                if "*" in (rule.get(s) or []):
                    problems.append(f"{key[0]} {key[2]} has a wildcard in {s}: {rule}")
            names = rule.get("resourceNames")
            for g in rule.get("apiGroups") or []:
                for r in rule.get("resources") or []:
                    if names and ((g, r) != LEASE or names != [lease_name]):
                        problems.append(f"{key[0]} {key[2]} restricts {g}/{r} to {names}")
                        continue
                    for v in rule.get("verbs") or []:
                        grants.add((scope, g, r, v))
    return grants, problems


def fmt_grants(grants: Iterable[Grant]) -> str:
    return "\n".join(f"  {s:>16}  {g or 'core'}/{r}: {v}" for s, g, r, v in sorted(grants))


def compare_rbac(
    perms: list[dict], objects: list[dict], values: dict, release_namespace: str = RELEASE_NAMESPACE
) -> list[str]:
    """Every permission the operator uses is granted by the rendered chart,
    in the right scope, and nothing more. Returns the differences."""
    check_operator_rbac_shape(perms)
    merged = merged_values(values)
    sa = service_account_name(merged)
    lease_name = lease_name_of(merged)
    want = required_grants(perms, merged["watchNamespaces"], release_namespace, merged["leaderElection"]["enabled"])
    have, problems = chart_grants(objects, sa, release_namespace, lease_name)
    for dep in (o for o in objects if o.get("kind") == "Deployment"):
        runs_as = dep["spec"]["template"]["spec"].get("serviceAccountName", "default")
        if runs_as != sa:
            problems.append(f"{object_name(dep)} runs as ServiceAccount {runs_as}, the RBAC binds {sa}")
    missing = want - have
    extra = have - want
    if missing:
        problems.append("the operator uses these, the chart does not grant them:\n" + fmt_grants(missing))
    if extra:
        problems.append("the chart grants these, the operator does not use them:\n" + fmt_grants(extra))
    return problems


def merged_values(values: dict) -> dict:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.merge_values(values)


def fullname(merged: dict, release: str = RELEASE) -> str:
    if merged.get("fullnameOverride"):
        return merged["fullnameOverride"][:63].rstrip("-")
    name = merged.get("nameOverride") or "keelmq"
    if name in release:
        return release[:63].rstrip("-")
    return f"{release}-{name}-operator"[:63].rstrip("-")


def service_account_name(merged: dict) -> str:
    sa = merged["serviceAccount"]
    if sa["create"]:
        return sa.get("name") or fullname(merged)
    return sa.get("name") or "default"


def lease_name_of(merged: dict, release: str = RELEASE) -> str:
    return merged["leaderElection"].get("leaseName") or fullname(merged, release)


# --------------------------------------------------------------------------
# The operator binary


class OperatorBinaryMissing(RuntimeError):
    pass


def operator_bin() -> Path:
    """$KEELMQ_OPERATOR_BIN, which must exist and be executable."""
    value = os.environ.get("KEELMQ_OPERATOR_BIN", "")
    if not value:
        raise OperatorBinaryMissing(
            "KEELMQ_OPERATOR_BIN is not set: these checks need the built keelmq-operator "
            "(scripts/test sets it to $CARGO_TARGET_DIR/debug/keelmq-operator)"
        )
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise OperatorBinaryMissing(f"KEELMQ_OPERATOR_BIN={value} is not an executable file")
    return path


def run_operator(*args: str) -> str:
    bin_path = operator_bin()
    proc = subprocess.run(
        [str(bin_path), *args],
        capture_output=True,
        text=True,
        timeout=BIN_TIMEOUT_S,
        env={**os.environ, "RUST_LOG": "error"},
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{bin_path.name} {shlex.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


# --------------------------------------------------------------------------
# Dockerfiles


@dataclass
class Instruction:
    cmd: str  # upper case
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Handles comments, parser directives and
    backslash continuations; enough for this project's Dockerfiles."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append((start, buf))
        buf = ""
    if buf:
        raise ValueError("the Dockerfile ends inside a line continuation")
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text_line in logical:
        cmd, _, args = text_line.partition(" ")
        cmd = cmd.upper()
        args = args.strip()
        if cmd == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=substitute(base, global_args), name=name))
        elif not stages:
            if cmd != "ARG":
                raise ValueError(f"line {line}: {cmd} before the first FROM")
            key, _, default = args.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append(Instruction(cmd, args, line))
    return global_args, stages


def substitute(s: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), s)


def exec_form(args: str) -> list[str]:
    """An instruction's JSON (exec) form, or [] when it uses the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else []


def copy_parts(args: str) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY."""
    tokens = shlex.split(args)
    flags = {}
    while tokens and tokens[0].startswith("--"):
        k, _, v = tokens.pop(0)[2:].partition("=")
        flags[k] = v
    return flags, tokens[:-1], tokens[-1]


def workspace() -> dict[str, Any]:
    """The Cargo workspace: member directories, package names, binaries and
    the highest rust-version any member asks for."""
    root = tomllib.loads((REPO / "Cargo.toml").read_text())
    members = root["workspace"]["members"]
    ws_pkg = root["workspace"].get("package", {})
    packages: dict[str, dict] = {}
    rust_versions = [ws_pkg["rust-version"]] if "rust-version" in ws_pkg else []
    for m in members:
        manifest = tomllib.loads((REPO / m / "Cargo.toml").read_text())
        pkg = manifest["package"]
        bins = {b["name"] for b in manifest.get("bin", [])}
        if (REPO / m / "src" / "main.rs").exists() and pkg.get("autobins", True):
            bins.add(pkg["name"])
        if pkg.get("autobins", True):
            bins |= {p.stem for p in (REPO / m / "src" / "bin").glob("*.rs")}
            bins |= {p.parent.name for p in (REPO / m / "src" / "bin").glob("*/main.rs")}
        rv = pkg.get("rust-version")
        if isinstance(rv, str):
            rust_versions.append(rv)
        packages[pkg["name"]] = {"dir": m, "bins": bins}
    return {"members": members, "packages": packages, "rust_version": max(rust_versions, key=version_key, default="0")}


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def dockerignore_patterns(path: Path) -> list[tuple[bool, str]]:
    """(negated, pattern) lines of a .dockerignore."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        out.append((neg, line[1:] if neg else line))
    return out


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether a context path is excluded: the last matching pattern wins,
    and a pattern that excludes a directory excludes what is inside it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, pat in patterns:
        rx = _dockerignore_regex(pat.strip("/"))
        if any(rx.match(p) for p in prefixes):
            excluded = not neg
    return excluded


def dockerfile_problems(path: Path, expect_bins: set[str], expect_ports: set[int], expect_volume: str | None) -> list[str]:
    """What is wrong with one of the project's Dockerfiles (see test_chart.py)."""
    problems: list[str] = []
    global_args, stages = parse_dockerfile(path.read_text())
    ws = workspace()
    all_bins = {b: name for name, p in ws["packages"].items() for b in p["bins"]}
    if len(stages) < 2:
        return [f"{path.name}: not a multi-stage build ({len(stages)} stage)"]
    names = {s.name for s in stages if s.name}
    final = stages[-1]
    builders = stages[:-1]
    # the builder: a pinned Rust image new enough for the workspace, building with --locked
    rust_builder = None
    for s in builders:
        m = re.match(r"^(?:docker\.io/(?:library/)?)?rust:(\d+\.\d+(?:\.\d+)?)", s.base)
        if m:
            rust_builder = s
            if version_key(m.group(1)) < version_key(ws["rust_version"]):
                problems.append(f"{path.name}: builder {s.base} is older than the workspace's rust-version {ws['rust_version']}")
    if rust_builder is None:
        problems.append(f"{path.name}: no stage builds FROM a versioned rust image (got {[s.base for s in builders]})")
    if re.match(r"^(?:docker\.io/(?:library/)?)?rust:", final.base):
        problems.append(f"{path.name}: the runtime stage is the Rust toolchain image {final.base}")
    if ":latest" in final.base or ":" not in final.base.split("/")[-1]:
        problems.append(f"{path.name}: runtime base {final.base} is not pinned to a tag")
    # glibc: a Debian N builder needs a runtime of Debian N or later
    debian = {"bullseye": 11, "bookworm": 12, "trixie": 13}
    bm = re.search(r"(bullseye|bookworm|trixie)", rust_builder.base) if rust_builder else None
    rm = re.search(r"debian(\d+)", final.base) or re.search(r"(bullseye|bookworm|trixie)", final.base)
    if bm and rm:
        rt = int(rm.group(1)) if rm.group(1).isdigit() else debian[rm.group(1)]
        if rt < debian[bm.group(1)]:
            problems.append(f"{path.name}: runtime {final.base} has an older glibc than builder {rust_builder.base}")
    if rust_builder:
        built = set()
        for run in rust_builder.all("RUN"):
            if "cargo build" in run.args:
                if "--locked" not in run.args:
                    problems.append(f"{path.name}:{run.line}: cargo build without --locked")
                if "--release" not in run.args:
                    problems.append(f"{path.name}:{run.line}: cargo build without --release")
                for b in re.findall(r"--bin[ =]([\w-]+)", run.args):
                    built.add(b)
                    if b not in all_bins:
                        problems.append(f"{path.name}:{run.line}: cargo builds --bin {b}, which no workspace package has")
                for p in re.findall(r"(?:-p|--package)[ =]([\w-]+)", run.args):
                    if p not in ws["packages"]:
                        problems.append(f"{path.name}:{run.line}: cargo builds -p {p}, which is not a workspace member")
        if not built:
            problems.append(f"{path.name}: the builder names no --bin to build")
        for cp in rust_builder.all("COPY"):
            _, srcs, _ = copy_parts(cp.args)
            for src in srcs:
                if src != "." and not (REPO / src).exists():
                    problems.append(f"{path.name}:{cp.line}: COPY {src}: no such path in the repository")
    # the runtime: binaries copied from the builder, all of them workspace bins
    copied: dict[str, str] = {}
    for cp in final.all("COPY"):
        flags, srcs, dest = copy_parts(cp.args)
        if "from" in flags and flags["from"] not in names:
            problems.append(f"{path.name}:{cp.line}: COPY --from={flags['from']}: no such stage")
        for src in srcs:
            base = os.path.basename(src.rstrip("/"))
            if "from" in flags and base in all_bins:
                copied[base] = dest if not dest.endswith("/") else dest + base
    missing = expect_bins - set(copied)
    if missing:
        problems.append(f"{path.name}: the runtime stage does not copy {sorted(missing)} from the builder")
    for b in copied:
        if rust_builder and b not in built:
            problems.append(f"{path.name}: copies {b}, which the builder does not build with --bin")
    # non-root
    users = final.all("USER")
    if not users:
        problems.append(f"{path.name}: the runtime stage sets no USER (it would run as root)")
    else:
        uid = users[-1].args.split(":")[0]
        if not uid.isdigit():
            problems.append(f"{path.name}: USER {users[-1].args} is not numeric (runAsNonRoot cannot verify a name)")
        elif int(uid) == 0:
            problems.append(f"{path.name}: USER {users[-1].args} is root")
        elif int(uid) != 65532:
            problems.append(f"{path.name}: USER {users[-1].args}: the project's images run as 65532")
    # entrypoint
    entry = final.all("ENTRYPOINT")
    if not entry:
        problems.append(f"{path.name}: no ENTRYPOINT")
    else:
        argv = exec_form(entry[-1].args)
        if not argv:
            problems.append(f"{path.name}: ENTRYPOINT is not in exec (JSON) form")
        elif argv[0] not in copied.values():
            problems.append(f"{path.name}: ENTRYPOINT {argv[0]} is not a binary copied from the builder ({copied})")
    # ports and volume
    exposed: set[int] = set()
    for ex in final.all("EXPOSE"):
        for p in ex.args.split():
            exposed.add(int(p.split("/")[0]))
    if exposed != expect_ports:
        problems.append(f"{path.name}: EXPOSE {sorted(exposed)}, expected {sorted(expect_ports)}")
    volumes: set[str] = set()
    for v in final.all("VOLUME"):
        volumes |= set(exec_form(v.args) or v.args.split())
    if expect_volume and expect_volume not in volumes:
        problems.append(f"{path.name}: no VOLUME {expect_volume}")
    if expect_volume:
        owned = any(
            copy_parts(cp.args)[2].rstrip("/") == expect_volume and copy_parts(cp.args)[0].get("chown", "").split(":")[0] == "65532"
            for cp in final.all("COPY")
        )
        if not owned:
            problems.append(f"{path.name}: {expect_volume} is not created owned by 65532 (COPY --chown=65532:65532 ...)")
    if not expect_volume and volumes:
        problems.append(f"{path.name}: unexpected VOLUME {sorted(volumes)}")
    return problems


def dockerignore_problems(path: Path) -> list[str]:
    if not path.exists():
        return [".dockerignore is missing: the build context would carry target/ and .git/"]
    pats = dockerignore_patterns(path)
    problems = []
    for rel in ("target", ".git", ".venv"):
        if not dockerignored(rel, pats):
            problems.append(f".dockerignore does not exclude {rel}/")
    ws = workspace()
    for rel in ["Cargo.toml", "Cargo.lock", *(f"{m}/Cargo.toml" for m in ws["members"]), *(f"{m}/src" for m in ws["members"])]:
        if (REPO / rel).exists() and dockerignored(rel, pats):
            problems.append(f".dockerignore excludes {rel}, which the build needs")
    return problems


