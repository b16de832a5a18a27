#!/usr/bin/env bash
# Build llama.cpp (through PyPI's llama-cpp-python sdist) once, cache it, and install it into .venv,
# for the GGUF export formats (gguf-f16, gguf-q8_0, gguf-q4_k_m; artifacts/gguf_export.py).
#
# Why this way (shared/FACTS.md): llama-cpp-python 0.3.36 ships as an sdist only; it builds
# llama.cpp from source with cmake/gcc and carries llama.cpp's own converter
# (vendor/llama.cpp/convert_hf_to_gguf.py) with the gguf-py library that converter was written for.
#
# Contract:
#   - The cache is ${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/llama-cpp-<key>/ where <key> is the first
#     16 hex digits of the sha256 of exactly what the build depends on: the llama-cpp-python version,
#     the sdist's sha256, the CMake flags, the Python version and the machine architecture. Changing
#     any of them rebuilds; nothing else does. It holds
#       wheel/llama_cpp_python-0.3.36-*.whl         the built wheel (portable CPU build)
#       converter/convert_hf_to_gguf.py              llama.cpp's HF -> GGUF converter
#       converter/conversion/                        its per-architecture modules
#       converter/gguf-py/                           the gguf library that converter matches
#   - When the cache exists nothing is built; the wheel (+ sentencepiece, the converter's) is installed
#     into .venv only if .venv lacks llama-cpp-python 0.3.36, and the converter is copied to
#     .venv/share/kubetune/llama-cpp-converter/ (where the trainer looks) if it is not there yet.
#   - The last line on stdout is the cache directory; everything else goes to stderr.
#   - The build runs in a temporary directory next to the cache, published with one rename; concurrent
#     runs serialise on a lock file. Full output in <cache>/llama-cpp-<key>.build.log.
#   - LLAMA_CPP_SDIST=/path/to/llama_cpp_python-0.3.36.tar.gz uses a local sdist (checked against
#     the pinned sha256) instead of `pip download`.
# Cost on 2 cores: ~8 minutes once (467 s measured); the cache is 21 MB, the converter copy in .venv 2 MB.
set -euo pipefail

readonly LLAMA_CPP_PYTHON_VERSION="0.3.36"
readonly SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# Portable: no -march=native (the wheel is cached and may run on another CPU of the same arch);
# no llava/mtmd, tests, examples, tools or server: kubetune needs libllama + the C API only.
readonly LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
readonly BUILD_MINUTES="about 8 minutes on 2 cores: 467 s measured, niced, on a shared machine"

log() { printf 'build-llama-cpp: %s\n' "$*" >&2; }
die() { printf 'build-llama-cpp: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'printf "build-llama-cpp: ERROR: line %s: \"%s\" failed\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

cd "$(dirname "$0")/.."
# KUBETUNE_VENV: the environment to install into (the trainer images use /opt/kubetune).
readonly VENV="${KUBETUNE_VENV:-.venv}"
readonly PY="$VENV/bin/python"
readonly VENV_CONVERTER="$VENV/share/kubetune/llama-cpp-converter"
readonly CONVERTER_EXTRA="sentencepiece==0.2.3"
[[ -x "$PY" ]] || die "$VENV is missing: run scripts/bootstrap.sh (make setup) first"

py_version="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$(printf '%s\n' "$LLAMA_CPP_PYTHON_VERSION" "$SDIST_SHA256" "$LLAMA_CMAKE_ARGS" "$py_version" "$(uname -m)" \
  | sha256sum | cut -c1-16)"
cache_root="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
final_dir="$cache_root/llama-cpp-$key"
build_log="$cache_root/llama-cpp-$key.build.log"

install_wheel() {
  if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
    log "installing $(basename "$final_dir"/wheel/*.whl) into $VENV"
    # Its dependencies (numpy, jinja2, typing-extensions, diskcache) come from PyPI as usual;
    # sentencepiece is the converter's (it tries a SentencePiece vocabulary before a BPE one).
    "$PY" -m pip install -q "$final_dir"/wheel/*.whl "$CONVERTER_EXTRA" >&2
  fi
  # The converter beside the environment, where kubetune_trainer.artifacts.gguf_export looks.
  if [[ ! -f "$VENV_CONVERTER/.kubetune-$key" ]]; then
    rm -rf "$VENV_CONVERTER" "$VENV_CONVERTER.tmp"
    mkdir -p "$(dirname "$VENV_CONVERTER")"
    cp -r "$final_dir/converter" "$VENV_CONVERTER.tmp"
    touch "$VENV_CONVERTER.tmp/.kubetune-$key"
    mv "$VENV_CONVERTER.tmp" "$VENV_CONVERTER"
  fi
}

if [[ -d "$final_dir/wheel" ]]; then
  install_wheel
  echo "$final_dir"
  exit 0
fi

for tool in cmake gcc g++ flock sha256sum tar; do
  command -v "$tool" >/dev/null || die "'$tool' is required to build llama.cpp"
done

mkdir -p "$cache_root"
exec 9>"$cache_root/llama-cpp-$key.lock"
flock 9
if [[ ! -d "$final_dir/wheel" ]]; then
  work="$(mktemp -d "$cache_root/.llama-cpp-$key.build.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  : >"$build_log"
  log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (llama.cpp, CPU) into $final_dir"
  log "full log in $build_log ($BUILD_MINUTES)"

  sdist="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [[ -n "${LLAMA_CPP_SDIST:-}" ]]; then
    cp "$LLAMA_CPP_SDIST" "$sdist"
  else
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >>"$build_log" 2>&1
  fi
  echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet - || die "sdist sha256 mismatch: $sdist"

  start=$(date +%s)
  if ! CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
      nice -n 10 "$PY" -m pip wheel -v --no-deps -w "$work/out/wheel" "$sdist" >>"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    die "wheel build failed (full log: $build_log)"
  fi
  log "wheel built in $(( $(date +%s) - start )) s"

  # The converter, its per-architecture modules and its matching gguf-py, from the same sdist.
  vendored="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  tar -xzf "$sdist" -C "$work" "$vendored/convert_hf_to_gguf.py" "$vendored/conversion" "$vendored/gguf-py"
  mkdir -p "$work/out/converter"
  mv "$work/$vendored/convert_hf_to_gguf.py" "$work/$vendored/conversion" "$work/$vendored/gguf-py" \
    "$work/out/converter/"
  mv "$work/out" "$final_dir"
fi
install_wheel
echo "$final_dir"
