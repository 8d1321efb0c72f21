# The kache image, built with a container engine:
#
#   docker build -t kache:dev .
#
# scripts/build-image builds the same files without one (what the tests and CI use): the kache
# binary, stripped (its debug info stays in the build stage, /target/kache.debug: `docker build
# --target build` to keep it), the shared libraries it loads at the paths ldd gives, /etc/passwd and /etc/group with
# the user kache (65532), /tmp and /var/lib/kache. No shell, no package manager. The two images
# hold the same files; their digests differ, because an engine writes its own layer metadata.
# Build on Debian bookworm, as the project is tested: the libraries come from the build stage.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN RUSTFLAGS="--remap-path-prefix=/src=/kache --remap-path-prefix=/usr/local/cargo=/cargo" \
        cargo build --release --locked -p kache --target-dir /target \
 && mkdir -p /rootfs/usr/local/bin /rootfs/etc /rootfs/tmp /rootfs/var/lib/kache \
 && objcopy --only-keep-debug --compress-debug-sections=zlib /target/release/kache /target/kache.debug \
 && objcopy --strip-all --add-gnu-debuglink=/target/kache.debug /target/release/kache /rootfs/usr/local/bin/kache \
 && for lib in $(ldd /target/release/kache | grep -o '/[^ ]*'); do \
        mkdir -p "/rootfs$(dirname "$lib")" && cp -L "$lib" "/rootfs$lib"; \
    done \
 && printf 'root:x:0:0:root:/root:/sbin/nologin\nkache:x:65532:65532:kache:/var/lib/kache:/sbin/nologin\n' >/rootfs/etc/passwd \
 && printf 'root:x:0:\nkache:x:65532:\n' >/rootfs/etc/group \
 && chmod 1777 /rootfs/tmp \
 && chown 65532:65532 /rootfs/var/lib/kache && chmod 750 /rootfs/var/lib/kache

FROM scratch
COPY --from=build /rootfs/ /
USER 65532:65532
WORKDIR /var/lib/kache
ENV PATH=/usr/local/bin
LABEL org.opencontainers.image.title="kache" org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/kache"]
