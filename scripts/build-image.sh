#!/usr/bin/env bash
# Usage: scripts/build-image.sh [-t TAG] [--base IMAGE] [--wheels] [--python X.Y] [--offline [--suite S]]
#                               [-- EXTRA BUILD ARGS]
#
# Builds the image from the Dockerfile with Docker (when its engine answers) or else Podman, as a user
# would by hand, and prints its size and the build time. The Dockerfile's own check stage proves the
# runtime stage works (scripts/image-check.py), so no container needs to run here.
#
#   (no option)    `docker build -t nodecache:VERSION .`: the base image (python:3.11-slim-bookworm) from
#                  its registry, the Python packages from the package index.
#   --base IMAGE   another base image (--build-arg PYTHON=IMAGE): any Debian-based one with python3 and venv.
#   --wheels       first download a wheel of every dependency on this machine (scripts/wheelhouse.sh, for
#                  Python X.Y, default 3.11) into build/wheels-pyX.Y and install from it alone
#                  (--build-arg WHEELS=...): pip inside the build needs no network. For a build container
#                  that cannot reach or verify the package index.
#   --offline      air-gapped: no registry for base images either. The base is made here from Debian's
#                  packages (`debootstrap --variant=minbase` of suite S, default bookworm, with python3,
#                  python3-venv and fuse3), imported as localhost/nodecache-base:S (made once, reused), and
#                  built with --wheels and `--network host` (nothing inside the build reaches out; the
#                  check stage talks to itself on loopback). Podman builds with `--isolation chroot`, which
#                  needs neither cgroups nor a container runtime. Needs root and apt for debootstrap.
#   -- ARGS        passed to `docker build` / `podman build` as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' nodecache/__init__.py)"
tag="nodecache:$version" base="" wheels=0 pyver="" offline=0 suite=bookworm extra=()
usage() { sed -n '2,3p' "$0" | sed 's/^# //' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        -t) tag="${2:?}"; shift 2 ;;
        --base) base="${2:?}"; shift 2 ;;
        --wheels) wheels=1; shift ;;
        --python) pyver="${2:?}"; shift 2 ;;
        --offline) offline=1; wheels=1; shift ;;
        --suite) suite="${2:?}"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) usage ;;
    esac
done
log() { printf '[build-image %s] %s\n' "$(date +%T)" "$*"; }

if docker info >/dev/null 2>&1; then
    engine=docker
elif command -v podman >/dev/null; then
    engine=podman
elif [ "$offline" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "no container engine: installing Debian's podman"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman >/dev/null
    engine=podman
else
    echo "$0: neither a running Docker engine nor podman" >&2
    exit 1
fi
build=("$engine" build --format docker)
[ "$engine" = docker ] && build=(docker build)

if [ "$offline" = 1 ]; then
    case "$suite" in bookworm) : "${pyver:=3.11}" ;; trixie) : "${pyver:=3.13}" ;; *) usage ;; esac
    base="${base:-localhost/nodecache-base:$suite}"
    if ! "$engine" image inspect "$base" >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || { echo "$0: --offline makes its base image with debootstrap: run as root" >&2; exit 1; }
        if ! command -v debootstrap >/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
        fi
        rootfs="$(mktemp -d /var/tmp/nodecache-base.XXXXXX)"
        trap 'rm -rf --one-file-system "$rootfs"' EXIT
        log "making $base: debootstrap --variant=minbase $suite with python3, python3-venv, fuse3"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,fuse3 "$suite" "$rootfs" \
            http://deb.debian.org/debian >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
        rm -f "$rootfs.log"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | "$engine" import - "$base" >/dev/null
        rm -rf --one-file-system "$rootfs"
        trap - EXIT
    fi
    build+=(--network host)
    [ "$engine" = podman ] && build+=(--isolation chroot)
fi
[ -n "$base" ] && build+=(--build-arg "PYTHON=$base")

if [ "$wheels" = 1 ]; then
    : "${pyver:=3.11}"
    dir="build/wheels-py$pyver"
    log "wheelhouse for Python $pyver in $dir"
    scripts/wheelhouse.sh --python "$pyver" "$dir"
    build+=(--build-arg "WHEELS=$dir")
fi

log "${build[*]} ${extra[*]} -t $tag ."
t0=$SECONDS
"${build[@]}" "${extra[@]}" -t "$tag" .
seconds=$((SECONDS - t0))
size="$("$engine" image inspect --format '{{.Size}}' "$tag")"
log "built $tag with $engine in ${seconds} s: $((size / 1000000)) MB"
