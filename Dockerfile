# signature-relay container image.
#
#   docker build -t signature-relay .
#   docker run -p 25:2525 \
#     -v /srv/signature-relay/relay.toml:/etc/signature-relay/relay.toml:ro \
#     -v /srv/signature-relay/rules:/etc/signature-relay/rules:ro \
#     -v /srv/signature-relay/signatures:/etc/signature-relay/signatures:ro \
#     -v /srv/signature-relay/certs:/etc/signature-relay/certs:ro \
#     signature-relay
#
# Start from deploy/relay.example.toml. The relay runs as an unprivileged user and listens on 2525
# inside the container (as that example configures); publish it as
# port 25 (Exchange Online's outbound connector only ever connects to port 25). Relative paths in
# the mounted relay.toml resolve against /etc/signature-relay.
#
# BASE: any Debian-based image with Python 3.11 and its venv module. The default is the official
# slim image; where no registry is reachable, tests/e2e/test_image.py builds one from Debian's
# packages (debootstrap) and passes it here.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
# A venv: the same commands work on the official image and on Debian's own Python (PEP 668).
RUN python3 -m venv /opt/build && /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${BASE}
RUN groupadd --system --gid 10025 relay \
 && useradd --system --uid 10025 --gid relay --home-dir /var/lib/signature-relay --create-home relay
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/signature-relay \
 && /opt/signature-relay/bin/pip install --no-cache-dir --no-index --find-links=/wheels "signature-relay==0.1.0" \
 && rm -rf /wheels
ENV PATH=/opt/signature-relay/bin:$PATH \
    SIGNATURE_RELAY_CONFIG=/etc/signature-relay/relay.toml \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/signature-relay
USER 10025:10025
EXPOSE 2525
# /healthz answers 200 while every listener is open; it is on [metrics] listen, 127.0.0.1:9025 in
# deploy/relay.example.toml (keep that, or change the port here too).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9025/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["signature-relay"]
CMD ["serve"]
