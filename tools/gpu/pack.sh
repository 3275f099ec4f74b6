#!/usr/bin/env bash
# Packs a device folder from this checkout's build, laid out as run.sh,
# perf.sh and final.sh expect (the GPU machine has CUDA's driver but not the
# Debian libraries ds4 links, and cannot install packages):
#   DEST/bin/       ds4, ds4-gpucheck, ds4-bench, ds4-synth of build/bin (stripped)
#   DEST/old/       the previous build's ds4-gpucheck and ds4-bench, from OLD
#                   (a folder holding them, e.g. an earlier pack's bin/), for
#                   the before/after steps and final.sh's A/B
#   DEST/lib/       the shared objects they link beyond libc and CUDA
#   DEST/nsyslib/   what the device's nsys importer lacks (run.sh nsys)
#   DEST/tokenizer.json, run.sh, perf.sh, final.sh, drift.sh, fullcheck.sh, flashfile.sh
#   tools/gpu/pack.sh DEST [OLD]
# DEST must be ignored by git (e.g. .dev-NAME with `.dev*` in
# .git/info/exclude) and named in the device tool's carry; the call then runs
#   cd DEST && ./final.sh        (or ./run.sh STEPS)
set -eu
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: tools/gpu/pack.sh DEST [OLD]" >&2; exit 2; }
dest=$1 old=${2:-}
tok=${DS4_SHARED:-../shared}/data/tokenizer/deepseek-v3-npm/tokenizer.json
for f in build/bin/ds4 build/bin/ds4-gpucheck build/bin/ds4-bench build/bin/ds4-synth "$tok"; do
  [ -f "$f" ] || { echo "pack: $f missing (make with nvcc present; DS4_SHARED names the shared folder)" >&2; exit 1; }
done
git check-ignore -q "$dest" || { echo "pack: $dest is not ignored by git: it would be sent as part of the tree" >&2; exit 1; }
rm -rf "$dest" && mkdir -p "$dest/bin" "$dest/lib" "$dest/nsyslib"
for p in ds4 ds4-gpucheck ds4-bench ds4-synth; do strip -o "$dest/bin/$p" "build/bin/$p"; done
if [ -n "$old" ]; then
  mkdir -p "$dest/old"
  for p in ds4-gpucheck ds4-bench; do cp "$old/$p" "$dest/old/$p"; done
fi
ldd "$dest"/bin/* | awk '/=> \//{print $3}' | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libgcc_s.so*|libstdc++.so*|libcuda.so*) ;;
    *) cp -L "$lib" "$dest/lib/" ;;
  esac
done
for l in libdw.so.1 libelf.so.1 liblzma.so.5 libbz2.so.1.0; do
  [ -f "/usr/lib/x86_64-linux-gnu/$l" ] && cp -L "/usr/lib/x86_64-linux-gnu/$l" "$dest/nsyslib/"
done
cp "$tok" "$dest/tokenizer.json"
cp tools/gpu/run.sh tools/gpu/perf.sh tools/gpu/final.sh tools/gpu/drift.sh tools/gpu/fullcheck.sh tools/gpu/flashfile.sh "$dest/"
echo "packed $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes') into $dest: $(du -sh "$dest" | cut -f1)"
