#!/usr/bin/env bash
# Usage: scripts/fresh-debian-check.sh [--keep] [bookworm|trixie]    (as root; default bookworm)
#
# The README's quick start on a pristine Debian: a `debootstrap --variant=minbase` root (no python3,
# no pip, nothing but apt), /proc, /sys, /dev and a fresh /run bound in, a fresh `git clone` of this
# checkout's HEAD (commit first: uncommitted changes are not in it), then `bash .ci/demo` and
# `bash .ci/run` there as root, with CI=true and no stdin, exactly as the README says.
#
# apt inside the root talks to Debian's mirror itself. pip gets its wheels from a wheelhouse made on this
# machine (scripts/wheelhouse.sh, offered through PIP_NO_INDEX + PIP_FIND_LINKS, which .ci/setup leaves to
# pip), because a pristine root does not trust what this machine trusts for TLS.
#
# Everything happens in a private mount namespace, so no bind, FUSE mount or `ip netns` mount made inside
# can outlive the run, and the trap unmounts each bind and removes the root also on failure. The pristine
# debootstrap is cached as a tarball ($NODECACHE_FRESH_DIR, default /var/tmp/nodecache-fresh), so a re-run
# starts in seconds; delete the tarball to bootstrap again. Exit status: that of .ci/run (or of the first
# step that failed).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${NODECACHE_FRESH_DIR:-/var/tmp/nodecache-fresh}"
keep=0
[ "${1:-}" = --keep ] && { keep=1; shift; }
suite="${1:-bookworm}"
case "$suite" in
    bookworm) pyver=3.11 ;;
    trixie) pyver=3.13 ;;
    *) echo "usage: $0 [--keep] [bookworm|trixie]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "$0: run as root (debootstrap, chroot, mounts)" >&2; exit 1; }

# Everything below runs in its own mount namespace (unshare's default propagation is private).
if [ -z "${NODECACHE_FRESH_NS:-}" ]; then
    exec env NODECACHE_FRESH_NS=1 unshare --mount -- bash "$0" "$@"
fi

log() { printf '[fresh-debian %s] %s\n' "$(date +%T)" "$*"; }
mkdir -p "$work"

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

tarball="$work/$suite-minbase.tar"
if [ ! -s "$tarball" ]; then
    log "debootstrap --variant=minbase $suite (once; cached in $tarball)"
    boot="$(mktemp -d "$work/debootstrap.XXXXXX")"
    trap 'rm -rf --one-file-system "$boot"' EXIT
    t0=$SECONDS
    debootstrap --variant=minbase "$suite" "$boot" http://deb.debian.org/debian >"$work/debootstrap-$suite.log" 2>&1 \
        || { tail -20 "$work/debootstrap-$suite.log" >&2; rm -rf --one-file-system "$boot"; exit 1; }
    apt_clean=("$boot"/var/cache/apt/archives/*.deb)
    rm -f "${apt_clean[@]}"
    tar -C "$boot" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf --one-file-system "$boot"
    trap - EXIT
    log "debootstrap took $((SECONDS - t0)) s"
fi

root="$(mktemp -d "$work/root-$suite.XXXXXX")"
binds=()
cleanup() {
    local rc=$? pid r
    # Processes the run left inside the root (a daemon a failed test did not stop): by PID, only ours.
    for r in /proc/[0-9]*/root; do
        pid="${r#/proc/}"; pid="${pid%/root}"
        [ "$(readlink "$r" 2>/dev/null)" = "$root" ] && kill -9 "$pid" 2>/dev/null || true
    done
    # Anything mounted below the root (FUSE mounts, netns binds a failed test left) first, then our binds.
    awk -v p="$root/" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
    for ((i = ${#binds[@]} - 1; i >= 0; i--)); do
        umount -R -l "${binds[i]}" 2>/dev/null || true
    done
    if awk -v p="$root/" 'index($5, p) == 1 {found = 1} END {exit !found}' /proc/self/mountinfo; then
        log "something is still mounted under $root: left in place" >&2
    elif [ "$keep" = 1 ]; then
        log "kept $root"
    else
        rm -rf --one-file-system "$root"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "unpacking $tarball into $root"
tar -C "$root" -xpf "$tarball"

bind() {  # bind SRC DEST-INSIDE-ROOT [ro]
    mkdir -p "$root$2"
    mount --rbind "$1" "$root$2"
    binds+=("$root$2")
    mount --make-rslave "$root$2"
    [ "${3:-}" = ro ] && mount -o remount,bind,ro "$root$2"
    return 0
}
# The root is a mount point of its own, as / is on a booted machine (and shared, as systemd makes it):
# `ip netns exec` and the tests' container namespaces run `mount --make-rslave /`, which needs one.
mount --bind "$root" "$root" && binds+=("$root") && mount --make-shared "$root"
bind /proc /proc
bind /sys /sys
bind /dev /dev                                   # /dev/fuse, /dev/pts, /dev/shm
mount -t tmpfs -o mode=755 tmpfs "$root/run" && binds+=("$root/run")   # ip netns keeps its binds in /run/netns
# What an installed machine has and a debootstrap root lacks: the installer's /etc/hosts (`ip netns exec`
# binds /etc/netns/<ns>/hosts over it, which the DNS-discovery test uses) and DHCP's resolv.conf.
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
cp /etc/resolv.conf "$root/etc/resolv.conf"

log "wheelhouse for Python $pyver"
wheels="$work/wheels-py$pyver"
"$repo/scripts/wheelhouse.sh" --test --python "$pyver" "$wheels"
bind "$wheels" /wheels ro

dirty="$(git -C "$repo" status --porcelain --untracked-files=no)"
[ -z "$dirty" ] || log "warning: uncommitted changes in $repo are not in the clone"
head="$(git -C "$repo" rev-parse HEAD)"
git clone -q --no-hardlinks "$repo" "$root/root/nodecache"
git -C "$root/root/nodecache" checkout -q --detach "$head"
log "clone of $(git -C "$repo" log --oneline -1 "$head")"

run_in_root() {  # run_in_root NAME COMMAND: as a fresh login would, as root, CI=true, no stdin
    local t0=$SECONDS rc=0
    log "$1: $2"
    chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb CI=true \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels \
        /bin/bash -c "cd /root/nodecache && $2" </dev/null >"$work/$suite-$1.log" 2>&1 || rc=$?
    tail -n 15 "$work/$suite-$1.log"
    log "$1: exit $rc after $((SECONDS - t0)) s (log: $work/$suite-$1.log)"
    return "$rc"
}
run_in_root demo "bash .ci/demo"
run_in_root run "bash .ci/run"
