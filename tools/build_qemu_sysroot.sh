#!/usr/bin/env bash
# Private arm64 Python sysroot + the aarch64 apache-tvm wheels, so that aarch64 CPU libraries built by
# blockffn-compile (target cpu-aarch64) can run under qemu-aarch64 on an x86 machine (tests/test_qemu_aarch64.py).
#
# usage: tools/build_qemu_sysroot.sh [DEST]        (DEST defaults to .cache/qemu-aarch64)
#   DEST/sysroot   Debian arm64 python3.11 and the shared libraries it and TVM load (dpkg -x; nothing is installed)
#   DEST/site      the aarch64 wheels unpacked (PYTHONPATH under qemu)
#   DEST/READY     written last; a DEST with READY is reused as is
# Run:  PYTHONPATH=DEST/site qemu-aarch64 -L DEST/sysroot DEST/sysroot/usr/bin/python3.11 script.py
#
# Needs, once, as root (what .ci/run does):  dpkg --add-architecture arm64 && apt-get update
#                                            apt-get install qemu-user
# Never install python3:arm64 system-wide: it would replace the amd64 python3.
# PYTHON: the interpreter whose pip downloads the wheels (default: .venv/bin/python, else python3.11).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.cache/qemu-aarch64}
PYTHON=${PYTHON:-$(command -v "$ROOT/.venv/bin/python" || command -v python3.11 || command -v python3)}
# the runtime must be the exact versions the compiler uses (artifacts record and check them)
TVM_PINS=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1)
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 zlib1g libexpat1
      libffi8 libbz2-1.0 liblzma5 libssl3 libcrypt1 libuuid1)

if [ -f "$DEST/READY" ]; then
  echo "qemu sysroot: $DEST (cached)"
  exit 0
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "error: arm64 packages are not available to apt; run as root: dpkg --add-architecture arm64 && apt-get update" >&2
  exit 2
fi
mkdir -p "$(dirname "$DEST")"
WORK=$(mktemp -d "$(dirname "$DEST")/.qemu-aarch64.tmp-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/sysroot" "$WORK/wheels" "$WORK/site"

(cd "$WORK/debs" && apt-get download -qq -o APT::Sandbox::User=root "${DEBS[@]/%/:arm64}")
for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$WORK/sysroot"; done

# manylinux_2_28: the TVM wheel needs glibc >= 2.28 (Debian 12 has 2.36)
"$PYTHON" -m pip download --quiet --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
  --implementation cp -d "$WORK/wheels" "${TVM_PINS[@]}"
for whl in "$WORK"/wheels/*.whl; do "$PYTHON" -m zipfile -e "$whl" "$WORK/site"; done
rm -rf "$WORK/debs" "$WORK/wheels"

"$PYTHON" - "$WORK" <<'EOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
versions = sorted(p.name.removesuffix(".dist-info") for p in (work / "site").glob("*.dist-info"))
(work / "READY").write_text(json.dumps({"wheels": versions}, indent=1) + "\n")
EOF
rm -rf "$DEST"
mv "$WORK" "$DEST"
trap - EXIT
echo "qemu sysroot: $DEST"
