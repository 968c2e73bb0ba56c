#!/usr/bin/env python3
"""Per-hop medians of a change from a local edit to a peer's subscribers.

Usage: COFAB_HOPS=1 cargo run --release -- bench --scenarios a 2>hops.err
       python3 node/scripts/hops.py hops.err t0,http,cmd,edited,send,wr0,wr1,rd,recv,decoded,received [N]

Both nodes of (a) (the two `cofab run` processes, then the in-process pair) print
`HOP <CLOCK_MONOTONIC ns> <tag>` to the same stderr; lines of two processes may be
interleaved, so the tags are read wherever they appear and sorted by time. A sequence
is the tags in the order given, each the first after the previous; the first N
sequences (default 520: the first shape of the processes run) are used, the first 20
dropped as warm-up. Tags: t0 (bench sends the HTTP request), http (A's handler),
cmd (A's event loop takes the edit), edited (edit made, rule-checked, signed), send
(frame handed to libp2p), wr0/wr1 (A's connection task writes the frame), rd (B's
connection task has read it), recv (B's event loop has it), decoded, received
(verified, applied, rule-checked), commit (group handed to the store thread), event."""
import re
import sys

ev = sorted((int(a), b) for a, b in re.findall(r'HOP (\d+) (\w+)', open(sys.argv[1]).read()))
order = sys.argv[2].split(',')
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 520
res = []
i = 0
while i < len(ev) and len(res) < limit:
    if ev[i][1] == order[0]:
        t = {order[0]: ev[i][0]}
        j, k = i + 1, 1
        while j < len(ev) and k < len(order):
            if ev[j][1] == order[k]:
                t[order[k]] = ev[j][0]
                k += 1
            elif ev[j][1] == order[0]:
                break
            j += 1
        if k == len(order):
            res.append(t)
        i = j
    else:
        i += 1
res = res[20:]
print(len(res), "sequences")
for a, b in zip(order, order[1:]):
    d = sorted((r[b] - r[a]) / 1000 for r in res)
    print(f"{a:>8} -> {b:<8} p50 {d[len(d) // 2]:8.1f} us  p90 {d[int(len(d) * .9)]:8.1f}")
d = sorted((r[order[-1]] - r[order[0]]) / 1000 for r in res)
print(f"total p50 {d[len(d) // 2]:.1f} us  p99 {d[int(len(d) * .99)]:.1f} us")
