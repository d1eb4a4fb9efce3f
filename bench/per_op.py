#!/usr/bin/env python3
"""Where the time goes, per operation type, on a dfs mount.

Usage: bench/per_op.py MOUNTPOINT [FILES] [MATCH]

MATCH (default: the cluster directory of a `dfs up`, `--data-dir`) picks the processes to
measure: those whose command line contains it.

Runs simple single-threaded phases on MOUNTPOINT (create+write+close of 4 KiB files, stat,
open+read+close, unlink) and prints, per phase: files/s, median and p99 latency of one file's
operations, and for every dfs process (found by name) the CPU time and context switches per
file. CPU and switches are what a thread hop costs on a VM; they move far less from run to
run than wall time, so compare them before and after a change in one sitting.
"""
import os, sys, time, statistics, glob

def dfs_pids(match):
    pids = {}
    for p in glob.glob('/proc/[0-9]*'):
        try:
            argv = open(p + '/cmdline', 'rb').read().split(b'\0')
        except OSError:
            continue
        base = os.path.basename(argv[0].decode(errors='replace'))
        if match and not any(match.encode() in a for a in argv):
            continue
        if base in ('dfs-mount', 'dfs-metaserver', 'dfs-storaged'):
            label = base
            n = 2
            while label in pids.values():
                label = f'{base}#{n}'
                n += 1
            pids[int(p[6:])] = label
    return pids

def usage(pid):
    """(cpu seconds, context switches) of all threads of pid."""
    tick = os.sysconf('SC_CLK_TCK')
    cpu = 0.0
    switches = 0
    for t in glob.glob(f'/proc/{pid}/task/*'):
        try:
            fields = open(t + '/stat').read().rsplit(')', 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            for line in open(t + '/status'):
                if line.startswith(('voluntary_ctxt_switches', 'nonvoluntary_ctxt_switches')):
                    switches += int(line.split()[1])
        except OSError:
            pass
    return cpu, switches

def snapshot(pids):
    return {pid: usage(pid) for pid in pids}

def drop_caches():
    try:
        os.sync()
        open('/proc/sys/vm/drop_caches', 'w').write('3\n')
    except OSError:
        pass

def phase(name, files, op, pids):
    before = snapshot(pids)
    lat = []
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        s = time.perf_counter()
        op(i, f)
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    after = snapshot(pids)
    n = len(files)
    lat.sort()
    cols = [f'{name:<10} {n / wall:8.0f} files/s  median {statistics.median(lat) * 1e3:6.3f} ms  '
            f'p99 {lat[int(n * 0.99) - 1] * 1e3:6.3f} ms']
    for pid, label in sorted(pids.items(), key=lambda x: x[1]):
        cpu = (after[pid][0] - before[pid][0]) / n * 1e6
        sw = (after[pid][1] - before[pid][1]) / n
        cols.append(f'    {label:<16} {cpu:7.0f} us CPU/file  {sw:6.1f} switches/file')
    print('\n'.join(cols), flush=True)

def main():
    mnt = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    root = os.path.join(mnt, f'per_op.{os.getpid()}')
    os.mkdir(root)
    files = [os.path.join(root, f'f{i:05d}') for i in range(n)]
    data = os.urandom(4096)
    pids = dfs_pids(sys.argv[3] if len(sys.argv) > 3 else None)
    print(f'{n} files of 4 KiB in {root}; processes: {", ".join(sorted(pids.values()))}')

    def create(i, f):
        fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)

    def stat(i, f):
        os.stat(f)

    def read(i, f):
        fd = os.open(f, os.O_RDONLY)
        os.read(fd, 8192)
        os.close(fd)

    def unlink(i, f):
        os.unlink(f)

    phase('create', files, create, pids)
    drop_caches()
    phase('stat', files, stat, pids)
    drop_caches()
    phase('read', files, read, pids)
    phase('unlink', files, unlink, pids)
    os.rmdir(root)

main()
