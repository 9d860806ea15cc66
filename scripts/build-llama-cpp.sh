#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI source distribution, checked against a pinned sha256,
# and install it into the active Python environment.
#
#   scripts/build-llama-cpp.sh                                  stock llama.cpp (the default)
#   CXR_NODE_LLAMACPP_FLAVOUR=patched scripts/build-llama-cpp.sh   with the node's patch
#
# setup.sh --peers runs it and passes CXR_NODE_LLAMACPP_FLAVOUR on. The stock flavour is the
# upstream source as published. The patched flavour applies
# scripts/patches/llama-cpp-python-$VER.patch (CPU decode kernels, AMX fixes; its header
# lists the changes) and marks the version "$VER+cxrnode.N"; it is optional, no test needs
# it, and every upstream update means rebasing it (docs/cpu-engine.md).
#
# On x86-64 the default CMAKE_ARGS build every CPU variant ggml has (x64, SSE4.2, AVX, AVX2,
# AVX-512, VNNI, BF16, AMX) as loadable modules beside libggml; the backend loads the best
# one for the CPU that runs the node from there (models/backends/llamacpp/library.py). Set
# CMAKE_ARGS to build otherwise (e.g. -DGGML_NATIVE=ON for the build machine only).
#
# The stock flavour is installed without ggml's AMX variant (libggml-cpu-sapphirerapids.so):
# upstream 0.3.36's AMX tile kernels, built with GCC 12, crash (SIGILL at the first tile load)
# on 4th-generation Xeons, which then load the AVX-512 variant instead. CXR_NODE_LLAMACPP_AMX=on
# keeps it (for a compiler or an upstream release where it works); the patched flavour always
# keeps it (its AMX fixes). docs/cpu-engine.md, "Intel Xeon with AMX".
#
# The wheel is kept in ${CXR_NODE_WHEEL_CACHE:-~/.cache/llm-cxr-node/wheels}, keyed by the
# source's hash, the flavour (and patch), CMAKE_ARGS and the Python tag, so a re-run (or a
# second venv) installs it in seconds. The key is also written beside the installed package
# (llama_cpp/.cxrnode-build): a re-run with another flavour or CMAKE_ARGS installs that build
# instead of keeping the one in place.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VER=0.3.36
# sha256 of llama_cpp_python-0.3.36.tar.gz as PyPI publishes it (its simple index)
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
flavour=${CXR_NODE_LLAMACPP_FLAVOUR:-stock}
patch_file="$here/patches/llama-cpp-python-$VER.patch"
case "$flavour" in
  stock)
    want=$VER
    ;;
  patched)
    command -v patch >/dev/null || { echo "build-llama-cpp: the patched flavour needs patch(1)" >&2; exit 1; }
    want=$(sed -n 's/^+__version__ = "\(.*\)"$/\1/p' "$patch_file")
    [ -n "$want" ] || { echo "build-llama-cpp: $patch_file sets no version" >&2; exit 1; }
    ;;
  *)
    echo "build-llama-cpp: CXR_NODE_LLAMACPP_FLAVOUR must be stock or patched, not '$flavour'" >&2
    exit 1
    ;;
esac

if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -m)" = x86_64 ]; then
  # the variants are modules beside libggml (CMAKE_INSTALL_BINDIR: ggml installs them there)
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
fi

amx=${CXR_NODE_LLAMACPP_AMX:-off}
[ "$flavour" = patched ] && amx=on
case "$amx" in on|off) ;; *)
  echo "build-llama-cpp: CXR_NODE_LLAMACPP_AMX must be on or off, not '$amx'" >&2; exit 1 ;;
esac

key=$( (echo "$SDIST_SHA256 $flavour amx=$amx"; [ "$flavour" = stock ] || cat "$patch_file"
        echo "${CMAKE_ARGS:-}"; python -c 'import sys; print(sys.implementation.cache_tag)') \
  | sha256sum | cut -c1-16)
# the installed build is this one when its version and its key both match
have=$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' \
  2>/dev/null || true)
# the installed llama_cpp package's directory, empty when there is none
pkg_dir() {
  python -c 'import importlib.util as u, os; s = u.find_spec("llama_cpp"); print(os.path.dirname(s.origin) if s and s.origin else "")' \
    2>/dev/null || true
}
pkg=$(pkg_dir)
if [ "$have" = "$want" ] && [ -n "$pkg" ] && [ "$(cat "$pkg/.cxrnode-build" 2>/dev/null)" = "$key" ]; then
  exit 0
fi

cache_root="${CXR_NODE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-cxr-node/wheels}"
cache="$cache_root/llama-cpp-python-$want-$key"
if ! compgen -G "$cache/*.whl" >/dev/null; then
  # Build in a private folder and publish it with one rename(2): a set-up running at the
  # same time never sees (or deletes) a half-built wheel, and whichever publishes first wins.
  mkdir -p "$cache_root"
  work=$(mktemp -d)
  out=$(mktemp -d "$cache_root/.build-$key.XXXXXX")
  trap 'rm -rf "$work" "$out"' EXIT
  echo "build-llama-cpp: building llama-cpp-python $want, $flavour (several minutes on 2 cores)"
  # pip refuses a download whose hash differs (hash-checking mode); sha256sum checks again
  echo "llama-cpp-python==$VER --hash=sha256:$SDIST_SHA256" >"$work/requirements.txt"
  python -m pip download -q --no-deps --no-binary :all: --require-hashes \
    -r "$work/requirements.txt" -d "$work"
  sdist="$work/llama_cpp_python-$VER.tar.gz"
  echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet -
  tar xzf "$sdist" -C "$work"
  if [ "$flavour" = patched ]; then
    patch -d "$work/llama_cpp_python-$VER" -p1 --forward --quiet <"$patch_file"
  fi
  python -m pip wheel -q --no-deps --no-cache-dir -w "$out" "$work/llama_cpp_python-$VER"
  # an empty or wheel-less $cache (an older script's leftover) may be replaced; a published
  # one is never touched: rename onto a non-empty folder fails and ours is discarded
  compgen -G "$cache/*.whl" >/dev/null || rmdir "$cache" 2>/dev/null || true
  mv -T "$out" "$cache" 2>/dev/null || echo "build-llama-cpp: another set-up published it first"
  compgen -G "$cache/*.whl" >/dev/null || { echo "build-llama-cpp: no wheel in $cache" >&2; exit 1; }
fi
python -m pip install -q --no-deps --force-reinstall "$cache"/*.whl
pkg=$(pkg_dir)
[ -n "$pkg" ] || { echo "build-llama-cpp: llama_cpp is not importable after the install" >&2; exit 1; }
if [ "$amx" = off ]; then
  rm -f "$pkg"/lib/libggml-cpu-sapphirerapids.so
fi
echo "$key" >"$pkg/.cxrnode-build"
echo "build-llama-cpp: installed llama-cpp-python $want, $flavour, AMX variant $amx (build $key)"
