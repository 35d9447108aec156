#!/usr/bin/env bash
# Config-name drift check: every environment variable that a deployment file
# sets for a relay binary must be one that binary reads.
#
# Usage (from anywhere; paths are taken from the repository root):
#   deploy/env-drift-check.sh [BIN_DIR]
#
#   BIN_DIR      directory with built gateway, ingest-worker and query-worker
#                binaries (default target/debug). Nothing is built here.
#
# Environment:
#   RENDER_DIR   rendered chart manifests (default target/chart-render, written
#                by deploy/chart-check.sh; every render under it is checked)
#   COMPOSE_FILE compose file (default deploy/compose.yaml)
#   PYTHON       Python 3 with PyYAML (default: target/chart-venv/bin/python
#                when present, else python3)
#
# What a binary reads: the names clap prints as `[env: NAME=...]` in its
# `--help`, plus RUST_LOG and the standard OTEL_* names (ALLOWED_EVERYWHERE
# below), which every binary accepts.
#
# What a deployment file sets:
#   - deploy/compose.yaml: `environment` of each service built from
#     deploy/Dockerfile (or using its image); the binary is the first word of
#     `command`, or the image's default command (gateway).
#   - rendered chart: `env` and `envFrom` (resolved against the ConfigMaps and
#     Secrets of the same render) of every container of every workload; the
#     binary is the basename of command[0] (or args[0]), else the pod's
#     app.kubernetes.io/component label.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
PROG="env-drift-check"
BINARIES=(gateway ingest-worker query-worker)

log() { printf '[%s] %s\n' "$PROG" "$*"; }
die() {
    printf '[%s] error: %s\n' "$PROG" "$*" >&2
    exit 1
}

(($# <= 1)) || die "usage: $0 [BIN_DIR]"
cd "$REPO_ROOT"

BIN_DIR="${1:-target/debug}"
RENDER_DIR="${RENDER_DIR:-target/chart-render}"
COMPOSE_FILE="${COMPOSE_FILE:-deploy/compose.yaml}"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x target/chart-venv/bin/python ]]; then
        PYTHON=target/chart-venv/bin/python
    else
        PYTHON=python3
    fi
fi
"$PYTHON" -c 'import yaml' 2>/dev/null ||
    die "$PYTHON cannot import yaml (PyYAML); run deploy/chart-check.sh once (it creates target/chart-venv) or set PYTHON"

for b in "${BINARIES[@]}"; do
    [[ -x "$BIN_DIR/$b" ]] || die "$BIN_DIR/$b not found or not executable (build the workspace first)"
done
[[ -f "$COMPOSE_FILE" ]] || die "$COMPOSE_FILE not found"
[[ -d "$RENDER_DIR" ]] || die "$RENDER_DIR not found (deploy/chart-check.sh renders the chart there)"

HELP_DIR="$(mktemp -d)"
trap 'rm -rf "$HELP_DIR"' EXIT

# A clean environment, so clap prints `[env: NAME=]` without any value (no
# secret from the caller's environment ends up in the output).
for b in "${BINARIES[@]}"; do
    if ! env -i PATH=/usr/local/bin:/usr/bin:/bin "$BIN_DIR/$b" --help >"$HELP_DIR/$b.txt" 2>"$HELP_DIR/$b.err"; then
        cat "$HELP_DIR/$b.err" >&2
        die "$BIN_DIR/$b --help failed"
    fi
done

"$PYTHON" - "$HELP_DIR" "$COMPOSE_FILE" "$RENDER_DIR" "${BINARIES[@]}" <<'PY'
import os
import re
import sys

import yaml

help_dir, compose_file, render_dir, *binaries = sys.argv[1:]

# Accepted by every binary: the log filter and the standard OpenTelemetry SDK
# variables the binaries are specified to read.
ALLOWED_EVERYWHERE = {
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_BSP_SCHEDULE_DELAY",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
ENV_RE = re.compile(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)=")

problems = []
reads = {}
for b in binaries:
    with open(os.path.join(help_dir, b + ".txt")) as f:
        names = set(ENV_RE.findall(f.read()))
    if not names:
        problems.append(f"{b} --help lists no `[env: NAME=...]` entries: has the help format changed?")
    reads[b] = names
    print(f"[env-drift-check] {b} --help lists {len(names)} env variables (+ {len(ALLOWED_EVERYWHERE)} allowed everywhere)")


def check(where, binary, names):
    """Record every name in `names` that `binary` does not read."""
    if binary not in reads:
        problems.append(f"{where}: runs '{binary}', which is not one of {', '.join(binaries)}")
        return
    unknown = sorted(n for n in names if n not in reads[binary] and n not in ALLOWED_EVERYWHERE)
    for n in unknown:
        problems.append(f"{where}: sets {n}, which {binary} does not read")
    status = "ok" if not unknown else f"{len(unknown)} unknown"
    print(f"[env-drift-check]   {where} ({binary}): {len(names)} variables, {status}")


def first_word(cmd):
    if isinstance(cmd, str):
        parts = cmd.split()
        return parts[0] if parts else None
    if isinstance(cmd, list) and cmd:
        return str(cmd[0])
    return None


# --- compose ------------------------------------------------------------------
print(f"[env-drift-check] {compose_file}")
with open(compose_file) as f:
    compose = yaml.safe_load(f) or {}
covered = set()
for svc, spec in sorted((compose.get("services") or {}).items()):
    spec = spec or {}
    build = spec.get("build")
    dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
    ours = dockerfile.endswith("deploy/Dockerfile") or str(spec.get("image", "")).startswith("nostr-relay")
    if not ours:
        continue
    where = f"{compose_file}: service {svc}"
    if spec.get("entrypoint"):
        problems.append(f"{where}: sets an entrypoint; the image has none and the command picks the binary")
        continue
    word = first_word(spec.get("command"))
    binary = os.path.basename(word) if word else "gateway"  # the image's CMD
    if spec.get("env_file"):
        problems.append(f"{where}: uses env_file, which this check cannot see into; set variables in `environment`")
    env = spec.get("environment") or {}
    if isinstance(env, dict):
        names = set(env)
    else:
        names = {str(item).split("=", 1)[0] for item in env}
    check(where, binary, names)
    covered.add(binary)
for b in binaries:
    if b not in covered:
        problems.append(f"{compose_file}: no service runs {b}")

# --- rendered chart -----------------------------------------------------------
renders = sorted(d for d in os.listdir(render_dir) if os.path.isdir(os.path.join(render_dir, d)))
if not renders:
    problems.append(f"{render_dir}: no rendered chart found")
for render in renders:
    root = os.path.join(render_dir, render)
    print(f"[env-drift-check] {root}")
    docs = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    for doc in yaml.safe_load_all(f):
                        if isinstance(doc, dict) and doc.get("kind"):
                            docs.append((os.path.relpath(path, render_dir), doc))
    # Keys of the ConfigMaps and Secrets of this render, by name.
    sources = {}
    for _, doc in docs:
        if doc["kind"] in ("ConfigMap", "Secret"):
            keys = set((doc.get("data") or {}).keys()) | set((doc.get("stringData") or {}).keys())
            sources[(doc["kind"], doc["metadata"]["name"])] = keys
    covered = set()
    for path, doc in docs:
        kind = doc["kind"]
        if kind not in WORKLOAD_KINDS:
            continue
        if kind == "Pod":
            template = doc
        elif kind == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
        else:
            template = doc["spec"]["template"]
        pod_labels = (template.get("metadata") or {}).get("labels") or {}
        labels = {**(doc["metadata"].get("labels") or {}), **pod_labels}
        pod = template.get("spec") or {}
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            where = f"{path}: {kind} {doc['metadata']['name']} container {c['name']}"
            word = first_word(c.get("command")) or first_word(c.get("args"))
            binary = os.path.basename(word) if word else labels.get("app.kubernetes.io/component")
            if not binary:
                problems.append(f"{where}: cannot tell which binary it runs (no command, args or component label)")
                continue
            names = {e["name"] for e in c.get("env") or []}
            for ref in c.get("envFrom") or []:
                prefix = ref.get("prefix", "")
                for field, src_kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if field not in ref:
                        continue
                    src = ref[field]["name"]
                    if (src_kind, src) not in sources:
                        problems.append(f"{where}: envFrom {src_kind} {src} is not part of the render, its keys cannot be checked")
                        continue
                    names |= {prefix + k for k in sources[(src_kind, src)]}
            check(where, binary, names)
            covered.add(binary)
    for b in binaries:
        if b not in covered:
            problems.append(f"{root}: no workload runs {b}")

if problems:
    print(f"[env-drift-check] FAILED: {len(problems)} problem(s):", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    sys.exit(1)
print("[env-drift-check] ok: every variable set by the deployment files is read by its binary")
PY
