#!/usr/bin/env bash
# Fetch the official Anthropic and OpenAI Python SDKs (and their
# dependencies) for the guest, and cache them.
#
#   scripts/fetch-python-sdks.sh [--help]
#
# build/python-sdks/   a site directory for the guest image's Python (CPython
#                      3.11, x86-64 glibc): the wheels pinned, by version and
#                      sha256, in tests/fixtures/python-sdks.txt, unpacked as
#                      they are (no __pycache__). Put it on PYTHONPATH.
#
# The wheels come from the package index (PyPI, through pip download with
# --require-hashes: a wheel whose hash differs is refused) and are unpacked,
# not installed: nothing of them runs on the host. Cached under
# $AIRLOCK_CACHE/python-sdks/KEY, KEY a hash of the pin file and this script,
# so later runs, even from a fresh clone, only copy. tests/sdk.rs uses them.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
case "${1:-}" in
    '') ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac

pins=$AIRLOCK_ROOT/tests/fixtures/python-sdks.txt
out=$AIRLOCK_BUILD/python-sdks
recipe=1
key=$( { echo "recipe=$recipe"; hash_files "$pins" "$AIRLOCK_ROOT/scripts/fetch-python-sdks.sh"; } \
       | sha256sum | cut -c1-16)
cached=$AIRLOCK_CACHE/python-sdks/$key
mkdir -p "$AIRLOCK_BUILD" "$AIRLOCK_CACHE/python-sdks"

install_cached() {
    rm -rf "$out.tmp"
    cp -a "$cached/site" "$out.tmp"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    log "Python SDKs ($key): $out ($(grep -c '^[a-z]' "$pins") wheels)"
}
if [ -d "$cached/site" ]; then install_cached; exit 0; fi

python3 -m pip --version >/dev/null 2>&1 || apt_ensure python3-pip
exec 9>"$AIRLOCK_CACHE/python-sdks/.lock"
flock 9
if [ -d "$cached/site" ]; then install_cached; exit 0; fi

stage=$(mktemp -d "$AIRLOCK_CACHE/python-sdks/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
log "fetching $(grep -c '^[a-z]' "$pins") wheels from the package index"
python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 --implementation cp \
    --dest "$stage/wheels" -r "$pins" > "$stage/pip.log" 2>&1 \
    || { cat "$stage/pip.log" >&2; die "pip download failed"; }
python3 - "$stage/wheels" "$stage/site" <<'EOF'
import os, sys, zipfile
wheels, site = sys.argv[1], sys.argv[2]
os.makedirs(site)
for name in sorted(os.listdir(wheels)):
    with zipfile.ZipFile(os.path.join(wheels, name)) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            # A wheel's paths are relative and plain: anything else is refused.
            if info.filename.startswith("/") or ".." in parts or "__pycache__" in parts:
                if "__pycache__" in parts:
                    continue
                sys.exit(f"{name}: refusing the path {info.filename!r}")
            z.extract(info, site)
            mode = info.external_attr >> 16
            if mode & 0o111 and not info.is_dir():
                os.chmod(os.path.join(site, info.filename), 0o755)
EOF
rm -rf "$cached.tmp"; mkdir -p "$cached.tmp"
mv "$stage/site" "$cached.tmp/site"
rm -rf "$cached"; mv "$cached.tmp" "$cached"
install_cached
