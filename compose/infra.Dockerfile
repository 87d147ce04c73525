# etcd, BIND and Prometheus for the compose deployment: Debian 12's own packages (the same
# binaries the tests and `make demo` run), one image for the three services.
ARG BASE=debian:bookworm
FROM ${BASE}
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      --no-install-recommends etcd-server bind9 bind9-utils prometheus \
    && rm -rf /var/lib/apt/lists/*
