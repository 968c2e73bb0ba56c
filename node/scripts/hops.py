#!/usr/bin/env python3
"""Per-hop medians of a change from a local edit to a peer's subscribers.

Usage: COFAB_HOPS=1 cargo run --release -- bench --scenarios a 2>hops.err
       python3 node/scripts/hops.py hops.err cmd,commit,st0,st1,durable,send,recv,decoded,received,event
(the in-process half of scenario (a) prints both nodes' hops to one stderr)."""
import sys
lines=[l.split() for l in open(sys.argv[1]) if l.startswith('HOP ')]
ev=[(int(a[1]),a[2]) for a in lines]
order=sys.argv[2].split(',')
res=[]
i=0
while i < len(ev):
    if ev[i][1]==order[0]:
        t={order[0]:ev[i][0]}; j=i+1; k=1
        while j<len(ev) and k<len(order):
            if ev[j][1]==order[k]:
                t[order[k]]=ev[j][0]; k+=1
            elif ev[j][1]==order[0]: break
            j+=1
        if k==len(order): res.append(t)
        i=j
    else: i+=1
print(len(res))
res=res[-500:]
for a,b in zip(order,order[1:]):
    d=sorted((r[b]-r[a])/1000 for r in res)
    print(f"{a:>8}->{b:<8} p50 {d[len(d)//2]:8.1f} us  p90 {d[int(len(d)*.9)]:8.1f}")
d=sorted((r[order[-1]]-r[order[0]])/1000 for r in res); print("total p50",d[len(d)//2],"p99",d[int(len(d)*.99)])
