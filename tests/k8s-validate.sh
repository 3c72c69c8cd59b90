#!/usr/bin/env bash
# Validates the Kubernetes manifests in docker/kubernetes/*.yaml offline,
# against the API schemas bundled with kubernetes-validate (from PyPI),
# strictly: an unknown or misspelt field anywhere fails, and so does a kind
# or apiVersion with no schema (which the tool itself only warns about), a
# file with no resource in it, or a mapping key given twice (which YAML
# parsers silently resolve to the last one).
#
# Everything goes into a temporary directory under ${TMPDIR:-/tmp} (a Python
# venv with kubernetes-validate, and pip's temporary files), removed on
# exit. Prints one line per file and exits non-zero if any fails.
#
#   tests/k8s-validate.sh
#   K8S_VERSIONS="1.31.0" tests/k8s-validate.sh   # other schema versions
#
# `kubectl apply --dry-run=client` is not used: it needs a reachable API
# server (it asks the server's discovery API to map each kind), so it
# cannot run offline.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tool's release (pinned, for the same verdict on every machine) and the
# Kubernetes versions whose schemas it checks against: the oldest still
# common release and the newest it bundles (it has 1.25 to 1.37).
KV_VERSION=${KV_VERSION:-1.37.0}
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.37.0}

work=$(mktemp -d "${TMPDIR:-/tmp}/k8s-validate.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir "$work/tmp"
export TMPDIR="$work/tmp"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

shopt -s nullglob
files=(docker/kubernetes/*.yaml)
if [ "${#files[@]}" -eq 0 ]; then
    echo "no manifests in docker/kubernetes/" >&2
    exit 1
fi

start=$SECONDS
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "kubernetes-validate==$KV_VERSION"
kv="$work/venv/bin/kubernetes-validate"
echo "kubernetes-validate $("$kv" --version) (venv ready in $((SECONDS - start)) s)," \
    "Kubernetes schemas: $K8S_VERSIONS, strict"

kargs=()
for v in $K8S_VERSIONS; do
    kargs+=(-k "$v")
done

# Duplicate mapping keys, which kubernetes-validate's YAML loader (PyYAML)
# accepts silently, keeping the last value.
cat >"$work/dupkeys.py" <<'EOF'
import sys
import yaml

class Loader(yaml.SafeLoader):
    pass

def mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r" % (key,), key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)

Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
try:
    with open(sys.argv[1]) as f:
        list(yaml.load_all(f, Loader=Loader))
except yaml.YAMLError as e:
    sys.exit("ERROR %s: %s" % (sys.argv[1], e))
EOF

failed=0
for f in "${files[@]}"; do
    rc=0
    out=$("$work/venv/bin/python" "$work/dupkeys.py" "$f" 2>&1 \
        && "$kv" --strict "${kargs[@]}" "$f" 2>&1) || rc=$?
    # Success: exit 0, every line an INFO "passed", at least one of them.
    resources=$(sed -nE 's/^INFO .* passed for resource ([^ ]+) against version .*/\1/p' <<<"$out" \
        | sort -u | paste -sd, -)
    if [ "$rc" -ne 0 ] || [ -z "$resources" ] || grep -qvE '^INFO .* passed for resource ' <<<"$out"; then
        echo "FAIL $f"
        if [ -n "$out" ]; then
            sed 's/^/     /' <<<"$out"
        else
            echo "     no Kubernetes resource in the file"
        fi
        failed=1
    else
        echo "ok   $f ($resources)"
    fi
done

if [ "$failed" -ne 0 ]; then
    echo "k8s-validate: FAILED" >&2
    exit 1
fi
echo "k8s-validate: all ${#files[@]} manifests valid"
