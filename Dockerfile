# dache in a container: `docker build -t dache .` then
#   docker run -p 8080:8080 -v dache-data:/var/lib/dache dache
# Configuration is the environment alone (PORT, DURABILITY_ENGINE, AUTH_TOKEN_FILE, ...;
# see README "Deploying"). The tests in tests/test_deploy_docker.py hold this file to
# the code's defaults.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: install dache and its dependencies into a venv. Every dependency ships
# wheels, so this stage needs no compiler; if one ever must build from source,
# install build-essential here and it still stays out of the final image.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/dache
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY dache ./dache
COPY twisted ./twisted
# twistd finds `dache` through a plugin cache it cannot write at run time as a
# non-root user: write it now.
RUN /opt/dache/bin/pip install . \
    && /opt/dache/bin/pip uninstall --yes pip \
    && /opt/dache/bin/python -c \
       "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

# -- run: the venv on a slim base, as a non-root user.
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 dache \
    && useradd --system --uid 10001 --gid dache --no-create-home \
       --home-dir /var/lib/dache --shell /usr/sbin/nologin dache \
    && mkdir -p /var/lib/dache \
    && chown dache:dache /var/lib/dache
COPY --from=build /opt/dache /opt/dache
ENV PATH=/opt/dache/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DISK_PATH=/var/lib/dache
# A memory bound (README "Memory and eviction"): give the container's limit
# room for MAX_MEMORY, the process's ~60 MiB baseline and 25 % on top, e.g.
#   docker run -m 1400m -e MAX_MEMORY=1gb -e EVICTION_POLICY=allkeys-lru ...
#ENV MAX_MEMORY=1gb EVICTION_POLICY=allkeys-lru
# Open files: one per connection and per watcher, MAX_CONNECTIONS + WATCH_MAX + ~128
# (11128 with the defaults). dache raises its soft limit that far within the hard
# limit the runtime gives; if that is lower: docker run --ulimit nofile=16384:16384 ...
VOLUME /var/lib/dache
WORKDIR /var/lib/dache
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8080
# Probes the port the node serves on (LISTEN, else PORT) with the image's own Python.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "dache.healthcheck"]
# Exec form: twistd is PID 1 and gets docker stop's SIGTERM, and shuts down cleanly.
STOPSIGNAL SIGTERM
CMD ["twistd", "-n", "--pidfile=", "dache"]
