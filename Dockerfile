# syntax=docker/dockerfile:1
#
# migpredictd container image.
#
# Build:  docker build -t migpredictd:0.1.0 .
# Run (Proxmox host; each VM has an extra QMP socket /run/qemu-server/VMID.migpredictd.qmp, opened to host
# group 9842 by deploy/systemd/migpredictd-qmp-acl):
#
#   docker run -d --name migpredictd --restart unless-stopped \
#     -p 9842:9842 \
#     --group-add 9842 \
#     -v /etc/migpredictd:/etc/migpredictd:ro \
#     -v /run/qemu-server:/run/qemu-server:ro \
#     --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
#     migpredictd:0.1.0
#
# The socket directory is mounted at the same path as on the host, so socket paths in config.yaml are the
# host's paths. On a libvirt host, config.yaml lists `libvirt: [{uri: "qemu:///system"}]` and the container
# mounts libvirt's socket instead (docs/deploy.md, "libvirt hosts"):
#
#   docker run -d --name migpredictd --restart unless-stopped -p 9842:9842 \
#     --group-add "$(getent group libvirt | cut -d: -f3)" \
#     -v /etc/migpredictd:/etc/migpredictd:ro -v /run/libvirt:/run/libvirt:ro \
#     --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
#     migpredictd:0.1.0
#
# Zero pages: the same image's second entrypoint, migpredictd-zeropaged, is the privileged helper
# (docs/security.md). It runs as root with two capabilities, no network, and the host's PIDs; the daemon
# above finds it at /run/migpredictd/zeropages.sock, on a volume both containers mount:
#
#   docker volume create migpredictd-run
#   docker run -d --name migpredictd-zeropaged --restart unless-stopped \
#     --user 0:0 --group-add 9842 --pid host --network none \
#     --cap-drop ALL --cap-add SYS_PTRACE --cap-add DAC_OVERRIDE --security-opt no-new-privileges \
#     -v /run/qemu-server:/run/qemu-server:ro -v migpredictd-run:/run/migpredictd --read-only \
#     --entrypoint migpredictd-zeropaged migpredictd:0.1.0 --socket-group 9842
#
# and the daemon's `docker run` above adds `-v migpredictd-run:/run/migpredictd:ro`. On a libvirt host the
# helper mounts `-v /run/libvirt:/run/libvirt:ro` instead of /run/qemu-server (it follows libvirt's PID files).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: turn the project and its dependencies into wheels; no compiler reaches the runtime image.
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# .dockerignore lets through only what the wheel needs (pyproject, README, LICENSE, the package).
COPY . .
# libvirt-python (the libvirt extra) compiles against libvirt's headers; only this stage has a compiler.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libvirt-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[libvirt]'

# --- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="migpredictd" \
      org.opencontainers.image.description="Predicts QEMU pre-copy live migration time and convergence as Prometheus metrics" \
      org.opencontainers.image.licenses="GPL-2.0-or-later"

# libvirt's client library, for the libvirt extra (Debian's, as the builder compiled against).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid so hostPath and bind-mount permissions can be planned for (9842 = the port, easy to recall).
RUN groupadd --system --gid 9842 migpredictd \
 && useradd --system --uid 9842 --gid migpredictd --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin migpredictd \
 && install -d -o root -g migpredictd -m 0750 /etc/migpredictd

# --no-index: install exactly the wheels the builder resolved (versions pinned by that resolution);
# nothing is fetched at this stage. The bind mount keeps the wheels out of every image layer. (DL3013 asks
# for pinned versions: the wheel directory holds exactly one version of each.)
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels 'migpredictd[libvirt]'

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 9842:9842
EXPOSE 9842
VOLUME ["/etc/migpredictd", "/run/qemu-server", "/run/migpredictd", "/run/libvirt"]

# slim has no curl: the probe is a Python one-liner. Exit 1 on any non-2xx answer or connection error.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9842/-/healthy', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["migpredictd"]
CMD ["run", "--config.file=/etc/migpredictd/config.yaml", "--web.listen-address=:9842", "--log.format=logfmt"]
