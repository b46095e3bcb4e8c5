#!/usr/bin/env bash
# Builds the reference llama.cpp (vendored in the llama-cpp-python source package) for golden tests and
# benchmarks. Never part of the porteiro binary. Output: $REF/bin/{llama-bench,llama-perplexity,llama-tokenize,llama-server,llama-quantize},
# $REF/lib/libllama.so and $REF/bin/llama_golden (our driver in scripts/golden/, used by scripts/golden_model.py).
# Flags: the SIMD this CPU reports in /proc/cpuinfo, spelled out instead of -march=native, because
# native also turns on AMX, which some CPUs advertise but virtual machines fault on. (A fixed list once
# named AVX-VNNI, which AMD EPYC lacks: the reference died with SIGILL there.)
# PORTEIRO_LLAMA_ISA=avx2 builds the peer of `PORTEIRO_ISA=avx2` instead: AVX2/FMA/F16C only (no
# AVX-512, no AVX-VNNI), into its own folder (…-avx2), as an AVX2-only CPU would have it.
set -euo pipefail
VER=0.3.36
HOME_DIR=${PORTEIRO_HOME:-$HOME/.cache/porteiro}
cap=${PORTEIRO_LLAMA_ISA:-}
[[ -z $cap || $cap == avx2 ]] || { echo "PORTEIRO_LLAMA_ISA=$cap: only avx2 is known" >&2; exit 1; }
REF=${PORTEIRO_LLAMA_CPP:-$HOME_DIR/llama.cpp-$VER${cap:+-$cap}}
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() {
  if [[ $cap == avx2 && ( $1 == avx512* || $1 == avx_vnni ) ]]; then echo OFF; return; fi
  [[ $flags == *" $1 "* ]] && echo ON || echo OFF
}
simd="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) \
-DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AVX512=$(has avx512f) \
-DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16) \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
# A cached build is reused only when it was built for this CPU's SIMD (the cache may come from another
# machine kind): its flags are kept beside it.
if [[ -x $REF/bin/llama-bench && -x $REF/bin/llama-server && -x $REF/bin/llama-quantize && -x $REF/bin/llama_golden && -f $REF/simd-flags \
      && $(cat "$REF/simd-flags") == "$simd" ]]; then echo "$REF"; exit 0; fi
[[ -d $REF/bin ]] && echo "rebuilding $REF for this CPU's SIMD ($simd)" >&2
command -v cmake >/dev/null || { echo "cmake missing: apt-get install -y cmake" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkgs="$HOME_DIR/pkgs"
mkdir -p "$pkgs"
tarball="$pkgs/llama_cpp_python-$VER.tar.gz"
# --no-binary for this package only: with :all: pip also builds its build tools (cmake) from source.
[[ -f $tarball ]] || pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VER" -d "$pkgs" >&2
tar -xzf "$tarball" -C "$work"
src="$work/llama_cpp_python-$VER"
# shellcheck disable=SC2086 # $simd is a list of -D options
cmake -S "$src/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release $simd \
  -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH="$REF/lib" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$work/build" -j"$(nproc)" --target llama-bench llama-perplexity llama-tokenize llama-server llama-quantize >&2
mkdir -p "$REF/bin" "$REF/lib"
cp "$work"/build/bin/llama-{bench,perplexity,tokenize,server,quantize} "$REF/bin/"
find "$work/build" -name '*.so*' -exec cp -P {} "$REF/lib/" \;
here=$(cd "$(dirname "$0")" && pwd)
g++ -O2 -std=c++17 -I"$src/vendor/llama.cpp/include" -I"$src/vendor/llama.cpp/ggml/include" "$here/golden/llama_golden.cpp" \
  -L"$REF/lib" -lllama -lggml -lggml-base -Wl,-rpath,"$REF/lib" -o "$REF/bin/llama_golden"
echo "$simd" > "$REF/simd-flags"
echo "$REF"
