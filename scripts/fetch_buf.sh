#!/usr/bin/env bash
# Print the path of a real buf binary: <repo>/.tools/buf, fetched once from npm (@bufbuild/buf ships it per
# platform as @bufbuild/buf-linux-x64 etc.; the version is pinned so lint rules do not move under us).
set -euo pipefail

VERSION="1.75.0"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/.tools/buf-$VERSION"

if [ -x "$DEST" ]; then
    echo "$DEST"
    exit 0
fi
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) PKG="@bufbuild/buf-linux-x64" ;;
    Linux-aarch64) PKG="@bufbuild/buf-linux-aarch64" ;;
    Darwin-arm64) PKG="@bufbuild/buf-darwin-arm64" ;;
    Darwin-x86_64) PKG="@bufbuild/buf-darwin-x64" ;;
    *) echo "fetch_buf.sh: no buf package for $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac
command -v npm >/dev/null 2>&1 || { echo "fetch_buf.sh: npm is needed to fetch buf" >&2; exit 1; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# npm's progress output goes to stderr; stdout is kept for the single path we print.
(cd "$TMP" && npm pack --silent "$PKG@$VERSION" >/dev/null)
tar -xzf "$TMP"/*.tgz -C "$TMP"
mkdir -p "$(dirname "$DEST")"
# Copy then rename, so a concurrent caller never sees a half-written binary.
install -m 0755 "$TMP/package/bin/buf" "$DEST.partial.$$"
mv -f "$DEST.partial.$$" "$DEST"
echo "$DEST"
