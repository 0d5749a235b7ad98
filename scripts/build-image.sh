#!/usr/bin/env bash
# Build deploy/Dockerfile as meshrt:<version> (docs/operations.md, "Container image"), with docker
# when its daemon answers, else podman. The base is python:3.12-slim-bookworm from a registry, or
# BASE=<image>. Where no registry is reachable, --local-base makes one first: Debian bookworm's
# minimal system with its python3 (3.11), by debootstrap (root), imported as
# localhost/meshrt-base:bookworm.
#
#   scripts/build-image.sh [--local-base]
#   ENGINE_OPTS="--storage-driver vfs" BUILD_OPTS="--isolation chroot --network host" scripts/build-image.sh --local-base
#
# ENGINE_OPTS go before the engine's command, BUILD_OPTS after `build` (what a container without
# overlayfs or user namespaces needs, as above).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${ENGINE:-}" ]; then
  engine=$ENGINE
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null 2>&1; then
  engine=podman
else
  echo "build-image: no container engine (a running docker daemon, or podman)" >&2
  exit 1
fi
read -r -a engine_opts <<<"${ENGINE_OPTS:-}"
read -r -a build_opts <<<"${BUILD_OPTS:-}"
run() { "$engine" "${engine_opts[@]}" "$@"; }

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
base=${BASE:-python:3.12-slim-bookworm}

if [ "${1:-}" = "--local-base" ]; then
  base=localhost/meshrt-base:bookworm
  if ! run image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null 2>&1 || { echo "build-image: --local-base needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
      http://deb.debian.org/debian >/dev/null
    # A host that reaches its registries through a TLS-inspecting proxy trusts that proxy's CA
    # (a certificate of its own in /usr/local/share/ca-certificates), and its apt may need to
    # accept a mirror's old Release files: the base is given both, or the build's pip and apt
    # steps fail on the same network the host reaches them on.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$rootfs"/usr/local/share/ca-certificates/
      chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    for conf in /etc/apt/apt.conf.d/*; do
      if grep -qE '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy)' "$conf" 2>/dev/null; then
        cp "$conf" "$rootfs"/etc/apt/apt.conf.d/
      fi
    done
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | run import --change 'CMD ["python3"]' - "$base" >/dev/null
    echo "build-image: made $base"
  fi
fi

format=()
[ "$engine" = podman ] && format=(--format docker)  # the OCI format drops HEALTHCHECK
run build "${format[@]}" "${build_opts[@]}" -f deploy/Dockerfile --build-arg BASE="$base" -t "meshrt:$version" .
echo "build-image: built meshrt:$version on $base with $engine"
