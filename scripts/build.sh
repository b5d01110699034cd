#!/usr/bin/env bash
# Build everything a sandbox needs, skipping what is already up to date:
#
#   scripts/build.sh [--no-l1]
#
#   - Debian packages the host side needs (qemu-system-x86, busybox-static, ...)
#   - vhost-device-vsock, the tcg engine's vsock device
#                                 -> $AIRLOCK_CACHE/tools/bin/  (cached, ~3-5 min cold)
#   - the guest kernel            -> build/vmlinux          (cached, ~5-10 min cold)
#   - the test bed's L1 kernel    -> build/l1-vmlinux       (cached; skipped with --no-l1)
#   - airlock, airlock-vmm, airlock-init, airlock-upstream (the scripted model
#     API for tests and the offline demo), static (glibc, crt-static), release
#                                 -> target/x86_64-unknown-linux-gnu/release/
#   - the initramfs with airlock-init as /init -> build/initramfs.cpio
set -euo pipefail
. "$(dirname "$0")/lib.sh"

l1=1
case "${1:-}" in
    '') ;;
    --no-l1) l1=0 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac

apt_ensure qemu-system-x86 busybox-static python3 binutils
# The tcg engine serves the guest's vsock with vhost-device-vsock (docs/FACTS.md:
# 0.3.0 builds and works here); `airlock` finds it in $AIRLOCK_CACHE/tools/bin.
vhost_vsock=$AIRLOCK_CACHE/tools/bin/vhost-device-vsock
if [ ! -x "$vhost_vsock" ]; then
    log "installing vhost-device-vsock 0.3.0 into $AIRLOCK_CACHE/tools (a few minutes, once)"
    cargo install --locked --quiet --root "$AIRLOCK_CACHE/tools" vhost-device-vsock --version 0.3.0 \
        || die "cargo install vhost-device-vsock failed"
fi
"$AIRLOCK_ROOT/scripts/build-kernel.sh" guest
[ "$l1" -eq 0 ] || "$AIRLOCK_ROOT/scripts/build-kernel.sh" l1
log "building airlock, airlock-vmm, airlock-upstream (static, release)"
(cd "$AIRLOCK_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --target x86_64-unknown-linux-gnu -p airlock -p airlock-vmm -p airlock-upstream) \
    || die "cargo build failed"
"$AIRLOCK_ROOT/scripts/build-initramfs.sh" >/dev/null
log "ready: $(cd "$AIRLOCK_ROOT" && ls build/ | tr '\n' ' ')"
# The guest root image (Debian packages, podman + crun; needs root and Debian's
# mirrors; cached): AIRLOCK_IMAGE=1 scripts/build.sh, or scripts/build-image.sh.
if [ "${AIRLOCK_IMAGE:-0}" = 1 ]; then "$AIRLOCK_ROOT/scripts/build-image.sh"; fi
