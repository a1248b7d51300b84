#!/usr/bin/env bash
# Vendors the built cytoscape.js (graph drawing for the topology page) from the npm registry into
# weft/ui/static/vendor/, with its licence, so the page never needs a CDN at run time.
# Usage: scripts/vendor_cytoscape.sh [version]   (default: the pinned version below)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-3.35.0}"
DEST=weft/ui/static/vendor
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "cytoscape@${VERSION}" >/dev/null && tar xzf cytoscape-*.tgz)
mkdir -p "$DEST"
cp "$tmp/package/dist/cytoscape.min.js" "$DEST/cytoscape.min.js"
cp "$tmp/package/LICENSE" "$DEST/cytoscape.LICENSE"
echo "cytoscape ${VERSION}" > "$DEST/VERSIONS"
sha256sum "$DEST/cytoscape.min.js" | tee -a "$DEST/VERSIONS"
