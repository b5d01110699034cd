#!/usr/bin/env bash
# Build the guest root image from Debian packages and cache it.
#
#   scripts/build-image.sh [--no-cache] [--help]
#
# build/rootfs.img       one read-only erofs image (lz4hc): Debian bookworm
#                        minbase, merged-/usr, no docs/man/locales, with podman,
#                        crun, catatonit, podman-docker (`docker`), bash, git,
#                        python3, e2fsprogs, ...; airlock-init as /sbin/airlock-init
#                        and /sbin/init; scripts/image/*.conf in /etc/containers;
#                        the agent container's seccomp profile (no AF_VSOCK) in
#                        /etc/airlock/seccomp.json;
#                        the reference agent scripts/image/airlock-agent as
#                        /usr/local/bin/airlock-agent.
# build/rootfs.manifest  the Debian packages in it, `name<TAB>version`, sorted.
#
# Needs root (mmdebstrap, chown) and Debian's mirrors; needs
# target/x86_64-unknown-linux-gnu/release/airlock-init (run scripts/build.sh).
# The result is cached under $AIRLOCK_CACHE/image keyed by a hash of this
# script, scripts/image/* and the init binary, so a second run, even from a
# fresh clone on the same machine, only copies. The key does not see new
# package versions in the archive: --no-cache rebuilds from the archive as it
# is now (and refreshes the cache); the manifest says what went in.
# Reproducible: two builds from the same archive state give the same bytes
# (SOURCE_DATE_EPOCH fixed below and no mtime later than it, fixed UUID).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

use_cache=1
case "${1:-}" in
    '') ;;
    --no-cache) use_cache=0 ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac
[ $# -le 1 ] || die "too many arguments (see --help)"

# The image's clock: no mtime in it is later (mkfs.erofs -T clamps), and
# shadow's password dates use it. Fixed, so that the image does not depend on
# when it is built: 2025-01-01T00:00:00Z.
export SOURCE_DATE_EPOCH=1735689600
# The filesystem UUID: fixed for the same reason.
fs_uuid=a1710c4e-0000-4000-8000-000000000001
suite=bookworm
mirrors=(
    "deb http://deb.debian.org/debian $suite main"
    "deb http://deb.debian.org/debian $suite-updates main"
    "deb http://deb.debian.org/debian-security $suite-security main"
)
# What the guest needs. Dependencies come from apt, without recommends.
# netavark: Debian's containers-common needs some container-network-stack;
# named so that apt does not pick the 45 MB containernetworking-plugins.
# gpg: libgpgme11 needs "gnupg | gpg"; naming gpg saves the rest of gnupg
# (agent, dirmngr, l10n: ~13 MB).
# No nodejs: Debian's (libnode + libicu) adds ~85 MB.
# curl and python3-pip: real clients for the egress proxy (HTTP_PROXY);
# Debian's pip refuses the system site (PEP 668): `pip install --target`.
packages=(
    podman crun catatonit conmon podman-docker netavark
    bash coreutils util-linux procps e2fsprogs
    git python3 ca-certificates iproute2 gpg
    curl python3-pip
)
# Left out of every package as dpkg unpacks it (copyright files are kept).
excludes=(
    '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*'
    '/usr/share/lintian/*' '/usr/share/linda/*' '/usr/share/bug/*'
)

release=$AIRLOCK_ROOT/target/x86_64-unknown-linux-gnu/release
init_bin=$release/airlock-init
out=$AIRLOCK_BUILD/rootfs.img
manifest_out=$AIRLOCK_BUILD/rootfs.manifest
image_dir=$AIRLOCK_ROOT/scripts/image
[ -f "$init_bin" ] || die "$init_bin is missing: run scripts/build.sh first"
command -v readelf >/dev/null || die "readelf (binutils) is needed to check the init is static"
command -v python3 >/dev/null || die "python3 is needed to derive the agent's seccomp profile"
if readelf -lW "$init_bin" | grep -q INTERP || readelf -dW "$init_bin" | grep -q '(NEEDED)'; then
    die "$init_bin is dynamically linked; it must be static (build it with scripts/build.sh)"
fi

mkdir -p "$AIRLOCK_BUILD" "$AIRLOCK_CACHE/image"
stage=$(mktemp -d "$AIRLOCK_BUILD/.image.XXXXXX")
chmod 755 "$stage"  # apt in the chroot downloads as the _apt user
# --one-file-system: never follow a mount mmdebstrap may have left behind
# (proc, sys, dev) if it was killed.
trap 'rm -rf --one-file-system "$stage"' EXIT
# The init goes in stripped (the release profile keeps line tables), without
# its build-id, which hashes the debug info and so the checkout's path: the
# key uses these bytes, the same from any clone of the same source.
strip --strip-all --remove-section=.note.gnu.build-id -o "$stage/airlock-init" "$init_bin" \
    || die "strip failed"

# Bump when a change outside the hashed files changes the output.
recipe=1
key=$( { echo "recipe=$recipe"; hash_files "$AIRLOCK_ROOT/scripts/build-image.sh" "$image_dir"/*
         sha256sum < "$stage/airlock-init"; } | sha256sum | cut -c1-16)
cached=$AIRLOCK_CACHE/image/$key

install_cached() {
    cp --reflink=auto "$cached/rootfs.img" "$out.tmp" && mv "$out.tmp" "$out"
    cp "$cached/rootfs.manifest" "$manifest_out.tmp" && mv "$manifest_out.tmp" "$manifest_out"
}

if [ "$use_cache" -eq 1 ] && [ -f "$cached/rootfs.img" ]; then
    install_cached
    log "image from cache ($key): $out ($(du -m "$out" | cut -f1) MB)"
    sha256sum "$out"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building the image needs root (mmdebstrap, file owners): run as root"
apt_ensure mmdebstrap erofs-utils

exec 9>"$AIRLOCK_CACHE/image/.lock"
flock 9
# Another run may have built it while we waited for the lock.
if [ "$use_cache" -eq 1 ] && [ -f "$cached/rootfs.img" ]; then
    install_cached
    log "image from cache ($key): $out"
    sha256sum "$out"
    exit 0
fi
start=$(date +%s)
root=$stage/root

dpkgopts=()
for p in "${excludes[@]}"; do dpkgopts+=(--dpkgopt="path-exclude=$p"); done
dpkgopts+=(--dpkgopt='path-include=/usr/share/doc/*/copyright')

log "mmdebstrap $suite minbase: ${packages[*]} (about a minute)"
mmdebstrap --mode=root --variant=minbase --format=directory \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='APT::Install-Recommends "false"' \
    --aptopt='Acquire::Languages "none"' \
    "${dpkgopts[@]}" \
    --include="$(IFS=,; echo "${packages[*]}")" \
    "$suite" "$root" "${mirrors[@]}" > "$stage/mmdebstrap.log" 2>&1 \
    || { cp "$stage/mmdebstrap.log" "$AIRLOCK_BUILD/mmdebstrap.log"
         grep -E '^(E|W): |rror' "$stage/mmdebstrap.log" | tail -n 20 >&2
         die "mmdebstrap failed (full log: build/mmdebstrap.log)"; }

# The package list, from the image's dpkg database.
dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${binary:Package}\t${Version}\n' \
    | LC_ALL=C sort > "$stage/rootfs.manifest"

# Our init as /sbin/airlock-init and /sbin/init. merged-/usr: /sbin is a
# symlink to usr/sbin. minbase has no init package.
install -m 755 "$stage/airlock-init" "$root/usr/sbin/airlock-init"
ln -sfn airlock-init "$root/usr/sbin/init"

# The reference agent (Python 3 standard library only): a tool-use loop over
# the Anthropic Messages API, pointed at the in-guest model endpoint by the
# init's ANTHROPIC_BASE_URL. Its mtime is clamped by mkfs.erofs -T below.
install -m 755 "$image_dir/airlock-agent" "$root/usr/local/bin/airlock-agent"

# The container engine's configuration (commented in the files themselves).
install -m 644 "$image_dir/containers.conf" "$image_dir/storage.conf" "$root/etc/containers/"
# The agent container's seccomp profile: podman's default from the image's
# containers-common, except that socket() never opens AF_VSOCK (only the init
# speaks to the host). Derived and checked by scripts/image/agent-seccomp.py;
# guest-init passes it to `podman run`, containers.conf makes it the default.
mkdir -p "$root/etc/airlock"
python3 "$image_dir/agent-seccomp.py" "$root/usr/share/containers/seccomp.json" \
    "$root/etc/airlock/seccomp.json" || die "deriving the agent's seccomp profile failed"
chmod 644 "$root/etc/airlock/seccomp.json"
# podman-docker's `docker` otherwise prints "Emulate Docker CLI using podman..."
# to stderr on every call.
: > "$root/etc/containers/nodocker"

# Host leftovers and state that differs between builds or hosts: mmdebstrap
# copies the host's resolv.conf and hostname in; logs, apt lists and caches,
# dpkg/debconf backups are of no use in a read-only image.
rm -f "$root/etc/resolv.conf"
: > "$root/etc/hostname"
: > "$root/etc/machine-id"
rm -rf "$root"/var/log/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
    "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old "$root"/run/* "$root"/tmp/*
mkdir -p "$root/var/lib/apt/lists/partial" "$root/var/cache/apt/archives/partial"

# Mount points for the init and the container engine: the read-only image
# cannot grow them at run time. Writable mounts podman needs: /run, /tmp,
# /var/tmp (podman import/load stage files there), /var/lib/containers
# (storage.conf), /var/cache/containers (containers/image's short-name alias
# cache), /dev/shm (podman's locks).
mkdir -p "$root"/{proc,sys,dev,run,tmp,workspace,var/lib/containers,var/cache/containers}
chmod 1777 "$root/tmp"
# podman (`--rootfs /`) wants /etc/mtab and cannot create it on a read-only /.
ln -sfn ../proc/self/mounts "$root/etc/mtab"
# Nor /etc/hosts, which crun bind-mounts over (minbase has no netbase).
# The host's names for --host-port forwards are loopback: the init listens
# there for the agent (podman's --add-host says the same in a container).
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n127.0.0.1\thost.docker.internal host.airlock.internal\n' > "$root/etc/hosts"

for tool in podman crun conmon catatonit docker; do
    [ -x "$root/usr/bin/$tool" ] || die "/usr/bin/$tool is missing from the image"
done

log "packing $(du -sm "$root" | cut -f1) MB into erofs (lz4hc)"
# -T: clamps every mtime to SOURCE_DATE_EPOCH (files from packages keep
# their own, fixed, mtimes); -U: the UUID; lz4hc: the guest kernel decompresses
# lz4 (CONFIG_EROFS_FS_ZIP), nothing else.
mkfs.erofs -zlz4hc -T"$SOURCE_DATE_EPOCH" -U"$fs_uuid" --quiet \
    "$stage/rootfs.img" "$root" > "$stage/mkfs.log" 2>&1 \
    || { cat "$stage/mkfs.log" >&2; die "mkfs.erofs failed"; }

rm -rf "$cached.tmp"; mkdir -p "$cached.tmp"
mv "$stage/rootfs.img" "$stage/rootfs.manifest" "$cached.tmp/"
rm -rf "$cached"; mv "$cached.tmp" "$cached"
install_cached
log "image built in $(( $(date +%s) - start )) s ($key): $out ($(du -m "$out" | cut -f1) MB," \
    "$(wc -l < "$manifest_out") packages in $manifest_out)"
sha256sum "$out"
