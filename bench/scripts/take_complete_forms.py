"""Redis time inside FCALL per job of the long and short forms of a take and a completion.

Starts its own redis-server on a free port, loads the library (`fleetq functions dump`,
passed as a file), adds N plain jobs, reads them 8 at a time as one consumer and takes them
with `fleetq_take` or `fleetq_take_fresh` and ends each batch with `fleetq_complete` or
`fleetq_complete_first` before the next read; the figure is commandstats' `usec` of FCALL (the functions and the
commands they send, not the socket I/O) per job. Rounds alternate the forms; the median
and the minimum of 7 rounds are printed.

    fleetq functions dump > /tmp/fleetq.lua
    python3 bench/scripts/take_complete_forms.py 8000 /tmp/fleetq.lua

Needs redis-py (`pip install redis`).
"""
import secrets
import socket
import statistics
import subprocess
import sys
import time

import redis

with socket.socket() as so:
    so.bind(('127.0.0.1', 0)); port = so.getsockname()[1]
srv = subprocess.Popen(['redis-server', '--bind', '127.0.0.1', '--port', str(port), '--save', '', '--appendonly', 'no'], stdout=subprocess.DEVNULL)
r = redis.Redis(port=port)
for _ in range(100):
    try:
        r.ping()
        break
    except redis.ConnectionError:
        time.sleep(0.05)
r.function_load(open(sys.argv[2]).read(), replace=True)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
B = 8
def fc():
    st = r.info('commandstats'); f = st.get('cmdstat_fcall', {'usec': 0}); return f['usec']
def run(q, fresh, first):
    sk = f'fleetq:{{{q}}}:stream'
    r.xgroup_create(sk, 'workers', id='0', mkstream=True)
    p = r.pipeline(transaction=False)
    for i in range(N): p.xadd(sk, {'payload': '{"x":"' + 'a' * 180 + '"}'})
    p.execute()
    take = comp = 0
    # Each batch is taken and then ended before the next read, as a worker's slots do, so
    # the consumer's pending list, the holds hash and the leases stay small.
    for b in range(N // B):
        ents = r.xreadgroup('workers', 'c1', {sk: '>'}, count=B)[0][1]
        ids = [e[0].decode() for e in ents]
        toks = [secrets.token_hex(8) for _ in ids]
        if fresh:
            args = ['c1', 'n1', 10000, 1, 0, 3, 0]
            for i, t in zip(ids, toks):
                args += [i, t]
            before = fc()
            r.fcall('fleetq_take_fresh', 1, sk, *args)
        else:
            args = ['c1', 'n1', 10000, 1, 0]
            for i, t in zip(ids, toks):
                args += [i, i, t, 0, 3, 0, int(i.split('-')[0]), '', 0, '', 0]
            before = fc()
            r.fcall('fleetq_take', 1, sk, *args)
        middle = fc()
        take += middle - before
        args = ['c1', 'n1']
        if first:
            for i, t in zip(ids, toks):
                args += [i, t, i, 'null']
            out = r.fcall('fleetq_complete_first', 1, sk, *args)
        else:
            for i, t in zip(ids, toks):
                args += [i, t, i, 'succeeded', 'null', 0, '', '', '', 0, '', 1]
            out = r.fcall('fleetq_complete', 1, sk, *args)
        comp += fc() - middle
        assert all(o == b'ok' for o in out), out
    assert r.xlen(sk) == 0
    return take / N, comp / N
try:
    res = {False: ([], []), True: ([], [])}
    for rnd in range(7):
        for fresh in ([False, True] if rnd % 2 == 0 else [True, False]):
            t, c = run(f'q{rnd}{fresh}', fresh, fresh)
            res[fresh][0].append(t); res[fresh][1].append(c)
    for fresh in (False, True):
        t, c = res[fresh]
        print(f'{"short" if fresh else "long "}: take median {statistics.median(t):5.1f} min {min(t):5.1f} µs/job; complete median {statistics.median(c):5.1f} min {min(c):5.1f} µs/job (inside FCALL, batches of 8)')
finally:
    srv.kill()
