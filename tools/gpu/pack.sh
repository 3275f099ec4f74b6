#!/usr/bin/env bash
# Prepares a device run: the GPU machine's image has CUDA but not the Debian
# libraries ds4 links (cJSON, utf8proc, libmicrohttpd, libedit, OpenSSL) and
# cannot install packages, so we build here and carry the binaries plus those
# shared objects. Output: .devlibs/ (ignored by git; name it in the device
# tool's `carry` together with `build`). On the device:
#   export LD_LIBRARY_PATH=$PWD/.devlibs:$LD_LIBRARY_PATH
# CUDA's own libraries (cudart, cublas) come from the device's toolkit.
set -eu
cd "$(dirname "$0")/../.."
grep -qx '/.devlibs/' .git/info/exclude 2>/dev/null || echo '/.devlibs/' >> "$(git rev-parse --git-common-dir)/info/exclude"
rm -rf .devlibs && mkdir -p .devlibs
for bin in build/bin/* build/tests/test_*; do
  [ -x "$bin" ] || continue
  ldd "$bin" | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libgcc_s.so*|libstdc++.so*) ;;
    libcuda.so*|libcudart.so*|libcublas*.so*|libnvidia*) ;;
    *) cp -L "$lib" .devlibs/ ;;
  esac
done
du -sh .devlibs build | cat
