#!/usr/bin/env bash
# Set up everything the node needs on a fresh machine (idempotent, safe to re-run).
#   scripts/setup.sh            Python venv (.venv) with the node and its runtime extras
#   scripts/setup.sh --peers    also the Debian DICOM peers the tests use
#                               (dcmtk, orthanc, dicom3tools, gdcm, poppler-utils), a Java runtime
#                               and pycocoevalcap (METEOR in cxr-node evaluate), the dev tools
#                               and the llama.cpp engine (stock llama-cpp-python; with
#                               CXR_NODE_LLAMACPP_FLAVOUR=patched, the node's patched build)
set -euo pipefail
cd "$(dirname "$0")/.."
want_peers=0
[ "${1:-}" = "--peers" ] && want_peers=1

if [ "$want_peers" = 1 ]; then
  need=()
  command -v storescu >/dev/null || need+=(dcmtk)
  command -v Orthanc >/dev/null || need+=(orthanc orthanc-dicomweb orthanc-python)
  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
  command -v dciodvfy >/dev/null || need+=(dicom3tools)
  command -v gdcminfo >/dev/null || need+=(libgdcm-tools)
  command -v pdftoppm >/dev/null || need+=(poppler-utils)  # renders the report PDF in tests
  command -v chromium >/dev/null || need+=(chromium)   # web console tests (headless)
  command -v java >/dev/null || need+=(default-jre-headless)  # METEOR in cxr-node evaluate
  if [ "${CXR_NODE_LLAMACPP_FLAVOUR:-stock}" = patched ]; then
    command -v patch >/dev/null || need+=(patch)       # scripts/build-llama-cpp.sh
  fi
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "setup: installing Debian packages: ${need[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "setup: not root, cannot install ${need[*]}; tests that need them will skip" >&2
    fi
  fi
  # the built OHIF viewer (npm registry) for tests/viewer; without it those tests skip
  bash scripts/fetch-ohif.sh >/dev/null || echo "setup: warning: no OHIF viewer; viewer tests will skip" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
extras="postgres,api,train"
# The test suite also covers the llama.cpp engine; llama-cpp-python builds from its
# hash-checked source, with every x86 CPU variant (scripts/build-llama-cpp.sh: about 7 min
# on 2 cores the first time, then from its wheel cache). Stock by default;
# CXR_NODE_LLAMACPP_FLAVOUR=patched builds the node's patched flavour instead.
[ "$want_peers" = 1 ] && extras="$extras,dev,llamacpp,eval"
stamp=".venv/.setup-$( (cat pyproject.toml scripts/build-llama-cpp.sh scripts/patches/*.patch; echo "${CMAKE_ARGS:-} ${CXR_NODE_LLAMACPP_FLAVOUR:-stock}") | sha256sum | cut -c1-16)-$extras"
if [ ! -e "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # The CPU build of torch lies on this machine's disk; install it before anything
  # that depends on torch so that no multi-GB CUDA build is pulled.
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  # llama-cpp-python from the checked source, before pip would build it unchecked
  if [ "$want_peers" = 1 ]; then bash scripts/build-llama-cpp.sh; fi
  python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
