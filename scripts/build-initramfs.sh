#!/usr/bin/env bash
# Build the guest init statically and pack it into the initramfs files.
#
#   scripts/build-initramfs.sh [--no-test] [--help]
#
# build/initramfs.cpio (newc, uncompressed): /init (airlock-init, also reached
# as /sbin/init), Debian's static busybox as /bin/busybox with one symlink per
# applet where `busybox --list-full` puts it (bin, sbin, usr/bin, usr/sbin; not
# its init or linuxrc), the directories dev, proc, root, run, sys, tmp and the
# char device dev/console (5:1), which the kernel needs to give init the
# console as stdin/stdout/stderr.
# build/initramfs-test.cpio: the same plus /bin/airlock-hostile (the hostile
# guest of the end-to-end tests); --no-test skips it. The normal one never
# carries test tools.
# No root needed. Reproducible: every mtime is $SOURCE_DATE_EPOCH (default 0),
# owners are 0:0 and entries sorted, so two builds of the same inputs give the
# same sha256 (printed at the end).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

with_test=1
case "${1:-}" in
    '') ;;
    --no-test) with_test=0 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac

target=x86_64-unknown-linux-gnu
release=$AIRLOCK_ROOT/target/$target/release
init_bin=$release/airlock-init
hostile_bin=$release/airlock-hostile
busybox=/bin/busybox
out=$AIRLOCK_BUILD/initramfs.cpio
out_test=$AIRLOCK_BUILD/initramfs-test.cpio
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
epoch=$SOURCE_DATE_EPOCH
case "$epoch" in ''|*[!0-9]*) die "SOURCE_DATE_EPOCH must be a number of seconds, not '$epoch'" ;; esac

command -v python3 >/dev/null || die "python3 is needed to write the cpio archive"
command -v readelf >/dev/null || die "readelf (binutils) is needed to check the init is static"
apt_ensure busybox-static
[ -x "$busybox" ] || die "$busybox is missing although busybox-static is installed"

# A dynamic binary cannot start: the initramfs has no loader and no libc.
check_static() {
    if readelf -lW "$1" | grep -q 'INTERP'; then
        die "$1 has a PT_INTERP (dynamically linked); it must be static"
    fi
    if readelf -dW "$1" | grep -q '(NEEDED)'; then
        die "$1 needs shared libraries: $(readelf -dW "$1" | grep '(NEEDED)' | tr -s ' ' | tr '\n' ' ')"
    fi
}

# --target keeps crt-static away from build scripts and proc macros.
log "building airlock-init (static, release)"
(cd "$AIRLOCK_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -p airlock-init --target "$target") \
    || die "cargo build of airlock-init failed"
[ -f "$init_bin" ] || die "cargo did not produce $init_bin"
check_static "$init_bin"
check_static "$busybox"
if [ "$with_test" -eq 1 ]; then
    log "building airlock-hostile (static, release)"
    (cd "$AIRLOCK_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -p airlock-e2e --bin airlock-hostile --target "$target") \
        || die "cargo build of airlock-hostile failed"
    [ -f "$hostile_bin" ] || die "cargo did not produce $hostile_bin"
    check_static "$hostile_bin"
fi

mkdir -p "$AIRLOCK_BUILD"
stage=$(mktemp -d "$AIRLOCK_BUILD/.initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
# Strip copies: the release profile keeps line tables, useless in the guest.
strip --strip-all -o "$stage/init" "$init_bin" || die "strip failed"
cp "$busybox" "$stage/busybox"

# The applets, where busybox itself says they belong. Its init and linuxrc
# are left out: /init (and /sbin/init) is airlock-init, whatever the kernel
# picks. bin/busybox is the binary itself.
applets=$("$busybox" --list-full) || die "'$busybox --list-full' failed"
{
    echo "dir bin 755"
    echo "dir dev 755"
    echo "nod dev/console 600 c 5 1"
    echo "file init 755 $stage/init"
    echo "dir proc 755"
    echo "dir root 700"
    echo "dir run 755"
    echo "dir sbin 755"
    echo "slink sbin/init /init"
    echo "dir sys 755"
    echo "dir tmp 1777"
    echo "dir usr 755"
    echo "dir usr/bin 755"
    echo "dir usr/sbin 755"
    echo "file bin/busybox 755 $stage/busybox"
    for path in $applets; do
        case "$path" in
            bin/busybox|sbin/init|linuxrc) continue ;;
            bin/*|sbin/*|usr/bin/*|usr/sbin/*) ;;
            *) die "busybox lists an applet outside bin, sbin, usr/bin, usr/sbin: '$path'" ;;
        esac
        echo "slink $path /bin/busybox"
    done
} > "$stage/base.spec"

"$AIRLOCK_ROOT/scripts/mkcpio.py" "$stage/initramfs.cpio" < "$stage/base.spec" \
    || die "writing the cpio archive failed"
mv -f "$stage/initramfs.cpio" "$out"
log "wrote $out ($(echo "$applets" | wc -w) busybox applets, busybox-static $(dpkg-query -W -f='${Version}' busybox-static))"
written=("$out")

if [ "$with_test" -eq 1 ]; then
    strip --strip-all -o "$stage/airlock-hostile" "$hostile_bin" || die "strip failed"
    { cat "$stage/base.spec"; echo "file bin/airlock-hostile 755 $stage/airlock-hostile"; } \
        | "$AIRLOCK_ROOT/scripts/mkcpio.py" "$stage/initramfs-test.cpio" \
        || die "writing the test cpio archive failed"
    mv -f "$stage/initramfs-test.cpio" "$out_test"
    log "wrote $out_test (with /bin/airlock-hostile)"
    written+=("$out_test")
fi
sha256sum "${written[@]}"
