# One image for every role: sidecar, producer, consumer (see docker-compose.yml).
#
#   docker build -t sealedsum .
#   docker run --rm sealedsum --help
#
# The enclave measurement covers the installed code and the Python and library versions,
# so it is a property of this image: compute it inside the image
# (`docker run --rm sealedsum measure --config /etc/sealedsum/sealedsum.toml`), not in a
# development virtualenv.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs to install (pyproject.toml names README.md as its readme).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY sidecar ./sidecar
COPY producers ./producers
COPY consumers ./consumers
COPY sealedsum ./sealedsum
# All pinned dependencies ship manylinux wheels for CPython 3.11 on x86_64, so the slim
# image needs no compiler there.
RUN pip install . \
 && cd / \
 && rm -rf /src

# The sidecar's bootstrap script, the default config and sample data.
COPY deploy/sidecar-entrypoint.sh /usr/local/bin/sealedsum-sidecar-entrypoint
COPY deploy/sealedsum.toml /etc/sealedsum/sealedsum.toml
COPY deploy/sample.csv /data/sample.csv

# Non-root user. /state (platform key, sealed enclave keys) and /shared (the client config
# the sidecar writes) are created here and owned by that user, so that the named volumes
# docker-compose mounts on them start out with this ownership and mode.
RUN chmod 0755 /usr/local/bin/sealedsum-sidecar-entrypoint \
 && chmod 0644 /etc/sealedsum/sealedsum.toml /data/sample.csv \
 && groupadd --system --gid 10001 sealedsum \
 && useradd --system --uid 10001 --gid sealedsum --home-dir /home/sealedsum --create-home \
        --shell /usr/sbin/nologin sealedsum \
 && install -d -o sealedsum -g sealedsum -m 0700 /state \
 && install -d -o sealedsum -g sealedsum -m 0755 /shared

USER sealedsum:sealedsum
WORKDIR /home/sealedsum

# No CMD: `docker run IMAGE` alone prints the usage; compose services that replace the
# entrypoint then get no stray default arguments.
ENTRYPOINT ["sealedsum"]
