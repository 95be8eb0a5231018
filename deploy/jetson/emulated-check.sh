#!/usr/bin/env bash
# Run the arm64 build of adaptd on this amd64 machine under user-mode emulation (QEMU), against
# the aarch64 libtorch and ONNX Runtime that the cross-build unpacked:
#   deploy/jetson/emulated-check.sh [BINARY]     (make check-arm64; after make deb-arm64)
# It runs `adaptd validate` on the shipped configuration, `adaptd check` (both reference
# bundles: ONNX Runtime and libtorch agree with and without LoRA, LoRA trains with the base
# frozen, a head adapts to rotated digits) and a short `adaptd doctor`. Slow (minutes), not
# fast: the point is that the arm64 binary computes the same function.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
triple=aarch64-unknown-linux-gnu
binary=${1:-$root/target/$triple/release/adaptd}
site=$root/target/aarch64-prefix/site-packages
say() { echo "emulated-check: $*" >&2; }
[ -x "$binary" ] || { say "$binary is missing: run deploy/jetson/cross-build.sh (make deb-arm64) first"; exit 2; }
[ -d "$site/torch/lib" ] || { say "$site has no aarch64 libtorch: run deploy/jetson/cross-build.sh first"; exit 2; }
if ! command -v qemu-aarch64-static >/dev/null; then
  say "installing Debian's qemu-user-static"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get install -y -q qemu-user-static >/dev/null
fi
# User-mode QEMU shows the guest this machine's own /proc/cpuinfo, an x86 one, and the CPU
# detection ONNX Runtime runs as it loads (cpuinfo) crashes on it. So the checks run in a mount
# namespace of their own whose /proc/cpuinfo describes a Jetson Orin's cores (Cortex-A78AE),
# one per CPU here, and whose /sys/devices/system/cpu is a copy of this machine's with each
# core's MIDR_EL1 register added (oneDNN inside libtorch reads it to pick its kernels, and says
# "Can't open MIDR_EL1 sysfs entry" on every command without it).
if [ -z "${ADAPTD_GUEST_CPUINFO:-}" ]; then
  cpuinfo=$(mktemp)
  trap 'rm -f "$cpuinfo"' EXIT
  for ((i = 0; i < $(nproc); i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n' "$i"
  done > "$cpuinfo"
  as_root=(); [ "$(id -u)" = 0 ] || as_root=(--map-root-user)
  ADAPTD_GUEST_CPUINFO=$cpuinfo unshare --mount "${as_root[@]}" "$0" "$@"
  exit $?
fi
mount --bind "$ADAPTD_GUEST_CPUINFO" /proc/cpuinfo
guest_cpus=$(mktemp -d)
trap 'rm -rf "$guest_cpus"' EXIT
(
  cd /sys/devices/system/cpu
  find . -maxdepth 4 -type d | while read -r d; do mkdir -p "$guest_cpus/$d"; done
  find . -maxdepth 4 -type f -readable | while read -r f; do timeout 1 cat "$f" >"$guest_cpus/$f" 2>/dev/null || rm -f "$guest_cpus/$f"; done
)
for core in "$guest_cpus"/cpu[0-9]*; do
  mkdir -p "$core/regs/identification"
  echo 0x00000000410fd421 >"$core/regs/identification/midr_el1"  # Arm, Cortex-A78AE r1p1
  echo 0x0000000000000000 >"$core/regs/identification/revidr_el1"
done
mount --bind "$guest_cpus" /sys/devices/system/cpu
# The aarch64 C and C++ runtimes come with Debian's cross compilers (libc6-arm64-cross).
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
# The packaged binary looks for libtorch in /usr/lib/adaptd and JetPack's places; here it is
# the unpacked wheel, found the way a user's override would be.
export LD_LIBRARY_PATH=$site/torch/lib
ORT_DYLIB_PATH=$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* | head -n 1)
export ORT_DYLIB_PATH
export ADAPTD_LOG=${ADAPTD_LOG:-warn}
run() { echo "\$ adaptd $*"; qemu-aarch64-static "$binary" "$@"; }

echo "binary: $(file -b "$binary" | cut -d, -f1-2)"
echo "host:   $(uname -m), emulating aarch64 with $(qemu-aarch64-static --version | head -n 1)"
t0=$SECONDS
run --version
run validate --config config/adaptd.toml
# The training probes run 3 steps here, not the 10 they run natively: the same code path, and
# under emulation each MiniLM step takes about 16 s and each camera step about 30 s.
echo "(under emulation each training probe runs 3 steps, not 10: the same code, fewer steps)"
run check --build-dir build --train-steps 3
run doctor --bundle build/bundles/digits-cnn --seconds 20
echo "emulated check passed in $((SECONDS - t0)) s"
