# nodecache: the daemon (`nodecache serve`) and the CSI node plugin (`nodecache csi`) in one image.
#
# Privileges at run time (see daemonset/daemonset.yaml):
#  - serve: /dev/fuse (hostPath CharDevice) and CAP_SYS_ADMIN for mount(2) of the FUSE filesystem;
#    its mount dir with mountPropagation: Bidirectional so the host and kubelet see the mount,
#    which Kubernetes only allows in a privileged container. So: privileged: true.
#  - csi: CAP_SYS_ADMIN for the read-only bind mounts into /var/lib/kubelet/pods, also Bidirectional:
#    privileged: true. It needs no /dev/fuse.
# Nothing else: no host network, no host PID, no Kubernetes API access.

ARG PYTHON=python:3.11-slim-bookworm

# --- build: the exact install CI runs (.ci/setup), into a venv ---
FROM ${PYTHON} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY . /src
RUN NODECACHE_SETUP=image bash .ci/setup \
    && rm -rf /root/.cache \
    && nodecache --help >/dev/null \
    && python3 -c "import nodecache.csi.driver"

# --- runtime: fuse3 (fusermount3, to detach a stale mount) + the venv + the source the editable install points at ---
FROM ${PYTHON}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src /src
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /src
ENTRYPOINT ["nodecache"]
CMD ["--help"]
