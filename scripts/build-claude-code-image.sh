#!/usr/bin/env bash
# Build a guest root image with the Claude Code CLI in it, and cache it.
#
#   scripts/build-claude-code-image.sh [--version V --sha512 BASE64] [--help]
#
# build/rootfs-claude-code.img   build/rootfs.img (scripts/build-image.sh) with
#                                Claude Code's native Linux binary added as
#                                /usr/local/bin/claude; boot it with
#                                `airlock run --image-root build/rootfs-claude-code.img`
#                                (scripts/claude-code does).
# build/claude-code.version      the version in it and its npm integrity.
#
# The CLI comes from the npm registry, unmodified: the tarball of
# @anthropic-ai/claude-code-linux-x64 at the pinned version below (glibc
# build: the guest image is Debian), checked against the pinned sha512
# integrity before anything is unpacked. Nothing else is fetched: no npm or
# node is needed, only curl and the registry. Another version: --version V
# --sha512 B (the `dist.integrity` of `npm view @anthropic-ai/claude-code-linux-x64@V`,
# without its "sha512-" prefix); both or neither.
#
# The image is cached under $AIRLOCK_CACHE/image/claude-code-KEY, KEY a hash
# of this script, the version, its integrity and build/rootfs.img, so a second
# run, even from a fresh clone, only copies. Needs root (the root image's
# file owners) and build/rootfs.img (`AIRLOCK_IMAGE=1 scripts/build.sh`).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

version=2.1.332
sha512=f4JWhzwYutJIHScC7/dYOPX6s28tt7ZADhsOi8zwOHq5fFPEuUeChh2NMfinSg0GrUckYxaeebC4h0DqiKzLcw==
given=0
while [ $# -gt 0 ]; do
    case "$1" in
        --version) [ $# -ge 2 ] || die "--version needs a value"; version=$2; given=$((given + 1)); shift 2 ;;
        --sha512) [ $# -ge 2 ] || die "--sha512 needs a value"; sha512=${2#sha512-}; given=$((given + 2)); shift 2 ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case $given in
    0|3) ;;
    *) die "--version and --sha512 go together: a version is only fetched with the integrity you checked" ;;
esac
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--version '$version' is not a version like 2.1.332"
[[ $sha512 =~ ^[A-Za-z0-9+/]{86}==$ ]] || die "--sha512 is not a base64 sha512 (86 characters and ==)"

base=$AIRLOCK_BUILD/rootfs.img
out=$AIRLOCK_BUILD/rootfs-claude-code.img
stamp=$AIRLOCK_BUILD/claude-code.version
[ -f "$base" ] || die "$base is missing: build the guest image first (AIRLOCK_IMAGE=1 scripts/build.sh)"

# Bump when a change outside the hashed inputs changes the output.
recipe=1
key=$( { echo "recipe=$recipe version=$version sha512=$sha512"
         hash_files "$AIRLOCK_ROOT/scripts/build-claude-code-image.sh"
         sha256sum < "$base"; } | sha256sum | cut -c1-16)
cached=$AIRLOCK_CACHE/image/claude-code-$key
mkdir -p "$AIRLOCK_BUILD" "$AIRLOCK_CACHE/image"

install_cached() {
    cp --reflink=auto "$cached/rootfs.img" "$out.tmp" && mv "$out.tmp" "$out"
    printf 'claude-code %s sha512-%s\n' "$version" "$sha512" > "$stamp"
    log "Claude Code $version image ($key): $out ($(du -m "$out" | cut -f1) MB)"
}
if [ -f "$cached/rootfs.img" ]; then install_cached; exit 0; fi

[ "$(id -u)" -eq 0 ] || die "building the image needs root (the root image's file owners): run as root"
apt_ensure curl erofs-utils
exec 9>"$AIRLOCK_CACHE/image/.lock-claude-code"
flock 9
if [ -f "$cached/rootfs.img" ]; then install_cached; exit 0; fi

stage=$(mktemp -d "$AIRLOCK_BUILD/.claude-code.XXXXXX")
trap 'rm -rf "$stage"' EXIT
pkg=@anthropic-ai/claude-code-linux-x64
url=https://registry.npmjs.org/$pkg/-/claude-code-linux-x64-$version.tgz
log "fetching $pkg@$version from the npm registry"
curl -sSfL --retry 3 -o "$stage/cli.tgz" "$url" || die "could not fetch $url"
got=$(python3 -c 'import base64, hashlib, sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$stage/cli.tgz")
[ "$got" = "$sha512" ] || die "$url has sha512 $got, not the pinned $sha512: refusing it"
mkdir "$stage/pkg"
tar -xzf "$stage/cli.tgz" -C "$stage/pkg" package/claude package/package.json \
    || die "the tarball holds no package/claude"
grep -q "\"version\": \"$version\"" "$stage/pkg/package/package.json" \
    || die "the tarball's package.json does not say version $version"

log "unpacking $base"
fsck.erofs --extract="$stage/root" "$base" > "$stage/fsck.log" 2>&1 \
    || { cat "$stage/fsck.log" >&2; die "fsck.erofs --extract failed"; }
install -o root -g root -m 0755 "$stage/pkg/package/claude" "$stage/root/usr/local/bin/claude"
rm -rf "$stage/pkg" "$stage/cli.tgz"
# Never run on the host: it is checked by its hash, and runs only in the guest.
[ "$(head -c4 "$stage/root/usr/local/bin/claude" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] \
    || die "package/claude is not an ELF binary"

log "packing $(du -sm "$stage/root" | cut -f1) MB into erofs (lz4hc)"
# The same clock and compression as scripts/build-image.sh; its own fixed UUID.
mkfs.erofs -zlz4hc -T1735689600 -Ua1710c4e-0000-4000-8000-000000000002 --quiet \
    "$stage/rootfs.img" "$stage/root" > "$stage/mkfs.log" 2>&1 \
    || { cat "$stage/mkfs.log" >&2; die "mkfs.erofs failed"; }
rm -rf "$cached.tmp"; mkdir -p "$cached.tmp"
mv "$stage/rootfs.img" "$cached.tmp/"
rm -rf "$cached"; mv "$cached.tmp" "$cached"
install_cached
