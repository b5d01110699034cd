#!/usr/bin/env python3
"""Write a newc cpio archive (an initramfs) from a spec, reproducibly, without root.

    scripts/mkcpio.py OUT < SPEC

SPEC has one entry a line, in the style of the kernel's gen_init_cpio:

    dir   NAME MODE
    file  NAME MODE SOURCE
    nod   NAME MODE c|b MAJOR MINOR
    slink NAME TARGET

MODE is octal. Every entry is owned by 0:0 and dated $SOURCE_DATE_EPOCH
(default 0); entries are sorted by name, so the same inputs give the same bytes.
"""
import os
import sys

S_IFDIR, S_IFREG, S_IFCHR, S_IFBLK, S_IFLNK = 0o040000, 0o100000, 0o020000, 0o060000, 0o120000


def pad4(n):
    return b"\0" * (-n % 4)


def record(ino, name, mode, rmaj, rmin, data, mtime):
    nameb = name.encode() + b"\0"
    nlink = 2 if mode & 0o170000 == S_IFDIR else 1
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rmaj, rmin, len(nameb), 0)
    head = b"070701" + b"".join(b"%08x" % v for v in fields)
    return head + nameb + pad4(len(head) + len(nameb)) + data + pad4(len(data))


def parse(lines):
    entries = []
    for n, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        kind, name = words[0], words[1].strip("/")
        if kind == "dir" and len(words) == 3:
            entries.append((name, S_IFDIR | int(words[2], 8), 0, 0, b""))
        elif kind == "file" and len(words) == 4:
            with open(words[3], "rb") as f:
                entries.append((name, S_IFREG | int(words[2], 8), 0, 0, f.read()))
        elif kind == "nod" and len(words) == 6 and words[3] in "cb":
            t = S_IFCHR if words[3] == "c" else S_IFBLK
            entries.append((name, t | int(words[2], 8), int(words[4]), int(words[5]), b""))
        elif kind == "slink" and len(words) == 3:
            entries.append((name, S_IFLNK | 0o777, 0, 0, words[2].encode()))
        else:
            sys.exit(f"mkcpio: spec line {n} is malformed: {line.rstrip()}")
    return sorted(entries)


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    out = bytearray()
    for ino, (name, mode, rmaj, rmin, data) in enumerate(parse(sys.stdin), start=1):
        out += record(ino, name, mode, rmaj, rmin, data, epoch)
    out += record(0, "TRAILER!!!", 0, 0, 0, b"", 0)
    out += b"\0" * (-len(out) % 512)  # whole 512-byte blocks, as GNU cpio writes
    with open(sys.argv[1], "wb") as f:
        f.write(out)


if __name__ == "__main__":
    main()
