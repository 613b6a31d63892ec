# aml-egress as a container: a sidecar next to compute, or the image of a Kubernetes egress
# gateway. Not built on the project's machines (no container engine there): README lists
# it under "what is not run here".
#
#   docker build -t aml-egress .
#   docker run -p 3128:3128 aml-egress
#
# Metrics for a Prometheus outside the container: mount a token file and set
#   AML_EGRESS__ADMIN__LISTEN=0.0.0.0:9464 AML_EGRESS__ADMIN__TOKEN_FILE=/run/secrets/admin-token
# (off loopback the admin listener refuses to start without a token).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin aml-egress

# glibc and libgcc only, no shell, no package manager; runs as the image's non-root user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/aml-egress /usr/local/bin/aml-egress
COPY config/docker.toml /etc/aml-egress/config.toml
USER nonroot
EXPOSE 3128 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/aml-egress", "health", "--admin", "http://127.0.0.1:9464", "--timeout", "3"]
ENTRYPOINT ["/usr/local/bin/aml-egress"]
CMD ["serve", "--config", "/etc/aml-egress/config.toml"]
