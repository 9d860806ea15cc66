#!/usr/bin/env bash
# Fetch the built OHIF viewer for the viewer tests (tests/viewer; idempotent, safe to re-run).
#   scripts/fetch-ohif.sh       prints the directory that holds OHIF's dist/ (index.html, ...)
#
# The viewer comes from the npm registry with the ordinary npm client: `npm pack
# @ohif/app@VERSION` (npm checks the tarball against the registry's integrity), then the
# tarball is checked against the SHA-512 and SHA-256 pinned below, and its package/dist/ is
# unpacked into a temporary directory next to the target and renamed into place, so the
# target is either absent or complete. A second run finds it and does nothing.
#   CXR_NODE_OHIF_DIR   target directory (default ~/.cache/llm-cxr-node/ohif-VERSION)
# Exit status 1 (with a warning) when npm or the registry is unavailable: the viewer tests
# then skip.
set -euo pipefail

VERSION=3.11.1
# the registry's dist.integrity of @ohif/app@3.11.1
# (sha512-0lJRyHguGuIR06PxeJ3rqnPWf1OAqsaXGuqT2kl5HkNjIOxBDnRTTMvyHnkn3ZyjcHlsIhY8gf0h7AhVORqsSQ==)
# as hex, and the tarball's SHA-256
SHA512=d25251c8782e1ae211d3a3f1789debaa73d67f5380aac6971aea93da49791e436320ec410e74534ccbf21e7927dd9ca370796c22163c81fd21ec0855391aac49
SHA256=6f414753a2e1a498c72761cb52b1f67754f4855b8a565c8e31f232ee3a8355c5
dest=${CXR_NODE_OHIF_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-cxr-node/ohif-$VERSION}
marker=.llm-cxr-node-ohif  # written last into the unpacked tree: "<version> <sha256>"

complete() { [ -f "$1/index.html" ] && [ "$(cat "$1/$marker" 2>/dev/null)" = "$VERSION $SHA256" ]; }

if complete "$dest"; then
  echo "$dest"
  exit 0
fi
if [ -e "$dest" ]; then
  echo "fetch-ohif: $dest exists but is not OHIF $VERSION from this script; remove it" >&2
  exit 1
fi
if ! command -v npm >/dev/null; then
  echo "fetch-ohif: warning: npm is not installed; the viewer tests will skip" >&2
  exit 1
fi

mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d "$(dirname "$dest")/.ohif-$VERSION.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-ohif: npm pack @ohif/app@$VERSION" >&2
if ! (cd "$tmp" && timeout 900 npm pack --loglevel=error --fetch-retries=1 \
  --fetch-timeout=120000 "@ohif/app@$VERSION" >/dev/null); then
  echo "fetch-ohif: warning: npm pack @ohif/app@$VERSION failed (registry unreachable?);" \
    "the viewer tests will skip" >&2
  exit 1
fi
tgz="$tmp/ohif-app-$VERSION.tgz"
[ -f "$tgz" ] || { echo "fetch-ohif: npm pack wrote no $tgz" >&2; exit 1; }
got256=$(sha256sum "$tgz" | cut -d' ' -f1)
got512=$(sha512sum "$tgz" | cut -d' ' -f1)
if [ "$got256" != "$SHA256" ] || [ "$got512" != "$SHA512" ]; then
  echo "fetch-ohif: $tgz does not match the pinned digests (sha256 $got256)" >&2
  exit 1
fi
mkdir "$tmp/x"
tar -xzf "$tgz" -C "$tmp/x" --no-same-owner package/dist
[ -f "$tmp/x/package/dist/index.html" ] || { echo "fetch-ohif: no dist/index.html" >&2; exit 1; }
echo "$VERSION $SHA256" >"$tmp/x/package/dist/$marker"
# rename into place; a concurrent run that got there first leaves its complete copy
if ! mv -T "$tmp/x/package/dist" "$dest" 2>/dev/null && ! complete "$dest"; then
  echo "fetch-ohif: could not move the viewer into $dest" >&2
  exit 1
fi
echo "fetch-ohif: OHIF $VERSION in $dest" >&2
echo "$dest"
