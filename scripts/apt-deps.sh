#!/usr/bin/env bash
# Installs the Debian packages snakenode needs when they are missing:
#   build-essential, libgmp-dev  -> fastecdsa (a libp2p dependency) builds from source
#   iproute2                     -> network-namespace tests and the scenarios' netns backend
#   chromium                     -> the dashboard test loads the page in headless Chromium
#   iptables                     -> the netns test that proves a lab works under Docker's FORWARD DROP
# Does nothing when all are present; never fails the build on a non-Debian machine, it says what to do.
set -u
need=()
for p in build-essential libgmp-dev iproute2 chromium iptables; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "snakenode setup: please install ${need[*]} (a C compiler and GMP headers) with your package manager" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "snakenode setup: installing ${need[*]}" >&2
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
