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
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades --no-install-recommends "${missing[@]}" >/dev/null \
        || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
             as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
}

# hash_files FILE...: one sha256 over the names and contents of FILEs.
hash_files() {
    local f
    for f in "$@"; do printf '%s\n' "${f#"$AIRLOCK_ROOT"/}"; sha256sum < "$f"; done | sha256sum | cut -c1-16
}

# bundle_libs BIN DIR: copy BIN's shared libraries (as ldd resolves them) into
# DIR/lib and its dynamic loader to DIR/ld-linux-x86-64.so.2, so that BIN runs
# where no /lib exists (the test bed's L1). Sets nlibs to the number copied.
bundle_libs() {
    local bin=$1 dir=$2 ldd_out loader= name arrow path _
    # ldd lines: "libfoo.so.1 => /lib/.../libfoo.so.1 (0x...)",
    # "/lib64/ld-linux-x86-64.so.2 (0x...)", "linux-vdso.so.1 (0x...)" (no file:
    # provided by the kernel).
    ldd_out=$(ldd "$bin") || die "ldd $bin failed (is it a dynamic x86-64 binary?)"
    if grep -q 'not found' <<<"$ldd_out"; then
        die "ldd reports missing libraries for $bin: $(grep 'not found' <<<"$ldd_out" | tr '\n' ' ')"
    fi
    mkdir -p "$dir/lib"
    nlibs=0
    while read -r name arrow path _; do
        if [ "$arrow" = "=>" ]; then
            [ -f "$path" ] || die "library $name resolves to missing file '$path'"
            cp -L "$path" "$dir/lib/$name"
            nlibs=$((nlibs + 1))
        elif [ "${name#/}" != "$name" ] && [ -f "$name" ]; then
            loader=$name
        fi
    done <<<"$ldd_out"
    [ -n "$loader" ] || die "ldd did not list the dynamic loader of $bin"
    cp -L "$loader" "$dir/ld-linux-x86-64.so.2"
}

# l1_idle_helpers SCRUB: prints, for a benchmark's script run inside the test
# bed (busybox sh), settle() (wait until L1's CPU was >= 90 % idle over half
# a second, 15 s at most: a killed VM's memory and page tables are freed
# after it is gone, KVM zaps them from a work queue, which would land on the
# next run's time) and scrub() (with SCRUB=1: write 1 GiB of fresh memory,
# then settle, so that no measured VM is the first to write into the pages
# an earlier guest ran code from; docs/FACTS.md, "Timing in the test bed").
l1_idle_helpers() {
    cat <<EOF
settle() {
    n=0
    while [ \$n -lt 30 ]; do
        set -- \$(head -n 1 /proc/stat); i0=\$5; t0=\$((\$2 + \$3 + \$4 + \$5 + \$6 + \$7 + \$8))
        sleep 0.5
        set -- \$(head -n 1 /proc/stat); i1=\$5; t1=\$((\$2 + \$3 + \$4 + \$5 + \$6 + \$7 + \$8))
        [ \$(( (i1 - i0) * 100 )) -ge \$(( (t1 - t0) * 90 )) ] && return
        n=\$((n + 1))
    done
}
scrub() {
    [ $1 = 1 ] || return 0
    dd if=/dev/zero of=/dev/null bs=1024M count=1 2>/dev/null || echo "bench: the scrub failed" >&2
    settle
}
EOF
}

# l1_thp_setting MODE: prints, for a benchmark's script run inside the test
# bed, the line that sets L1's transparent huge pages to MODE (always, madvise
# or never; L1's kernel starts with `always`, as Debian's kernels do). With
# THP, L1's KVM maps a guest's RAM with 2 MiB nested entries, and the guest's
# first touches of its memory cost far fewer trips through emulated L1
# (docs/FACTS.md, "Transparent huge pages in L1").
l1_thp_setting() {
    echo "echo $1 > /sys/kernel/mm/transparent_hugepage/enabled || { echo 'bench: cannot set THP to $1 in L1' >&2; exit 125; }"
}
