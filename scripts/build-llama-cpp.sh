#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI source distribution with the node's patch to the
# llama.cpp it vendors, and install it into the active Python environment.
#
#   scripts/build-llama-cpp.sh        (setup.sh --peers runs it)
#
# The patch (scripts/patches/llama-cpp-python-$VER.patch) adds a software prefetch to ggml's
# AVX2 Q8_0 dot product, the kernel of Q8_0 decoding on x86 (no arithmetic changes), a Q8_0
# kernel for decode steps of 2-8 tokens, fixes to decode attention and the AMX kernels, and
# lets ggml find CPU backends next to libggml (its header lists them all). On x86-64 the default CMAKE_ARGS build every CPU
# variant ggml has (x64, SSE4.2, AVX, AVX2, AVX-512, VNNI, BF16, AMX) as loadable modules, and
# the best one for the CPU that runs the node is loaded at start: one wheel, portable and
# tuned. Set CMAKE_ARGS to build otherwise (e.g. -DGGML_NATIVE=ON for the build machine only).
# The patch marks the version "$VER+cxrnode.N", which llama_cpp.__version__ and the backend's
# health() show. Why, and the measurements: docs/cpu-engine.md, "The decode patch" and the
# sections after it. A stock llama-cpp-python works too, slower.
#
# The wheel is kept in ${CXR_NODE_WHEEL_CACHE:-~/.cache/llm-cxr-node/wheels}, keyed by the
# patch, CMAKE_ARGS and the Python tag, so a re-run (or a second venv) installs it in seconds.
# The key is also written beside the installed package (llama_cpp/.cxrnode-build): a re-run
# with other CMAKE_ARGS installs that build instead of keeping the one in place.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VER=0.3.36
patch_file="$here/patches/llama-cpp-python-$VER.patch"
want=$(sed -n 's/^+__version__ = "\(.*\)"$/\1/p' "$patch_file")
[ -n "$want" ] || { echo "build-llama-cpp: $patch_file sets no version" >&2; exit 1; }

if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -m)" = x86_64 ]; then
  # the variants are modules beside libggml (CMAKE_INSTALL_BINDIR: ggml installs them there)
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
fi

key=$( (cat "$patch_file"; echo "${CMAKE_ARGS:-}"; python -c 'import sys; print(sys.implementation.cache_tag)') \
  | sha256sum | cut -c1-16)
# the installed build is this one when its version and its key (patch, CMAKE_ARGS) both match
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
  echo "build-llama-cpp: building llama-cpp-python $want (several minutes on 2 cores)"
  python -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VER"
  tar xzf "$work/llama_cpp_python-$VER.tar.gz" -C "$work"
  patch -d "$work/llama_cpp_python-$VER" -p1 --forward --quiet <"$patch_file"
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
echo "$key" >"$pkg/.cxrnode-build"
echo "build-llama-cpp: installed llama-cpp-python $want (build $key)"
