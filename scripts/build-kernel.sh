#!/usr/bin/env bash
# Build an Airlock kernel from Debian's pinned kernel source and cache it.
#
#   scripts/build-kernel.sh [guest|l1|bench-virtiofs|bench-net]
#
#   guest (default)  the sandbox kernel:  kernel-config/guest.config      -> build/vmlinux
#   l1               the test bed's L1:   guest.config + l1.config        -> build/l1-vmlinux
#   bench-virtiofs   scripts/bench-mounts' peer only: guest.config +
#                    bench-virtiofs.config (virtio-fs)  -> build/vmlinux-virtiofs
#   bench-net        scripts/bench-egress' peer only: guest.config +
#                    bench-net.config (virtio-net)      -> build/vmlinux-net
#
# The result is cached under $AIRLOCK_CACHE/kernel (default ~/.cache/airlock)
# keyed by a hash of the pinned source version, the fragments and the patches,
# so a second run, even from a fresh clone on the same machine, only copies.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

variant=${1:-guest}
cfg=$AIRLOCK_ROOT/kernel-config
case "$variant" in
    guest) fragments=("$cfg/guest.config"); out=$AIRLOCK_BUILD/vmlinux ;;
    l1) fragments=("$cfg/guest.config" "$cfg/l1.config"); out=$AIRLOCK_BUILD/l1-vmlinux ;;
    bench-virtiofs) fragments=("$cfg/guest.config" "$cfg/bench-virtiofs.config"); out=$AIRLOCK_BUILD/vmlinux-virtiofs ;;
    bench-net) fragments=("$cfg/guest.config" "$cfg/bench-net.config"); out=$AIRLOCK_BUILD/vmlinux-net ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown kernel variant '$variant' (expected guest, l1, bench-virtiofs or bench-net)" ;;
esac

# shellcheck source=../kernel-config/SOURCE
. "$cfg/SOURCE"
# Bump when the recipe below changes in a way that changes the output.
recipe=1
shopt -s nullglob
patches=("$cfg"/patches/*.patch)
shopt -u nullglob
cache_key() {
    key=$( { echo "recipe=$recipe package=$package version=$version"; hash_files "${fragments[@]}" ${patches[@]+"${patches[@]}"}; } | sha256sum | cut -c1-16)
    cached=$AIRLOCK_CACHE/kernel/$variant-$key
}
use_cache() {
    [ -f "$cached/vmlinux" ] || return 1
    cp --reflink=auto "$cached/vmlinux" "$out.tmp" && mv "$out.tmp" "$out"
    log "$variant kernel from cache ($key, $package $version): $out"
}
cache_key
mkdir -p "$AIRLOCK_BUILD"
use_cache && exit 0

# Debian's security archive keeps only the newest linux-source: once the pinned
# version is gone, build the one it serves (loudly) rather than fail on every
# fresh machine; kernel-config/SOURCE should then be updated.
# (grep reads all of madison's output: with -q it would stop at the first
# match and madison, still writing, would die of SIGPIPE, which pipefail
# turns into "not in the archive".)
archive_has() { apt-cache madison "$package" 2>/dev/null | grep -F "| $version |" >/dev/null; }
if [ "$(dpkg-query -W -f='${Version}' "$package" 2>/dev/null || true)" != "$version" ] && ! archive_has; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || true
    if ! archive_has; then
        candidate=$(apt-cache policy "$package" 2>/dev/null | awk '/Candidate:/ {print $2}')
        case "$candidate" in ''|'(none)') die "$package is not in the apt archive (pinned $version)" ;; esac
        log "warning: $package $version (pinned in kernel-config/SOURCE) is no longer in the archive; building $candidate instead: update kernel-config/SOURCE"
        version=$candidate
        cache_key
        use_cache && exit 0
    fi
fi

apt_ensure "$package=$version" bc bison flex libelf-dev libssl-dev cpio make xz-utils lz4 rsync kmod
[ -f "$tarball" ] || die "$tarball missing after installing $package=$version"

# Pristine source, patched, shared by every variant with the same source key.
src_key=$( { echo "$package=$version"; [ ${#patches[@]} -eq 0 ] || hash_files "${patches[@]}"; } | sha256sum | cut -c1-16)
src=$AIRLOCK_CACHE/kernel/src-$src_key
mkdir -p "$AIRLOCK_CACHE/kernel"
exec 9>"$AIRLOCK_CACHE/kernel/.lock"
flock 9
# Another build of the same kernel may have finished while we waited.
use_cache && exit 0
if [ ! -f "$src/.airlock-ready" ]; then
    log "unpacking $tarball"
    rm -rf "$src" "$src.tmp"
    mkdir -p "$src.tmp"
    tar -xJf "$tarball" -C "$src.tmp" --strip-components=1
    for p in ${patches[@]+"${patches[@]}"}; do
        log "applying $(basename "$p")"
        patch -d "$src.tmp" -p1 --quiet < "$p"
    done
    touch "$src.tmp/.airlock-ready"
    mv "$src.tmp" "$src"
fi

obj=$AIRLOCK_CACHE/kernel/obj-$variant-$key
mkdir -p "$obj"
mk() { make -C "$src" O="$obj" ARCH=x86_64 -s "$@"; }
mk tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "${fragments[@]}" >/dev/null
mk olddefconfig >/dev/null

# olddefconfig silently drops options whose dependencies are unmet: every
# line we asked for must be in the final .config, or we stop here.
bad=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qxF "$line" "$obj/.config" || { echo "  requested $line, got: $(grep -E "^(# )?${line%%=*}[= ]" "$obj/.config" || echo 'absent')" >&2; bad=1; } ;;
        "# CONFIG_"*" is not set")
            sym=${line#"# "}; sym=${sym%% *}
            ! grep -q "^$sym=" "$obj/.config" || { echo "  requested $sym off, got: $(grep "^$sym=" "$obj/.config")" >&2; bad=1; } ;;
    esac
done < <(cat "${fragments[@]}")
[ "$bad" -eq 0 ] || die "kernel config: options above did not survive olddefconfig (unmet dependencies?)"

log "building $variant vmlinux ($key) with $(nproc) jobs; a clean build takes ~10 minutes"
mk -j"$(nproc)" vmlinux
rm -rf "$cached.tmp"; mkdir -p "$cached.tmp"
cp "$obj/vmlinux" "$obj/.config" "$cached.tmp/"
mv "$cached.tmp" "$cached"
rm -rf "$obj"
cp --reflink=auto "$cached/vmlinux" "$out.tmp" && mv "$out.tmp" "$out"
log "$variant kernel built: $out"
