#!/usr/bin/env bash
# Install Debian packages the tests need (as root, or through sudo when there is one):
#   bash scripts/apt_install.sh PACKAGE...
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
# Another apt run (or the daily timer) may hold the lock for a while; wait for it instead of failing.
$SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq "$@" >/dev/null
