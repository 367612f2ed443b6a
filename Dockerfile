# nodecache: the daemon (`nodecache serve`) and the CSI node plugin (`nodecache csi`) in one image.
#
# Privileges at run time (see daemonset/daemonset.yaml):
#  - serve: /dev/fuse (hostPath CharDevice) and CAP_SYS_ADMIN for mount(2) of the FUSE filesystem;
#    its mount dir with mountPropagation: Bidirectional so the host and kubelet see the mount,
#    which Kubernetes only allows in a privileged container. So: privileged: true.
#  - csi: CAP_SYS_ADMIN for the read-only bind mounts into /var/lib/kubelet/pods, also Bidirectional:
#    privileged: true. It needs no /dev/fuse.
# Nothing else: no host network, no host PID, no Kubernetes API access.
#
# Build: `docker build -t nodecache .`, or scripts/build-image.sh (Docker or Podman, and --offline for a
# machine without a registry). Build arguments, both optional:
#  - PYTHON: the base image, any Debian-based one with python3 and its venv module.
#  - WHEELS: a folder inside the build context holding a wheel of every dependency
#    (scripts/wheelhouse.sh); pip then installs from it alone, and nothing in the build needs the network.

ARG PYTHON=python:3.11-slim-bookworm

# --- build: the package and its dependencies into a venv, with the CI install script ---
FROM ${PYTHON} AS build
ARG WHEELS=
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY . /src
RUN if [ -n "$WHEELS" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="/src/$WHEELS"; fi \
    && NODECACHE_SETUP=image bash .ci/setup \
    && rm -rf /root/.cache

# --- runtime: fuse3 (fusermount3, to detach a stale mount), the venv, and the package it points at ---
FROM ${PYTHON} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A base image that has fuse3 already (scripts/build-image.sh --offline makes one) needs no apt here.
# hadolint ignore=DL3008
RUN if ! command -v fusermount3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends fuse3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/nodecache /src/nodecache
COPY --from=build /src/csi /src/csi
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /src
ENTRYPOINT ["nodecache"]
CMD ["--help"]

# --- check: the runtime stage proves itself during the build, without a container run ---
# (the CLI, the shipped ConfigMaps and DaemonSet args, a verified prefetch from the bundled Hub emulator
# on loopback, the CSI plugin over its unix socket; see scripts/image-check.py)
FROM runtime AS check
COPY daemonset/configmap.yaml daemonset/csi-policy.yaml daemonset/daemonset.yaml scripts/image-check.py /check/
RUN python3 /check/image-check.py /check && touch /check/passed

# --- the image: the runtime stage, once its checks have passed ---
FROM runtime
COPY --from=check /check/passed /usr/share/nodecache/image-checks-passed
