#!/usr/bin/env bash
# Build the adaptd .deb from a built binary:
#   deploy/deb/build.sh [BINARY] [OUT_DIR]      (default: target/release/adaptd, target/deb)
# Installs the binary, the systemd unit, the default configuration (a conffile), the example
# configurations and the docs; the postinst creates the `adaptd` system user. The ML runtimes
# are not in the package: they come from the device's own builds (NVIDIA's PyTorch and
# onnxruntime-gpu for JetPack, see /usr/share/doc/adaptd/jetson.md), linked into /usr/lib/adaptd.
# DEB_COMPRESSION=none|gzip|xz (default xz) trades size for build time.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
binary=${1:-$root/target/release/adaptd}
out=${2:-$root/target/deb}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
[ -x "$binary" ] || { echo "build.sh: $binary is not an executable (cargo build --release -p adaptd)" >&2; exit 2; }
# The package's architecture is the binary's, not the build machine's (a cross-build makes arm64).
case $(od -An -j18 -N2 -tu2 "$binary" 2>/dev/null | tr -d ' ') in
  62) arch=amd64 ;;
  183) arch=arm64 ;;
  *) echo "build.sh: $binary is not an x86-64 or aarch64 ELF executable" >&2; exit 2 ;;
esac

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
install -D -m 0755 "$binary" "$stage/usr/bin/adaptd"
install -D -m 0644 "$root/deploy/systemd/adaptd.service" "$stage/lib/systemd/system/adaptd.service"
install -D -m 0644 "$root/config/adaptd.toml" "$stage/etc/adaptd/adaptd.toml"
for f in "$root"/config/examples/*.toml; do install -D -m 0644 "$f" "$stage/usr/share/doc/adaptd/examples/$(basename "$f")"; done
install -D -m 0644 "$root/README.md" "$stage/usr/share/doc/adaptd/README.md"
install -D -m 0644 "$root/deploy/jetson/README.md" "$stage/usr/share/doc/adaptd/jetson.md"
install -D -m 0644 "$root/deploy/mosquitto/adaptd.conf" "$stage/usr/share/doc/adaptd/examples/mosquitto-adaptd.conf"
install -D -m 0644 "$root/docs/protocol.md" "$stage/usr/share/doc/adaptd/protocol.md"
install -d -m 0755 "$stage/usr/lib/adaptd"
cat > "$stage/usr/share/doc/adaptd/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: adaptd
License: Apache-2.0
COPY

install -d "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: adaptd
Version: $version
Architecture: $arch
Maintainer: adaptd maintainers <adaptd@localhost>
Installed-Size: $size
Depends: libc6, libstdc++6, adduser, systemd
Recommends: mosquitto
Section: science
Priority: optional
Description: on-device adaptation daemon for edge and robotics devices
 Serves a frozen base model with ONNX Runtime, collects labelled samples over
 MQTT, fine-tunes heads and LoRA adapters on the device with libtorch,
 validates every candidate and hot-swaps it without dropping a request.
 Needs libtorch and libonnxruntime in /usr/lib/adaptd (see jetson.md).
CONTROL
echo "/etc/adaptd/adaptd.toml" > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd adaptd >/dev/null; then
        adduser --system --group --home /var/lib/adaptd --no-create-home --gecos "adaptd daemon" adaptd
    fi
    for g in video render; do
        if getent group "$g" >/dev/null; then adduser adaptd "$g" >/dev/null; fi
    done
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable adaptd.service >/dev/null || true
    fi
fi
POSTINST
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop adaptd.service || true
fi
PRERM
cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
# Adapters and samples in /var/lib/adaptd are the device's learning: kept unless purged.
if [ "$1" = purge ]; then
    rm -rf /var/lib/adaptd
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/adaptd_${version}_${arch}.deb"
fakeroot dpkg-deb -Z"${DEB_COMPRESSION:-xz}" --build "$stage" "$deb" >/dev/null
echo "$deb"
