#!/usr/bin/env bash
# Cross-build adaptd for arm64 (Jetson) on an amd64 machine, and package it:
#   deploy/jetson/cross-build.sh            (make deb-arm64)
# Needs, and installs where missing: Rust's aarch64 standard library (rustup) and Debian's
# aarch64 cross compilers (g++-aarch64-linux-gnu). libtorch's headers and libraries come from
# PyPI's aarch64 torch wheel of the pinned version, unpacked with the CUDA runtime libraries
# libtorch_cpu needs at load time into target/aarch64-prefix/site-packages (a site-packages
# layout, so the wheel's own $ORIGIN run paths hold); the emulated check runs against the same
# tree. ONNX Runtime is loaded at run time as on amd64 (the aarch64 wheel's library is unpacked
# too, for the emulated check). The result: target/deb/adaptd_<version>_arm64.deb.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
say() { echo "cross-build: $*" >&2; }
triple=aarch64-unknown-linux-gnu
prefix=$root/target/aarch64-prefix
site=$prefix/site-packages
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3

# 1. Tools --------------------------------------------------------------------------------------
if ! rustup target list --installed | grep -qx "$triple"; then
  say "adding Rust's $triple standard library"
  rustup target add "$triple"
fi
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v patchelf >/dev/null; then
  say "installing Debian's aarch64 cross compilers and patchelf"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get install -y -q g++-aarch64-linux-gnu patchelf >/dev/null
fi

# 2. The aarch64 runtimes from PyPI, pinned as deploy/requirements.txt pins them -----------------
pin() { sed -n "s/^$1==\([^ ]*\).*/\1/p" deploy/requirements.txt; }
torch_version=$(pin torch)
ort_version=$(pin onnxruntime)
# libtorch_cpu in PyPI's aarch64 torch wheel (a CUDA build) needs these two at load time; the
# versions are the ones that wheel's metadata asks for.
cuda_runtime="nvidia-cuda-runtime==13.0.96"
cuda_cupti="nvidia-cuda-cupti==13.0.85"
stamp="torch $torch_version ort $ort_version $cuda_runtime $cuda_cupti"
if [ "$(cat "$prefix/.stamp" 2>/dev/null)" != "$stamp" ]; then
  say "downloading the aarch64 wheels (torch $torch_version, onnxruntime $ort_version, CUDA runtime)"
  rm -rf "$prefix"
  mkdir -p "$prefix/wheels" "$site"
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_25_aarch64 --platform manylinux_2_17_aarch64 \
    -d "$prefix/wheels" "torch==$torch_version" "onnxruntime==$ort_version" "$cuda_runtime" "$cuda_cupti"
  # Only what linking and running need: libtorch's headers and CPU libraries (not libtorch_cuda,
  # 400 MB that needs cuDNN and cuBLAS; on a Jetson adaptd loads JetPack's own at run time), the
  # two CUDA runtime libraries, and ONNX Runtime's shared library.
  "$python" - "$prefix/wheels" "$site" <<'PY'
import pathlib, sys, zipfile
wheels, site = map(pathlib.Path, sys.argv[1:])
skip = ("libtorch_cuda", "libc10_cuda", "libcaffe2_nvrtc", "libtorch_nvshmem", "libtorch_python")
def wanted(name):
    if name.startswith(("torch/include/", "torch/share/")) or name == "torch/version.py":
        return True
    if name.startswith("torch/lib/"):
        return not pathlib.PurePosixPath(name).name.startswith(skip)
    return name.startswith(("nvidia/cu13/lib/", "onnxruntime/capi/libonnxruntime"))
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if wanted(name) and not name.endswith("/"):
                z.extract(name, site)
PY
  echo "$stamp" > "$prefix/.stamp"
fi

# 3. Build ---------------------------------------------------------------------------------------
# Where the installed binary finds libtorch, in this order (the dynamic linker's RUNPATH; the
# systemd unit's LD_LIBRARY_PATH=/usr/lib/adaptd comes first): /usr/lib/adaptd, then NVIDIA's
# PyTorch wheel installed for the system Python of JetPack 7 (3.12), 6 (3.10) and 5 (3.8).
runpath=/usr/lib/adaptd
for py in 3.12 3.10 3.8; do runpath="$runpath:/usr/local/lib/python$py/dist-packages/torch/lib"; done
runpath="$runpath:/usr/lib/python3/dist-packages/torch/lib"
say "building adaptd for $triple"
env LIBTORCH="$site/torch" LIBTORCH_CXX11_ABI=1 \
  ORT_DYLIB_PATH=/usr/lib/adaptd/libonnxruntime.so \
  CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++ \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C link-arg=-Wl,-rpath,$runpath -C link-arg=-Wl,-rpath-link,$site/torch/lib:$site/nvidia/cu13/lib" \
  cargo build --release --locked --target "$triple" -p adaptd
binary=$root/target/$triple/release/adaptd
# libtorch.so is an empty shim whose one job is to pull in libtorch_cuda.so; the aarch64 link
# keeps it only because it re-exports a few libstdc++ templates (which libstdc++ provides at run
# time). Dropped, as the amd64 link drops it: adaptd loads the CUDA backend itself where a GPU
# exists, so one binary runs with and without CUDA libraries.
if readelf -d "$binary" | grep -q 'NEEDED.*\[libtorch\.so\]'; then
  patchelf --remove-needed libtorch.so "$binary"
fi

# 4. Package -------------------------------------------------------------------------------------
deploy/deb/build.sh "$binary" "$root/target/deb"
