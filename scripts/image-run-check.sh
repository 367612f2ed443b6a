#!/usr/bin/env bash
# Usage: scripts/image-run-check.sh [IMAGE]    (as root, with podman; IMAGE default nodecache:VERSION)
#
# Runs the image the way the DaemonSet does and reads its mount from the host: the Hub emulator the image
# ships serves a generated repo on loopback (one container), the daemon (`nodecache serve`, a privileged
# container with /dev/fuse) mounts at a directory bound from the host with shared propagation, and the
# host reads every file through that directory and compares the bytes. Then SIGTERM: the mount must go.
#
# Where podman's default runtime cannot start a container (seen here: crun on a cgroup v1/v2 hybrid
# host, and rlimits above the caller's without CAP_SYS_RESOURCE), it retries with runc, cgroupfs and
# ulimits no higher than the caller's; NODECACHE_RUN_ARGS replaces that choice.
set -euo pipefail
cd "$(dirname "$0")/.."
image="${1:-nodecache:$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' nodecache/__init__.py)}"
log() { printf '[image-run-check %s] %s\n' "$(date +%T)" "$*"; }

if [ -n "${NODECACHE_RUN_ARGS:-}" ]; then
    read -r -a run_args <<<"$NODECACHE_RUN_ARGS"
elif podman run --rm "$image" --help >/dev/null 2>&1; then
    run_args=()
else
    command -v runc >/dev/null || { echo "$0: podman cannot run $image, and there is no runc to try" >&2; exit 1; }
    nproc="$(ulimit -Hu)"  # podman's conmon runs with at most 32768 processes: no higher for the container
    [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
    run_args=(--runtime runc --cgroup-manager cgroupfs
        --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=$nproc:$nproc")
    log "podman's default runtime failed; using ${run_args[*]}"
fi

work="$(mktemp -d /var/tmp/nodecache-run.XXXXXX)"
name="nodecache-run-check-$$"
cleanup() {
    podman rm -f -t 20 "$name-daemon" "$name-hub" >/dev/null 2>&1 || true
    umount -R -l "$work/mnt" 2>/dev/null || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
mkdir -p "$work/repo/sub" "$work/mnt" "$work/cache"
head -c 20000000 /dev/urandom >"$work/repo/model.safetensors"
echo '{"model_type": "run-check"}' >"$work/repo/config.json"
echo 'nested' >"$work/repo/sub/notes.txt"
mount --bind "$work/mnt" "$work/mnt"
mount --make-shared "$work/mnt"   # a node's /var/lib/nodecache/mnt under systemd: shared

port=$((20000 + RANDOM % 20000))
podman run -d --name "$name-hub" "${run_args[@]}" --network host -v "$work/repo:/repo:ro" \
    --entrypoint python3 "$image" -m nodecache.testing.hub --repo run-check/tiny=/repo --listen "127.0.0.1:$port" >/dev/null
podman run -d --name "$name-daemon" "${run_args[@]}" --privileged --network host --device /dev/fuse \
    -v "$work/mnt:/var/lib/nodecache/mnt:rshared" -v "$work/cache:/var/lib/nodecache/cache" "$image" \
    serve --mount /var/lib/nodecache/mnt --cache-dir /var/lib/nodecache/cache --repo run-check/tiny \
    --hub-url "http://127.0.0.1:$port" --listen "127.0.0.1:$((port + 1))" >/dev/null
for _ in $(seq 60); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$((port + 1))/readyz', timeout=1)" 2>/dev/null && break
    sleep 1
done
snap=("$work"/mnt/hub/models--run-check--tiny/snapshots/*)
[ -d "${snap[0]}" ] || { podman logs "$name-daemon" >&2; echo "$0: the host sees no snapshot in $work/mnt" >&2; exit 1; }
for f in model.safetensors config.json sub/notes.txt; do
    cmp "$work/repo/$f" "${snap[0]}/$f" || { echo "$0: $f differs through the mount" >&2; exit 1; }
done
log "the host read every file of the repo through the container's mount, byte for byte"
podman stop -t 20 "$name-daemon" >/dev/null
rc="$(podman inspect --format '{{.State.ExitCode}}' "$name-daemon")"
if [ "$rc" != 0 ] || [ -e "${snap[0]}" ]; then
    podman logs "$name-daemon" >&2
    echo "$0: after SIGTERM the daemon exited $rc and the mount is $([ -e "${snap[0]}" ] && echo still there || echo gone)" >&2
    exit 1
fi
log "SIGTERM: the daemon exited 0 and its mount is gone from the host"
