#!/usr/bin/env bash
# Make this Linux machine able to run jobs in containers, then build the CPU image:
#   bash scripts/container_setup.sh
# Installs Podman (Debian packages) and serves its Docker-compatible API at
# unix:///run/podman/podman.sock, one of the places the container runner looks; imports a local
# Debian base image (debootstrap, no registry needed); builds the CPU image with
# `llamafarm images build cpu` from the hermetic wheelhouse. Idempotent: a second run only checks,
# and rebuilds the image layers whose inputs changed. Needs root and scripts/install.sh done first.
# Machines with Docker need none of this: `llamafarm images build cpu` alone builds the image.
set -euo pipefail
cd "$(dirname "$0")/.."

SOCKET=/run/podman/podman.sock
BASE_IMAGE=localhost/llamafarm-base:bookworm
log() { echo "container setup: $*"; }

missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || { echo "container setup: ${missing[*]} missing; run this script as root to install them" >&2; exit 1; }
  log "installing ${missing[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi

# crun fails on this kind of host ("cgroups in hybrid mode not supported"); runc works. The host's
# hard open-files limit is below Podman's default, so every container gets explicit limits.
conf=/etc/containers/containers.conf.d/llamafarm.conf
if [ ! -f "$conf" ]; then
  mkdir -p "$(dirname "$conf")"
  cat >"$conf" <<'EOF'
# Written by llamafarm's scripts/container_setup.sh
[containers]
default_ulimits = ["nofile=1024:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF
  log "wrote $conf"
fi

# A service whose working folder was deleted (started from a clone that is gone) still answers pings
# but cannot start containers (conmon: "Failed to get working directory"): stop it, so it is started
# again below, from /.
for pid in $(pgrep -f "podman system service .*unix://$SOCKET" || true); do
  if [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == *"(deleted)" ]]; then
    log "restarting the Podman service (its working folder was deleted)"
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
done

# The Docker-API service; --time=0 keeps it up like a Docker daemon. Started from / so that no
# checkout it was started from can pull its working folder away.
if ! curl -fsS --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1; then
  mkdir -p "$(dirname "$SOCKET")"
  pushd / >/dev/null
  setsid nohup podman system service --time=0 "unix://$SOCKET" >/tmp/llamafarm-podman-service.log 2>&1 </dev/null &
  popd >/dev/null
  for _ in $(seq 50); do
    curl -fsS --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fsS --unix-socket "$SOCKET" http://d/_ping >/dev/null \
    || { echo "container setup: the Podman service did not answer; see /tmp/llamafarm-podman-service.log" >&2; exit 1; }
  log "Podman serves the Docker API at unix://$SOCKET"
fi

# A registry-free base: Debian bookworm (Python 3.11, matching the locked wheels) from the Debian mirror.
if ! podman image exists "$BASE_IMAGE"; then
  rootfs=$(mktemp -d /tmp/llamafarm-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  log "building $BASE_IMAGE with debootstrap (about 40 s)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

# The linters of the image checks (tests/test_images.py); the machine's absent pip index folders are noise.
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements/container-tools.txt \
  2> >(grep -v "^WARNING: Location" >&2)

.venv/bin/llamafarm images build cpu --base-image "$BASE_IMAGE"
podman image prune --force >/dev/null  # layers of earlier builds that no tag uses any more
