#!/usr/bin/env bash
# Checks the Helm chart in k8s/ without a cluster and without a helm binary:
#
#   1. lints it (Helm v4's linter, strict: warnings fail too) with the default
#      values and with k8s/ci/production-values.yaml;
#   2. renders it with both (the Helm Go SDK, through PyPI helm-python-sdk),
#      which also validates the values against values.schema.json, and writes
#      the manifests to target/chart-render/<default|production>/;
#   3. validates every rendered manifest with `kubernetes-validate --strict`
#      against the newest Kubernetes version it bundles (at least 1.31). Kinds
#      from CRDs (SKIP_KINDS) have no bundled schema and are skipped, by name;
#      any other kind without a schema fails;
#   4. runs deploy/env-drift-check.sh when the binaries exist (RELAY_BIN_DIR,
#      default target/debug), and says it skipped it otherwise.
#
# Usage: deploy/chart-check.sh        (from anywhere; exits non-zero on failure)
#
# The Python tools live in a venv at target/chart-venv, created (from PyPI)
# when missing or when the pinned versions below change.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
PROG="chart-check"

CHART_DIR="k8s"
PRODUCTION_VALUES="k8s/ci/production-values.yaml"
VENV="target/chart-venv"
RENDER_DIR="target/chart-render"
BIN_DIR="${RELAY_BIN_DIR:-target/debug}"
# Versions the script was written against (the helm-python-sdk API is read
# from its source; kubernetes-validate's bundled schemas decide the version).
REQUIREMENTS=("helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0")
# Custom resources: kubernetes-validate bundles no schema for them.
SKIP_KINDS="ServiceMonitor PodMonitor"
# Oldest Kubernetes minor version acceptable as "newest bundled".
MIN_KUBE_MINOR="1.31"
# Release name and namespace of the offline renders.
RELEASE="relay"
NAMESPACE="nostr-relay"

log() { printf '[%s] %s\n' "$PROG" "$*"; }
die() {
    printf '[%s] error: %s\n' "$PROG" "$*" >&2
    exit 1
}

cd "$REPO_ROOT"
START=$SECONDS

# --- Python tools -------------------------------------------------------------

ensure_venv() {
    local stamp="$VENV/.chart-check-requirements" want="${REQUIREMENTS[*]}"
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] &&
        "$VENV/bin/python" -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null; then
        return 0
    fi
    local python
    python="$(command -v python3 || true)"
    [[ -n "$python" ]] || die "python3 not found (needed for the chart tools)"
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating $VENV"
        mkdir -p "$(dirname "$VENV")"
        if ! "$python" -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            # Debian's python3 needs python3-venv for `python3 -m venv`.
            if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" -eq 0 ]]; then
                log "python3 -m venv failed; installing python3-venv"
                if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
                    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }; then
                    die "could not install python3-venv"
                fi
            fi
            "$python" -m venv "$VENV" || die "could not create a venv at $VENV (is python3-venv installed?)"
        fi
    fi
    log "installing ${REQUIREMENTS[*]} into $VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "${REQUIREMENTS[@]}" ||
        die "pip install ${REQUIREMENTS[*]} failed"
    "$VENV/bin/python" -c 'import helm_python, kubernetes_validate, yaml' ||
        die "the chart tools do not import after installing them"
    printf '%s\n' "$want" >"$stamp"
}

ensure_venv
PY="$VENV/bin/python"

# --- lint, render, validate ---------------------------------------------------

rm -rf "$RENDER_DIR"
mkdir -p "$RENDER_DIR"

"$PY" - "$CHART_DIR" "$PRODUCTION_VALUES" "$RENDER_DIR" "$RELEASE" "$NAMESPACE" \
    "$VENV/bin/kubernetes-validate" "$SKIP_KINDS" "$MIN_KUBE_MINOR" <<'PY'
import os
import re
import subprocess
import sys

import yaml
from packaging.version import Version

import helm_python as helm
import kubernetes_validate.utils as kv_utils

(chart_dir, production_values, render_dir, release, namespace,
 kv_cli, skip_kinds, min_minor) = sys.argv[1:]
skip_kinds = set(skip_kinds.split())


def log(msg):
    print(f"[chart-check] {msg}", flush=True)


failures = []

kube = kv_utils.latest_version()
if Version(kv_utils.major_minor(kube)) < Version(min_minor):
    sys.exit(f"[chart-check] error: kubernetes-validate's newest schema is {kube}, older than {min_minor}")
log(f"Helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}); "
    f"schemas: Kubernetes {kube} (kubernetes-validate, strict)")

with open(production_values) as f:
    prod = helm.values_from_yaml(f.read())
renders = [("default", None, "default values"), ("production", prod, production_values)]

# Resources each render must contain: (kind, name suffix after the full name).
expected = {
    "default": [("ConfigMap", "gateway"), ("ConfigMap", "ingest-worker"), ("ConfigMap", "query-worker"),
                ("Secret", ""), ("ServiceAccount", ""), ("Service", "gateway"), ("PodDisruptionBudget", "gateway"),
                ("Deployment", "gateway"), ("Deployment", "ingest-worker"), ("Deployment", "query-worker")],
    "production": [("ConfigMap", "gateway"), ("ConfigMap", "ingest-worker"), ("ConfigMap", "query-worker"),
                   ("ServiceAccount", ""), ("Service", "gateway"), ("PodDisruptionBudget", "gateway"),
                   ("Deployment", "gateway"), ("Deployment", "ingest-worker"), ("Deployment", "query-worker"),
                   ("Ingress", "gateway"), ("HorizontalPodAutoscaler", "gateway"),
                   ("HorizontalPodAutoscaler", "ingest-worker"), ("HorizontalPodAutoscaler", "query-worker"),
                   ("ServiceMonitor", "gateway"), ("PodMonitor", "workers")],
}

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def null_paths(node, prefix=""):
    """Paths of null values: a template referring to a missing value renders
    an empty (null) field, which the schemas accept."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from null_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from null_paths(v, f"{prefix}[{i}]")
    elif node is None:
        yield prefix
files_to_validate = []

with helm.Chart.load(chart_dir) as chart:
    meta = chart.metadata
    log(f"chart {meta.get('name')} {meta.get('version')} (app {meta.get('appVersion')}) from {chart_dir}/")
    for label, values, source in renders:
        # 1. lint
        report = helm.lint(chart_dir, values, strict=True, namespace=namespace, kube_version=f"v{kube}")
        bad = 0
        for m in report.get("messages", []):
            sev = m.get("severity", 0)
            line = f"lint ({label}): [{SEVERITY.get(sev, sev)}] {m.get('path')}: {m.get('error')}"
            if sev >= 2 or sev == 0:
                bad += 1
                failures.append(line)
            log(line)
        for e in report.get("errors", []):
            bad += 1
            failures.append(f"lint ({label}): {e}")
            log(f"lint ({label}): error: {e}")
        log(f"lint ({label}, {source}): {'FAILED' if bad else 'ok'}")

        # 2. render (validates the values against values.schema.json first)
        try:
            manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
        except helm.HelmError as e:
            failures.append(f"render ({label}): {e}")
            log(f"render ({label}): FAILED: {e}")
            continue
        out = os.path.join(render_dir, label)
        kinds = []
        for path, text in sorted(manifests.items()):
            dest = os.path.join(out, path)
            if path.endswith("NOTES.txt"):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "w") as f:
                    f.write(text)
                urls = [l.strip() for l in text.splitlines() if re.search(r"^\s+(wss?)://", l)]
                log(f"render ({label}): NOTES.txt relay URL: {urls[0] if urls else '(none)'}")
                continue
            try:
                docs = [d for d in yaml.safe_load_all(text) if d]
            except yaml.YAMLError as e:
                failures.append(f"render ({label}): {path} is not valid YAML: {e}")
                continue
            if not docs:
                continue  # a template switched off by values
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "w") as f:
                f.write(text)
            files_to_validate.append(dest)
            for d in docs:
                if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
                    failures.append(f"render ({label}): {path} has a document without apiVersion/kind")
                    continue
                kinds.append((d["kind"], d.get("metadata", {}).get("name", "")))
                for p in null_paths(d):
                    failures.append(f"render ({label}): {path}: {d['kind']} {kinds[-1][1]}: {p} is empty "
                                    "(a value the template refers to is missing?)")
        fullname_prefix = None
        for kind, name in kinds:
            if kind == "ServiceAccount":
                fullname_prefix = name
        for kind, suffix in expected[label]:
            ok = any(k == kind and (name.endswith("-" + suffix) if suffix else name == fullname_prefix)
                     for k, name in kinds)
            if not ok:
                failures.append(f"render ({label}): no {kind} {('*-' + suffix) if suffix else ''} rendered")
        log(f"render ({label}): {len(kinds)} resources -> {out}/")

# 3. validate every rendered manifest (the CLI, one call for all files)
if files_to_validate:
    proc = subprocess.run([kv_cli, "--strict", "-k", kube] + files_to_validate,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    passed = 0
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        if line.startswith("INFO ") and " passed for resource " in line:
            passed += 1
            continue
        m = re.match(r"WARN (\S+) Couldn't find schema for kind (\S+) with api version (\S+)", line)
        if m and m.group(2) in skip_kinds:
            log(f"validate: SKIPPED {m.group(2)} ({m.group(3)}) in {m.group(1)}: "
                "custom resource, kubernetes-validate bundles no schema for it")
            continue
        failures.append(f"validate: {line}")
        log(f"validate: {line}")
    if proc.returncode != 0 and not any(f.startswith("validate:") for f in failures):
        failures.append(f"validate: kubernetes-validate exited with {proc.returncode}")
    log(f"validate: {passed} resources passed kubernetes-validate --strict against Kubernetes {kube}")

if failures:
    print(f"[chart-check] FAILED: {len(failures)} problem(s):", file=sys.stderr)
    for f in failures:
        print(f"  - {f}", file=sys.stderr)
    sys.exit(1)
PY

# --- config-name drift --------------------------------------------------------

missing=()
for b in gateway ingest-worker query-worker; do
    [[ -x "$BIN_DIR/$b" ]] || missing+=("$b")
done
if ((${#missing[@]} == 0)); then
    PYTHON="$PY" RENDER_DIR="$RENDER_DIR" bash "$SCRIPT_DIR/env-drift-check.sh" "$BIN_DIR"
else
    log "SKIPPED the env drift check: ${missing[*]} not built in $BIN_DIR (cargo build, then rerun)"
fi

log "ok ($((SECONDS - START))s)"
