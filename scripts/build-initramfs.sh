#!/usr/bin/env bash
# Build the guest init statically and pack it into an initramfs.
#
#   scripts/build-initramfs.sh [--help]
#
# Output: build/initramfs.cpio (newc, uncompressed) holding /init (airlock-init),
# the directories dev, proc, run, sys, tmp and the char device dev/console (5:1),
# which the kernel needs to give init the console as stdin/stdout/stderr.
# No root needed. Reproducible: every mtime is $SOURCE_DATE_EPOCH (default 0),
# owners are 0:0 and entries sorted, so two builds give the same sha256.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

case "${1:-}" in
    '') ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac

target=x86_64-unknown-linux-gnu
bin=$AIRLOCK_ROOT/target/$target/release/airlock-init
out=$AIRLOCK_BUILD/initramfs.cpio
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
epoch=$SOURCE_DATE_EPOCH
case "$epoch" in ''|*[!0-9]*) die "SOURCE_DATE_EPOCH must be a number of seconds, not '$epoch'" ;; esac

command -v python3 >/dev/null || die "python3 is needed to write the cpio archive"
command -v readelf >/dev/null || die "readelf (binutils) is needed to check the init is static"

# --target keeps crt-static away from build scripts and proc macros.
log "building airlock-init (static, release)"
(cd "$AIRLOCK_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -p airlock-init --target "$target") \
    || die "cargo build of airlock-init failed"
[ -f "$bin" ] || die "cargo did not produce $bin"

# A dynamic init cannot start: the initramfs has no loader and no libc.
if readelf -lW "$bin" | grep -q 'INTERP'; then
    die "$bin has a PT_INTERP (dynamically linked); the init must be static"
fi
if readelf -dW "$bin" | grep -q '(NEEDED)'; then
    die "$bin needs shared libraries: $(readelf -dW "$bin" | grep '(NEEDED)' | tr -s ' ' | tr '\n' ' ')"
fi

mkdir -p "$AIRLOCK_BUILD"
stage=$(mktemp -d "$AIRLOCK_BUILD/.initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
# Strip a copy: the release profile keeps line tables, useless in the guest.
strip --strip-all -o "$stage/init" "$bin" || die "strip failed"

"$AIRLOCK_ROOT/scripts/mkcpio.py" "$stage/initramfs.cpio" <<EOF || die "writing the cpio archive failed"
dir dev 755
nod dev/console 600 c 5 1
file init 755 $stage/init
dir proc 755
dir run 755
dir sys 755
dir tmp 1777
EOF

mv -f "$stage/initramfs.cpio" "$out"
log "wrote $out"
sha256sum "$out"
