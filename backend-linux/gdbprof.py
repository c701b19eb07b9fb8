#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""A sampling profiler for a TCG guest, through QEMU's gdbstub (no perf, no PMU needed).

Waits until the guest's serial log shows "LUOX LOOP BEGIN", connects to QEMU's gdb socket
(which pauses the VM), then repeatedly: continue, sleep, interrupt, read %rip. Stops at
"LUOX LOOP END" (or --end), detaches, and prints the functions of System.map that the samples fell in
(self time: the kernel has no frame pointers in this configuration, so no call graph).

usage: gdbprof.py --sock SOCKET --log SERIAL_LOG --system-map System.map [--interval MS]
"""
import argparse
import bisect
import collections
import os
import re
import socket
import subprocess
import sys
import tempfile
import time


def packet(data: bytes) -> bytes:
    return b"$" + data + b"#" + b"%02x" % (sum(data) & 0xFF)


class Gdb:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.ack = True
        self.request(b"QStartNoAckMode")
        self.ack = False

    def send(self, data: bytes):
        self.sock.sendall(packet(data))

    def reply(self) -> bytes:
        while True:
            start = self.buf.find(b"$")
            end = self.buf.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self.buf) >= end + 3:
                data = self.buf[start + 1:end]
                self.buf = self.buf[end + 3:]
                if self.ack:
                    self.sock.sendall(b"+")
                return data
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("gdbstub closed the connection")
            self.buf += chunk

    def request(self, data: bytes) -> bytes:
        self.send(data)
        return self.reply()

    def stop_reply(self) -> bytes:
        """The next stop reply; QEMU may send one of its own when the client connects."""
        while True:
            raw = self.reply()
            if raw[:1] in (b"T", b"S"):
                return raw

    def regs(self) -> bytes:
        # `g`: all registers in gdb's x86_64 order, little-endian hex; rip follows the 16
        # general-purpose registers. (`p` needs the target-description handshake.)
        self.send(b"g")
        raw = self.reply()
        while raw[:1] in (b"T", b"S"):  # a stray stop reply
            raw = self.reply()
        if len(raw) < 272 or not re.fullmatch(rb"[0-9a-fA-Fx]+", raw):
            raise ValueError(f"gdbstub: unexpected reply {raw[:40]!r} to g")
        return raw

    @staticmethod
    def reg(raw: bytes, n: int) -> int:
        """Register n of a `g` reply (7 = rsp, 16 = rip)."""
        return int.from_bytes(bytes.fromhex(raw[16 * n:16 * n + 16].decode()), "little")

    def memory(self, addr: int, size: int) -> bytes:
        raw = self.request(b"m%x,%x" % (addr, size))
        try:
            return bytes.fromhex(raw.decode())
        except ValueError:
            return b""  # E14 & co: not mapped

    def interrupt(self):
        self.sock.sendall(b"\x03")
        return self.stop_reply()


def load_map(path):
    syms = []
    for line in open(path):
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW":
            syms.append((int(parts[0], 16), parts[2]))
    syms.sort()
    return [a for a, _ in syms], [n for _, n in syms]


def symbol_of(addrs, names, rip):
    """The System.map symbol a %rip falls in ("[user]" below the kernel half)."""
    if rip < 0x8000_0000_0000_0000:
        return "[user]"
    i = bisect.bisect_right(addrs, rip) - 1
    return names[i] if i >= 0 else "[unknown]"


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names
    return [re.sub(r"\[[0-9a-f]{16}\]", "", n) for n in out]


def log_has(path, what):
    try:
        with open(path, "rb") as f:
            return what in f.read()
    except OSError:
        return False


def sample(gdb, args, deadline, samples, stacks, text_lo, text_hi):
    """Continue, sleep, interrupt, record %rip (and a stack scan) until the end line."""
    while not log_has(args.log, args.end.encode()) and time.time() < deadline:
        regs = gdb.regs()
        rip = Gdb.reg(regs, 16)
        samples[rip] += 1
        if args.stack and rip >= 0x8000_0000_0000_0000:
            rsp = Gdb.reg(regs, 7)
            mem = gdb.memory(rsp, args.stack)
            words = [int.from_bytes(mem[i:i + 8], "little") for i in range(0, len(mem) - 7, 8)]
            stacks[(rip,) + tuple(w for w in words if text_lo <= w < text_hi)] += 1
        gdb.send(b"c")
        time.sleep(args.interval / 1000)
        gdb.interrupt()


def disassemble(code):
    """{rip: 16 bytes read at rip} -> {rip: "mnemonic operands"}, as the guest ran it
    (alternatives and static calls already patched)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rip, raw in code.items():
            path = os.path.join(tmp, "insn")
            with open(path, "wb") as f:
                f.write(raw)
            text = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64",
                                   "--no-show-raw-insn", "--stop-address=1", path],
                                  capture_output=True, text=True).stdout
            line = next((l for l in text.splitlines() if re.match(r"\s*0:\t", l)), "")
            out[rip] = line.split("\t", 1)[-1].strip()
    return out


def jmp_cache_index(pc):
    """QEMU's tb_jmp_cache_hash_func (softmmu, 4 KiB pages): the slot of the per-vCPU jump
    cache a block starting at pc lives in. The cache is direct-mapped: two blocks in one slot
    that are both looked up on every iteration evict each other, and each miss costs a lookup
    in the global block hash table."""
    tmp = pc ^ (pc >> 6)
    return ((tmp >> 6) & 0xFC0) | (tmp & 0x3F)


# Instructions after which QEMU's x86 translator ends the block with a return to its main loop
# (no chaining, no jump cache): the IF/TF-changing ones and the privileged state changes.
MAIN_LOOP_EXITS = ("popf", "sti", "iret", "sysret", "hlt", "pause", "wrmsr", "syscall")


def tcg_costs(code, sequence, name_of):
    """Prints what the traced path costs TCG beyond its instruction count.

    By instruction kind (every memory access goes through the soft TLB), and by the block
    transitions that cannot be chained: an indirect branch or a move to another guest page is
    a jump-cache lookup (helper_lookup_tb_ptr); a flags/privilege change returns to the main
    loop, which looks the next block up the same way. Then the jump-cache slots that more
    than one looked-up block maps to.
    """
    insn = disassemble(code)
    kinds = collections.Counter()
    mnemonics = collections.Counter()
    lookups = collections.Counter()
    looked_up = []
    for i, rip in enumerate(sequence):
        text = insn[rip]
        op = text.split()[0] if text else "?"
        mnemonics[op] += 1
        if op.startswith("rep"):
            kinds["rep string"] += 1
        elif op in ("push", "pop", "leave") or op.startswith(("call", "ret", "push", "pop")):
            kinds["stack (push/pop/call/ret)"] += 1
        elif "(" in text and not op.startswith(("lea", "nop")):
            kinds["memory operand"] += 1
        else:
            kinds["register only"] += 1
        nxt = sequence[i + 1] if i + 1 < len(sequence) else None
        if op.startswith(MAIN_LOOP_EXITS):
            lookups["exit to the main loop (" + op + ")"] += 1
        elif op.startswith("ret") or (op.startswith(("jmp", "call")) and "*" in text):
            lookups["indirect branch (" + op + ")"] += 1
        elif nxt is not None and nxt >> 12 != rip >> 12:
            lookups["move to another code page"] += 1
        else:
            continue
        if nxt is not None:
            looked_up.append(nxt)
    total = sum(kinds.values())
    print("# instructions by kind")
    for kind, count in kinds.most_common():
        print(f"{count:6d}  {100 * count / total:5.1f}%  {kind}")
    print(f"# unchained block transitions: {sum(lookups.values())}")
    for kind, count in lookups.most_common():
        print(f"{count:6d}  {kind}")
    # Replay the lookups through a model of the jump cache, twice: misses of blocks already
    # seen are conflicts (the second pass is the steady state of a loop over this path).
    cache, seen, conflicts = {}, set(), [0, 0]
    for rnd in (0, 1):
        for pc in looked_up:
            slot = jmp_cache_index(pc)
            if cache.get(slot) != pc:
                if pc in seen:
                    conflicts[rnd] += 1
                cache[slot] = pc
            seen.add(pc)
    slots = collections.defaultdict(set)
    for pc in looked_up:
        slots[jmp_cache_index(pc)].add(pc)
    shared = {k: sorted(v) for k, v in slots.items() if len(v) > 1}
    print(f"# looked-up blocks: {len(seen)}; jump-cache conflict misses: {conflicts[0]} in the "
          f"trace, {conflicts[1]} when it repeats; slots shared: {len(shared)}")
    for k, pcs in sorted(shared.items())[:20]:
        print(f"  slot {k:4d}: " + ", ".join(f"{pc:#x} ({name_of(pc)})" for pc in pcs))
    print("# mnemonics")
    for op, count in sorted(mnemonics.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{count:6d}  {op}")


def trace(gdb, args):
    addrs, names = load_map(args.system_map)
    where = [a for a, n in zip(addrs, names) if n == args.trace]
    if not where:
        sys.exit(f"gdbprof: no symbol {args.trace}")
    until = None
    if args.trace_until:
        until = next((a for a, n in zip(addrs, names) if n == args.trace_until), None)
        if until is None:
            sys.exit(f"gdbprof: no symbol {args.trace_until}")
    per_fn = collections.Counter()
    order = []
    sequence = []
    steps = 0
    cycle = until == where[0]  # --trace-until SYMBOL itself: one whole round, user space too
    code = {}
    for _ in range(args.trace_calls):
        gdb.request(b"Z0,%x,1" % where[0])
        gdb.send(b"c")
        gdb.stop_reply()
        gdb.request(b"z0,%x,1" % where[0])
        steps = trace_one(gdb, args, addrs, names, until, cycle, code, per_fn, order, sequence,
                          steps)
    # TCG chains translation blocks only within a guest page.
    page_jumps = sum(1 for a, b in zip(sequence, sequence[1:]) if a >> 12 != b >> 12)
    finish_trace(gdb, args, addrs, names, steps, page_jumps, code, per_fn, order, sequence)


def trace_one(gdb, args, addrs, names, until, cycle, code, per_fn, order, sequence, steps):
    first = steps
    while steps < 5_000_000:
        rip = Gdb.reg(gdb.regs(), 16)
        if (rip < 0x8000_0000_0000_0000 and not cycle) or (rip == until and steps > first):
            break
        if rip not in code:
            code[rip] = gdb.memory(rip, 16)
        name = symbol_of(addrs, names, rip)
        if not order or order[-1] != name:
            order.append(name)
        per_fn[name] += 1
        sequence.append(rip)
        steps += 1
        gdb.send(b"s")
        gdb.stop_reply()
    return steps


def finish_trace(gdb, args, addrs, names, steps, page_jumps, code, per_fn, order, sequence):
    gdb.send(b"D")
    top = per_fn.most_common()
    pretty = dict(zip([n for n, _ in top], demangle([n for n, _ in top])))
    print(f"# {steps} instructions from {args.trace} to {args.trace_until or 'user space'}, "
          f"{page_jumps} moves to another code page, {len(code)} distinct instructions "
          f"(what TCG translates when the path runs cold)")
    for name, count in top:
        print(f"{count:6d}  {pretty[name]}")
    def name_of(rip):
        name = symbol_of(addrs, names, rip)
        return pretty.get(name, name)

    tcg_costs(code, sequence, name_of)
    if len(order) < 200:
        print("# call sequence (consecutive runs merged)")
        for name in order:
            print(f"  {pretty[name]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sock", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--system-map", required=True)
    ap.add_argument("--interval", type=float, default=2.0, help="ms between samples")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--end", default="LUOX LOOP END", help="the log line that ends sampling")
    ap.add_argument("--trace", metavar="SYMBOL",
                    help="instead of sampling: break at SYMBOL, single-step until the CPU is "
                         "back in user space, and count the instructions of each function")
    ap.add_argument("--trace-calls", type=int, default=1, metavar="N",
                    help="with --trace: trace N calls of SYMBOL, one after the other, and "
                         "report their sum (divide by N for a mean)")
    ap.add_argument("--trace-until", metavar="SYMBOL",
                    help="with --trace: stop when SYMBOL is entered instead (the --trace "
                         "symbol itself: one whole round, through user space)")
    ap.add_argument("--stack", type=int, default=0, metavar="BYTES",
                    help="also scan BYTES of the kernel stack for return addresses and print "
                         "an inclusive profile (a guess: stale addresses count too)")
    args = ap.parse_args()

    deadline = time.time() + args.timeout
    while not log_has(args.log, b"LUOX LOOP BEGIN"):
        if time.time() > deadline or log_has(args.log, b"LUOX RESULT"):
            sys.exit("gdbprof: the guest never began its loop")
        time.sleep(0.05)
    gdb = Gdb(args.sock)
    gdb.request(b"?")
    if args.trace:
        trace(gdb, args)
        return
    addrs, names = load_map(args.system_map)
    text_lo = addrs[0] if addrs else 0
    text_hi = addrs[-1] if addrs else 0
    samples = collections.Counter()
    stacks = collections.Counter()
    try:
        sample(gdb, args, deadline, samples, stacks, text_lo, text_hi)
    except (OSError, EOFError):
        pass  # the VM ended between two samples (the loop was shorter than the interval)
    try:
        gdb.send(b"D")
        gdb.sock.close()
    except OSError:
        pass

    def name_of(rip):
        return symbol_of(addrs, names, rip)

    per_fn = collections.Counter()
    for rip, count in samples.items():
        per_fn[name_of(rip)] += count
    total = sum(per_fn.values())
    top = per_fn.most_common(args.top)
    pretty = demangle([n for n, _ in top])
    print(f"# {total} samples")
    for (_, count), name in zip(top, pretty):
        print(f"{100 * count / total:6.2f}% {count:6d}  {name}")
    if stacks:
        incl = collections.Counter()
        for chain, count in stacks.items():
            for fn in {name_of(a) for a in chain}:
                incl[fn] += count
        top = incl.most_common(args.top)
        pretty = demangle([n for n, _ in top])
        print(f"# inclusive (self or a return address within {args.stack} bytes of the stack)")
        for (_, count), name in zip(top, pretty):
            print(f"{100 * count / total:6.2f}% {count:6d}  {name}")


if __name__ == "__main__":
    main()
