# Sourced by drift.sh and fullcheck.sh (run from a packed folder: bin/,
# tokenizer.json). flash_file ARGS: sets M to the full-size flash-q2 file for
# these extra ds4-synth options in /dev/shm, named after them
# (/dev/shm/flash-gain5e-5.gguf for "--gain 5e-5"; no options:
# /dev/shm/flash.gguf), so two scripts asking for the same options share one
# file and a default file is never reused for other options. Made if
# missing; other flash*.gguf are removed first when 87 GB do not fit beside
# them.
flash_file() {
    local tag avail
    tag=$(printf '%s' "$*" | sed 's/--//g; s/ //g' | tr -c 'A-Za-z0-9.+-' '_')
    M=/dev/shm/flash${tag:+-$tag}.gguf
    [ -f "$M" ] && return
    avail=$(df -B1G --output=avail /dev/shm | tail -1)
    [ "$avail" -lt 90 ] && mount -o remount,size=110G /dev/shm
    avail=$(df -B1G --output=avail /dev/shm | tail -1)
    [ "$avail" -lt 90 ] && { echo "removing $(ls /dev/shm/flash*.gguf) for room"; rm -f /dev/shm/flash*.gguf; }
    ./bin/ds4-synth --preset flash-q2 --threads 16 "$@" -o "$M" --tokenizer tokenizer.json 2>&1 | tail -1
}
