# The ambassador as a container image (docs/operations.md, "Container").
#
#   docker build -t ambassador .
#   docker run --init --stop-timeout 15 -p 127.0.0.1:9901:9901 \
#     -v "$PWD/my.toml:/etc/ambassador/ambassador.toml:ro" ambassador
#
# Two stages: the first installs the package into a venv (a wheel build needs
# setuptools and, should a dependency lack a wheel, a compiler); the second copies only
# that venv, so no build tool ends up in the image.

ARG PYTHON=python:3.11-slim-bookworm

FROM ${PYTHON} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY ambassador ./ambassador
COPY twisted ./twisted
# twistd scans twisted/plugins on every start and warns "Unable to write to plugin
# cache" on a read-only site-packages: the cache is built here (TWISTED-NOTES).  pip
# itself is not needed at run time and leaves with the build stage's tools.
RUN python -m venv /opt/ambassador \
 && /opt/ambassador/bin/pip install . \
 && /opt/ambassador/bin/pip uninstall -y pip setuptools wheel \
 && /opt/ambassador/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && test -f /opt/ambassador/lib/python3.11/site-packages/twisted/plugins/dropin.cache \
 && /opt/ambassador/bin/twistd ambassador --help >/dev/null

FROM ${PYTHON}
LABEL org.opencontainers.image.title="ambassador" \
      org.opencontainers.image.description="An outbound proxy with retries, timeouts and circuit breakers"
ENV PATH=/opt/ambassador/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/ambassador /opt/ambassador
COPY conf/container.toml /etc/ambassador/ambassador.toml
# The baked-in example config must at least be valid: the build fails if it is not.
RUN groupadd --system --gid 10001 ambassador \
 && useradd --system --uid 10001 --gid ambassador --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin ambassador \
 && python -m ambassador check --config /etc/ambassador/ambassador.toml
USER 10001:10001
# twistd writes no pid file (--pidfile=) and logs to stdout (-n), so the root file
# system can be read-only; the working directory only has to exist.
WORKDIR /tmp

# The admin endpoint: /live, /ready, /metrics, /status (SPEC §6).  The container
# config listens on every interface so that probes from outside the container reach it.
EXPOSE 9901
# slim has no curl: ask /live with Python's urllib.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/live', timeout=2)"]

# SIGTERM drains (SPEC §7): give docker stop more than the largest drain_timeout
# (docker run --stop-timeout, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["twistd", "-n", "--pidfile=", "ambassador"]
CMD ["--config", "/etc/ambassador/ambassador.toml"]
