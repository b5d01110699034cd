#!/usr/bin/env python3
"""Derive the agent container's seccomp profile from podman's default one.

    agent-seccomp.py IN OUT

IN is containers-common's /usr/share/containers/seccomp.json (in the image),
OUT the profile the guest init gives the agent's container
(/etc/airlock/seccomp.json): the same, except that `socket(2)` never opens
an AF_VSOCK (40) socket, so only the init speaks to the host. Run by
scripts/build-image.sh, which fails if this fails.

Every rule of IN that names `socket` (podman's own: NETLINK_AUDIT refused
without CAP_AUDIT_WRITE, everything allowed with it) is replaced by:

- allow each address family 0..45 but 16 (netlink) and 40 (vsock), with
  SCMP_CMP_MASKED_EQ rules over aligned blocks of families. Exact 64-bit
  compares on purpose: the kernel takes the family as an `int` (the low 32
  bits), so a rule such as Docker's `arg0 != 40` would let
  `socket(0x100000028, ...)` through as AF_VSOCK; here a family with any
  high bit set matches no rule and is refused;
- netlink (16) as podman has it: allowed unless the protocol is
  NETLINK_AUDIT (9), which needs CAP_AUDIT_WRITE (EINVAL without it);
- a family whose low 32 bits are AF_VSOCK fails with EPERM (rather than
  the profile's default ENOSYS, which would read as "no socket(2) here").
  This rule and the allow rules match disjoint values.

`socketcall` (the i386 multiplexer, whose arguments a filter cannot see) is
dropped from the allow list, and x86_64 loses its sub-architectures (x86,
x32): the filter then kills any system call of another ABI. The guest kernel
has neither (no IA32_EMULATION, no X32_ABI), and libseccomp cannot express
these socket rules for i386's multiplexed `socket` (adding them fails with
EEXIST, and crun refuses the profile).
Output is deterministic (same IN, same bytes).
"""

import json
import sys

AF_NETLINK = 16
AF_VSOCK = 40
# Families the kernel knows (AF_MAX is 46 in Linux 6.12).
AF_MAX = 46
NETLINK_AUDIT = 9
ALL_ONES = (1 << 64) - 1


def blocks(values):
    """Split sorted `values` into aligned power-of-two blocks (start, size)."""
    values = sorted(values)
    out = []
    i = 0
    while i < len(values):
        start = values[i]
        size = 1
        # Grow while aligned and every value of the bigger block is wanted.
        while start % (size * 2) == 0 and all(
            v in values for v in range(start, start + size * 2)
        ):
            size *= 2
        out.append((start, size))
        i = values.index(start + size - 1) + 1
    return out


def rule(args, **extra):
    r = {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": args,
         "comment": "airlock: socket() without AF_VSOCK", "includes": {}, "excludes": {}}
    r.update(extra)
    return r


def arg(index, op, value, value_two=0):
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def socket_rules():
    wanted = [f for f in range(AF_MAX) if f not in (AF_NETLINK, AF_VSOCK)]
    rules = [
        rule([arg(0, "SCMP_CMP_MASKED_EQ", ALL_ONES ^ (size - 1), start)])
        for start, size in blocks(wanted)
    ]
    rules.append(rule([arg(0, "SCMP_CMP_EQ", AF_NETLINK),
                       arg(2, "SCMP_CMP_NE", NETLINK_AUDIT)]))
    rules.append(rule([arg(0, "SCMP_CMP_EQ", AF_NETLINK)],
                      includes={"caps": ["CAP_AUDIT_WRITE"]}))
    rules.append(rule([arg(0, "SCMP_CMP_EQ", AF_NETLINK),
                       arg(2, "SCMP_CMP_EQ", NETLINK_AUDIT)],
                      action="SCMP_ACT_ERRNO", errnoRet=22,
                      excludes={"caps": ["CAP_AUDIT_WRITE"]}))
    rules.append(rule([arg(0, "SCMP_CMP_MASKED_EQ", (1 << 32) - 1, AF_VSOCK)],
                      action="SCMP_ACT_ERRNO", errnoRet=1))
    return rules


def allowed_families(rules):
    """The families (low 32 bits, high bits 0) some socket ALLOW rule lets
    through, evaluated the way libseccomp compares 64-bit arguments."""
    def match(a, v):
        op = a["op"]
        if op == "SCMP_CMP_EQ":
            return v == a["value"]
        if op == "SCMP_CMP_NE":
            return v != a["value"]
        if op == "SCMP_CMP_MASKED_EQ":
            return v & a["value"] == a["valueTwo"]
        raise SystemExit(f"agent-seccomp: unexpected op {op}")
    got = set()
    for r in rules:
        if "socket" not in r["names"] or r["action"] != "SCMP_ACT_ALLOW":
            continue
        for fam in list(range(AF_MAX + 8)) + [(1 << 32) | AF_VSOCK, (1 << 63) | AF_VSOCK]:
            if all(match(a, fam) for a in (r.get("args") or []) if a["index"] == 0):
                got.add(fam)
    return got


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        profile = json.load(f)
    kept = []
    for r in profile["syscalls"]:
        names = [n for n in r["names"] if n not in ("socket", "socketcall")]
        if names:
            kept.append(dict(r, names=names))
    profile["syscalls"] = kept + socket_rules()
    native = [a for a in profile.get("archMap") or [] if a["architecture"] == "SCMP_ARCH_X86_64"]
    if len(native) != 1:
        raise SystemExit("agent-seccomp: no single SCMP_ARCH_X86_64 in archMap")
    native[0]["subArchitectures"] = []
    # The checks the build relies on.
    allowed = allowed_families(profile["syscalls"])
    for bad in (AF_VSOCK, (1 << 32) | AF_VSOCK, (1 << 63) | AF_VSOCK):
        if bad in allowed:
            raise SystemExit(f"agent-seccomp: family {bad:#x} is allowed")
    for good in (1, 2, 10, AF_NETLINK, 17, 39, 41, 45):
        if good not in allowed:
            raise SystemExit(f"agent-seccomp: family {good} is refused")
    for r in profile["syscalls"]:
        if r["action"] == "SCMP_ACT_ALLOW" and any(
                n in ("socketcall", "io_uring_setup", "io_uring_enter") for n in r["names"]):
            raise SystemExit(f"agent-seccomp: {r['names']} still allowed")
    if not any("socket" in r["names"] for r in profile["syscalls"]):
        raise SystemExit("agent-seccomp: no socket rule")
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
