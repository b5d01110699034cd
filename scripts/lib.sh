# Shared helpers for Airlock's shell scripts. Source it; do not run it.
# shellcheck shell=bash

AIRLOCK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AIRLOCK_CACHE=${AIRLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/airlock}
AIRLOCK_BUILD=$AIRLOCK_ROOT/build

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# as_root CMD...: run CMD as root (directly, or through sudo when available).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root to run: $* (run as root or install sudo)"; fi
}

# apt_ensure PKG[=VERSION]...: install the Debian packages that are missing.
apt_ensure() {
    local missing=() spec name want have
    for spec in "$@"; do
        name=${spec%%=*}
        want=${spec#"$name"}; want=${want#=}
        have=$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' "$name" 2>/dev/null || true)
        case "$have" in
            ii*) [ -z "$want" ] || [ "${have#ii }" = "$want" ] || [ "${have:3}" = "$want" ] || missing+=("$spec") ;;
            *) missing+=("$spec") ;;
        esac
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
             as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
}

# hash_files FILE...: one sha256 over the names and contents of FILEs.
hash_files() {
    local f
    for f in "$@"; do printf '%s\n' "${f#"$AIRLOCK_ROOT"/}"; sha256sum < "$f"; done | sha256sum | cut -c1-16
}
