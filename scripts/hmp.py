#!/usr/bin/env python3
"""Send human-monitor (HMP) commands to a QEMU started with
`-monitor unix:SOCKET,server=on,wait=off` and print what each answered.

    scripts/hmp.py SOCKET 'info registers' 'info lapic' ...
    scripts/hmp.py --stuck SOCKET
    scripts/hmp.py --poke SERIAL_SOCKET

Used by scripts/testbed to look at an L1 that seems hung. Exit 1 if the
socket cannot be reached or QEMU does not answer within 10 s.

--stuck: exit 0 and say why when every vCPU is halted with interrupts
enabled while its local APIC holds a deliverable interrupt (IRR above
the processor priority): a vCPU that should be running is not, and
never will be (QEMU 7.2 TCG with nested SVM does this now and then,
docs/FACTS.md). Exit 3 when not (a vCPU runs, or waits for nothing
pending), 1 when QEMU cannot be asked.

--poke: write one newline to the serial port behind SERIAL_SOCKET (a
`-chardev socket,server=on` QEMU serves): the UART's receive interrupt
makes QEMU look at the local APIC again, which delivers what was stuck.
"""
import re
import socket
import sys

PROMPT = b"(qemu) "


def read_prompt(s):
    out = b""
    while not out.endswith(PROMPT):
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out[: -len(PROMPT)] if out.endswith(PROMPT) else out


def connect(path):
    """A connection to the Unix socket `path`, each wait on it bounded."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def ask(path, cmds):
    """[(cmd, answer)] from QEMU's monitor at `path`."""
    s = connect(path)
    read_prompt(s)  # the banner
    out = []
    for cmd in cmds:
        s.sendall(cmd.encode() + b"\n")
        text = read_prompt(s).decode(errors="replace").replace("\r", "")
        # QEMU echoes the command as its line editor draws it (with
        # terminal escapes): leave those lines out.
        lines = [l for l in text.split("\n") if l.strip() and "\x1b" not in l]
        out.append((cmd, "\n".join(lines)))
    return out


def stuck(path):
    """None if some vCPU can run; else why every vCPU is stuck."""
    [(_, regs)] = ask(path, ["info registers -a"])
    cpus = re.findall(r"RFL=([0-9a-f]+).*?HLT=(\d)", regs)
    if not cpus:
        raise OSError("no vCPU state in the monitor's answer")
    why = []
    for i, (rfl, hlt) in enumerate(cpus):
        if hlt != "1" or not int(rfl, 16) & 0x200:
            return None  # running, or halted with interrupts off
        [(_, lapic)] = ask(path, [f"info lapic {i}"])
        irr = re.search(r"^IRR\s+(.*)$", lapic, re.M)
        ppr = re.search(r"PPR 0x([0-9a-f]+)", lapic)
        vectors = [int(v) for v in irr.group(1).split() if v.isdigit()] if irr else []
        prio = int(ppr.group(1), 16) & 0xF0 if ppr else 0
        pending = [v for v in vectors if v & 0xF0 > prio]
        if not pending:
            return None  # halted, waiting for something to come
        why.append(f"vCPU {i} halted with interrupts enabled and interrupt "
                   f"vector {max(pending)} pending")
    return "; ".join(why)


def poke(path):
    s = connect(path)
    s.sendall(b"\n")
    s.close()


def main():
    args = sys.argv[1:]
    if not args:
        sys.stderr.write(__doc__)
        return 2
    mode = args[0] if len(args) == 2 and args[0] in ("--poke", "--stuck") else None
    path = args[1] if mode else args[0]
    try:
        if mode == "--poke":
            poke(path)
            return 0
        if mode == "--stuck":
            why = stuck(path)
            if why is None:
                return 3
            print(why)
            return 0
        for cmd, answer in ask(path, args[1:]):
            print(f"== {cmd}")
            print(answer)
    except (OSError, ValueError) as e:
        print(f"hmp: {path}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
