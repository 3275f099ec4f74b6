#!/usr/bin/env bash
# The main job: a one-shot prompt through ds4 on ./ds4flash.gguf, or — when no
# real model is present — on the small random model `ds4-synth --preset tiny`
# writes (its answer is noise: it shows the pipeline works, not the model).
set -eu
cd "$(dirname "$0")/.."
MODEL=${DS4_MODEL:-ds4flash.gguf}
PROMPT=${DS4_PROMPT:-"Explain in two sentences what a mixture-of-experts model is."}
if [ -f "$MODEL" ]; then
  echo "quickstart: running $MODEL"
  exec build/bin/ds4 -m "$MODEL" -p "$PROMPT" --nothink -n 128
fi
echo "quickstart: no ./ds4flash.gguf here — generating the tiny random test model"
echo "quickstart: (build/tiny.gguf, about 18 MB; its output is random tokens, not DeepSeek)"
[ -f build/tiny.gguf ] || build/bin/ds4-synth --preset tiny --seed 1 -o build/tiny.gguf
build/bin/ds4 --inspect -m build/tiny.gguf --ctx 4096 | head -n 12
exec build/bin/ds4 -m build/tiny.gguf -p "$PROMPT" --nothink -n 48 --temp 0 --ctx 4096
