#!/bin/bash
# Teacher-forced CUDA vs CPU logits on the full-size file: position 0 shows the
# one-step error through all 43 layers, later positions how it accumulates.
set -u
cd "$(dirname "$0")"
export LD_LIBRARY_PATH=$PWD/lib:${LD_LIBRARY_PATH:-}
avail=$(df -B1G --output=avail /dev/shm | tail -1)
[ "$avail" -lt 90 ] && mount -o remount,size=110G /dev/shm
[ -f /dev/shm/flash.gguf ] || ./bin/ds4-synth --preset flash-q2 --threads 16 -o /dev/shm/flash.gguf --tokenizer tokenizer.json 2>&1 | tail -1
T=0,59065,109529,22019,43220,42333,20065,11533,63323,58500,113194,13509,109529,65823,101885,109529,85487,42333,106644,104504,78832
for be in cuda cpu; do timeout 200 ./bin/ds4 --$be --threads 16 -m /dev/shm/flash.gguf --ctx 256 --tokens $T --dump-logits $OUT/$be.f32 2>&1 | tail -1; done
python3 - $OUT/cuda.f32 $OUT/cpu.f32 <<'PY'
import numpy as np, sys
a = np.fromfile(sys.argv[1], np.float32).reshape(-1, 129280); b = np.fromfile(sys.argv[2], np.float32).reshape(-1, 129280)
for i in range(a.shape[0]):
    d = np.abs(a[i]-b[i]).max(); r = np.abs(b[i]).max()
    print("pos %2d  max|d| %.3e  max|ref| %.3f  rel %.2e  std %.3f  argmax %d %d" % (i, d, r, d/r, b[i].std(), a[i].argmax(), b[i].argmax()))
PY
