"""Benchmarks: our keas.kmi against the reference keas.kmi 3.3.0, in one run.

    make bench                 # the full run (about 5-15 minutes)
    BENCH_QUICK=1 make bench   # a smoke run with small sizes (under 2 minutes)
    BENCH_ONLY=bulk,files make bench   # only these sections (see Bench.main)

Each side runs in its own persistent worker process (``benchmarks/worker.py``
under ``.venv/bin/python`` and under ``.venv-ref/bin/python``), driven over
JSON lines. For every workload the rounds alternate between the two sides
(ours, ref, ref, ours, ...), the workers time the work themselves, and every
round checks its result (against the other side and, for the ciphers, against
the ``openssl`` command line); a failed check ends the row with ERROR.

The report (machine, versions, the table with targets, and every raw sample)
is printed and written to ``benchmarks/results/<date>-<short sha>.txt``
(quick runs: ``benchmarks/work/<date>-<short sha>-quick.txt``). Scratch files
live in ``benchmarks/work/`` (git-ignored). GB/s means 10^9 bytes per second,
as ``openssl speed`` counts.
"""
import configparser
import datetime
import hashlib
import http.client
import json
import mmap
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, 'work')
RUN = os.path.join(WORK, 'run')
RESULTS = os.path.join(HERE, 'results')

QUICK = os.environ.get('BENCH_QUICK', '') not in ('', '0')



def _refvenv():
    # The Makefile's REFVENV; without it, its default, then the old in-tree one.
    if os.environ.get('REFVENV'):
        return os.environ['REFVENV']
    cached = os.path.expanduser('~/.cache/keas.kmi/reference-3.3.0')
    return cached if os.path.exists(cached) else '.venv-ref'


PYTHONS = {
    'ours': os.path.join(ROOT, os.environ.get('VENV') or '.venv', 'bin', 'python'),
    'ref': os.path.join(ROOT, _refvenv(), 'bin', 'python'),
}
SIDES = ('ours', 'ref')

MiB = 1 << 20
GB = 1e9
PASSPHRASE = b'key management facility'
SALT = b'12345678'
IV = b'0123456789ABCDEF'
SMALL_PLAINTEXT = b'a secret string'  # 15 bytes

# Sizes and rounds: (full, quick).
P = {
    'small_calls': (20000, 2000),
    'small_rounds': (9, 3),
    'bulk_size': (64 * MiB, 8 * MiB),
    'bulk_rounds': (9, 3),
    'file_size': (256 * MiB, 16 * MiB),
    'file_rounds': (7, 2),
    'generate_samples': (31, 5),
    # RSA key generation varies tenfold from key to key; the store rows
    # compare two medians of it, so they take more samples.
    'store_generate_samples': (151, 5),
    # Two servers' warm POST /key should be equal (the cache answers); on a
    # shared machine single runs vary by 20%, so more, shorter runs.
    'store_wsgi_runs': (4, 1),
    'store_wsgi_seconds': (5, 3),
    'cold_legacy_calls': (20, 5),
    'cold_pkcs8_calls': (3, 1),
    'cold_rounds': (7, 3),
    'zodb_objects': (10000, 1000),
    'zodb_rounds': (5, 2),
    'wsgi_seconds': (10, 3),
    'wsgi_runs': (3, 1),
    'memory_mib': (1024, 64),
    # wrapped keys: our client in wrapped mode against legacy mode, one server
    'wrapped_cold_calls': (10, 3),
    'wrapped_cold_rounds': (9, 3),
    'wrapped_generate_samples': (101, 5),
    'wrapped_warm_calls': (20000, 2000),
    # The warm rows run the same cached code in both modes; a 30-50 ms round on a
    # loaded 2-core machine is easily interrupted, so many rounds for the median.
    'wrapped_warm_rounds': (21, 3),
    'openssl_seconds': (3, 1),
}
P = {name: value[1 if QUICK else 0] for name, value in P.items()}


REF_MEMORY_SHIM = """
import sys
sys.path.insert(0, sys.argv[1])
import file_memory

def truncate(self, size=None):
    if size is not None and size != self.size:
        raise OSError('the hashing sink cannot be truncated to %d' % size)
    return self.size

file_memory.HashingSink.truncate = truncate
file_memory.main(int(sys.argv[2]), sys.argv[3])
"""


def log(*args):
    print('[bench %s]' % time.strftime('%H:%M:%S'), *args, file=sys.stderr, flush=True)


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def run(cmd, **kwargs):
    return subprocess.run(cmd, check=True, capture_output=True, text=True,
                          **kwargs).stdout


def try_run(cmd):
    try:
        return run(cmd).strip()
    except (OSError, subprocess.CalledProcessError):
        return ''


def cipher_key(dek):
    """The AES-256 key of the data cipher for a DEK (FORMATS.md, section 3)."""
    d1 = hashlib.md5(dek + SALT).digest()
    return d1 + hashlib.md5(d1 + dek + SALT).digest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            block = f.read(MiB)
            if not block:
                return h.hexdigest()
            h.update(block)


def write_random(path, size):
    with open(path, 'wb') as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def openssl_cbc(key, iv, decrypt=False, pad=True):
    cmd = ['openssl', 'enc', '-aes-256-cbc', '-K', key.hex(), '-iv', iv.hex()]
    if decrypt:
        cmd.append('-d')
    if not pad:
        cmd.append('-nopad')
    return cmd


def openssl_speed(decrypt):
    cmd = ['openssl', 'speed']
    if decrypt:
        cmd.append('-decrypt')
    cmd += ['-evp', 'aes-256-cbc', '-bytes', '16384',
            '-seconds', str(P['openssl_seconds'])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.match(r'^(aes-256-cbc)\s+([\d.]+)k\s*$', line.strip(), re.I)
        if m:
            return float(m.group(2)) * 1000  # bytes per second
    raise RuntimeError('cannot parse openssl speed output:\n' + out)


def openssl_speed_gcm(decrypt):
    """openssl speed -evp aes-256-gcm (one core, 16 KiB buffers), bytes/s."""
    cmd = ['openssl', 'speed'] + (['-decrypt'] if decrypt else [])
    cmd += ['-evp', 'aes-256-gcm', '-bytes', '16384', '-seconds', str(P['openssl_seconds'])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.match(r'^(aes-256-gcm)\s+([\d.]+)k\s*$', line.strip(), re.I)
        if m:
            return float(m.group(2)) * 1000
    raise RuntimeError('cannot parse openssl speed output:\n' + out)


def wrk_version():
    if not shutil.which('wrk'):
        return '(not installed; loadgen.py is used)'
    out = subprocess.run(['wrk', '--version'], capture_output=True, text=True)
    return ((out.stdout + out.stderr).strip().splitlines() or ['?'])[0]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# -- workers -----------------------------------------------------------------


class WorkerError(Exception):
    pass


class Worker:
    """One side's persistent worker process."""

    def __init__(self, side):
        self.side = side
        self.proc = None
        self.setup = []  # requests to replay after a restart

    def start(self):
        env = dict(os.environ)
        env.pop('PYTHONPATH', None)
        self.errlog = open(os.path.join(WORK, 'worker-%s.log' % self.side), 'a')
        self.proc = subprocess.Popen(
            [PYTHONS[self.side], os.path.join(HERE, 'worker.py')],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errlog,
            text=True, bufsize=1, cwd=ROOT, env=env)
        for op, kwargs in self.setup:
            self._call(op, kwargs)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def _call(self, op, kwargs):
        if not self.alive():
            raise WorkerError('%s worker is not running' % self.side)
        try:
            self.proc.stdin.write(json.dumps(dict(kwargs, op=op)) + '\n')
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as e:
            line = ''
            reason = str(e)
        else:
            reason = 'exit status %s' % self.proc.poll()
        if not line:
            self.proc.wait(timeout=10)
            raise WorkerError('%s worker died during %s (%s; see %s)' % (
                self.side, op, reason, self.errlog.name))
        answer = json.loads(line)
        if not answer.pop('ok'):
            raise WorkerError('%s: %s' % (self.side, answer['error']))
        return answer

    def call(self, op, **kwargs):
        if not self.alive():
            log('(re)starting the %s worker' % self.side)
            self.start()
        return self._call(op, kwargs)

    def remember(self, op, **kwargs):
        """Call, and call again whenever the worker is restarted."""
        answer = self.call(op, **kwargs)
        self.setup.append((op, kwargs))
        return answer

    def stop(self):
        if self.alive():
            try:
                self._call('quit', {})
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()


# -- the table -----------------------------------------------------------------


def fmt_time(seconds):
    if seconds is None:
        return '-'
    for unit, scale in (('s', 1), ('ms', 1e-3), ('us', 1e-6), ('ns', 1e-9)):
        if seconds >= scale or unit == 'ns':
            value = seconds / scale
            return ('%.3g' % value if value < 1000 else '%.0f' % value) + ' ' + unit


def fmt_num(value):
    return '%.3g' % value if value < 1000 else '%.0f' % value


class Row:
    """One workload: samples of both sides, a target and its verdict.

    ``kind``: 'time' (samples are seconds per operation, lower is better),
    'rate' (samples are operations per second, higher is better),
    'mib' (samples are MiB of peak RSS growth, lower is better).
    """

    def __init__(self, name, kind='time', unit_bytes=None, target=''):
        self.name = name
        self.kind = kind
        self.unit_bytes = unit_bytes  # bytes per operation, for GB/s
        self.target = target
        self.samples = {'ours': [], 'ref': []}
        self.extra = {'ours': [], 'ref': []}
        self.status = None  # PASS / MISS / ERROR / SKIP / '' (no target)
        self.note = ''
        self.goal = None  # function(row) -> (passed, explanation)

    def median(self, side):
        s = self.samples[side]
        return statistics.median(s) if s else None

    def spread(self, side):
        s = self.samples[side]
        return (min(s), max(s)) if s else None

    def speedup(self):
        a, b = self.median('ours'), self.median('ref')
        if not a or not b:
            return None
        if self.kind == 'mib':
            return None
        return b / a if self.kind == 'time' else a / b

    def gbps(self, side):
        m = self.median(side)
        if not self.unit_bytes or not m:
            return None
        return self.unit_bytes / m / GB

    def cell(self, side):
        m = self.median(side)
        if m is None:
            return '-'
        lo, hi = self.spread(side)
        f = {'time': fmt_time, 'rate': fmt_num, 'bytes': fmt_num,
             'mib': lambda v: '%.1f' % v}[self.kind]
        suffix = {'time': '', 'rate': ' req/s', 'mib': ' MiB', 'bytes': ' B'}[self.kind]
        n = len(self.samples[side])
        if n == 1:
            return f(m) + suffix
        return '%s%s [%s..%s] n=%d' % (f(m), suffix, f(lo), f(hi), n)

    def fail(self, error):
        self.status = 'ERROR'
        self.note = str(error)
        log('ERROR in %s: %s' % (self.name, error))

    def skip(self, reason):
        self.status = 'SKIP'
        self.note = reason
        log('SKIP %s: %s' % (self.name, reason))

    def judge(self):
        if self.status in ('ERROR', 'SKIP'):
            return
        if self.goal is None:
            self.status = ''
            return
        try:
            passed, why = self.goal(self)
        except Exception as e:  # a missing figure
            self.status, self.note = 'ERROR', 'cannot judge: %s' % e
            return
        self.status = 'PASS' if passed else 'MISS'
        self.note = (why + ('; ' + self.note if self.note else '')) if why else self.note


def speedup_goal(factor):
    def goal(row):
        s = row.speedup()
        return s >= factor, 'speedup %.2fx vs >= %gx' % (s, factor)
    return goal


def table_lines(table):
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for i, r in enumerate(table):
        lines.append('| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |')
        if i == 0:
            lines.append('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    return lines


def render_stores(rows):
    """Our package on PostgreSQL against our package on a directory."""
    table = [['workload', 'PostgreSQL: median [min..max]', 'directory: median [min..max]',
              'pg / dir', 'target', 'result']]
    for row in rows:
        a, b = row.median('pg'), row.median('dir')
        table.append([row.name, row.cell('pg'), row.cell('dir'),
                      '%.2fx' % (a / b) if a and b else '-', row.target or '-',
                      row.status or '-'])
    return table_lines(table)


def render(rows):
    head = ['workload', 'ours: median [min..max]', 'reference: median [min..max]',
            'speedup', 'GB/s ours / ref', 'target', 'result']
    table = [head]
    for row in rows:
        s = row.speedup()
        g = (row.gbps('ours'), row.gbps('ref'))
        table.append([
            row.name, row.cell('ours'), row.cell('ref'),
            '%.2fx' % s if s else '-',
            ('%.2f / %s' % (g[0], '%.2f' % g[1] if g[1] else '-')) if g[0] else '-',
            row.target or '-', row.status or '-',
        ])
    notes = ['%s: %s %s' % (row.name, row.status or 'info', row.note)
             for row in rows if row.note]
    return table_lines(table), notes


def touch_guest_memory():
    """Write once to most of the free memory, then free it.

    On a virtual machine whose memory the host backs lazily (Firecracker
    here), the first write to a guest page costs a host page fault: the file
    rows then measured ~0.65 GB/s whenever the kernel handed out never-used
    pages, and ~3 GB/s otherwise, depending on which side ran first. Touching
    the memory once up front takes that out of every measured round, for both
    sides alike. Cheap when already done: backed pages fault fast.
    """
    with open('/proc/meminfo') as f:
        info = dict(line.split(':', 1) for line in f)
    free = int(info['MemAvailable'].split()[0]) * 1024
    size = max(0, min(free - (4 << 30), 16 << 30))
    if size < (1 << 30):
        return
    t0 = time.time()
    region = mmap.mmap(-1, size)
    view = memoryview(region)
    view[::4096] = b'\x01' * (size // 4096)
    view.release()
    region.close()
    log('touched %.1f GiB of guest memory in %.1f s' % (size / (1 << 30), time.time() - t0))


# -- the benchmark -------------------------------------------------------------


class Bench:

    def __init__(self):
        self.workers = {side: Worker(side) for side in SIDES}
        self.rows = []
        self.raw = []
        self.openssl = {'encrypt': [], 'decrypt': [], 'gcm encrypt': [], 'gcm decrypt': []}
        self.servers = []

    def row(self, *args, **kwargs):
        row = Row(*args, **kwargs)
        self.rows.append(row)
        log('--', row.name)
        return row

    def alternate(self, rounds):
        """(round, side) in the order ours ref | ref ours | ours ref ..."""
        for r in range(rounds):
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                yield r, side

    def record(self, row, side, value, **extra):
        row.samples[side].append(value)
        row.extra[side].append(extra)
        self.raw.append('%s | %s | %r %s' % (
            row.name, side, value, json.dumps(extra, sort_keys=True) if extra else ''))

    # -- setup ---------------------------------------------------------------

    def setup(self):
        shutil.rmtree(RUN, ignore_errors=True)
        os.makedirs(RUN)
        touch_guest_memory()
        self.store = os.path.join(RUN, 'store')
        self.kekdir = os.path.join(RUN, 'keks')
        self.info = {}
        for side in SIDES:
            self.workers[side].start()
            self.info[side] = self.workers[side].call('hello')
        log('making the KEKs in the reference worker')
        made = self.workers['ref'].call('make_keks', store=self.store,
                                        kekdir=self.kekdir)
        self.keks = {kind: made[kind] for kind in ('legacy', 'pkcs8')}
        paths = {kind: k['kek_path'] for kind, k in self.keks.items()}
        for side in SIDES:
            deks = self.workers[side].remember('setup', store=self.store, keks=paths)['deks']
            for kind, k in self.keks.items():
                check(deks[kind] == k['dek'], '%s unwraps the %s KEK to a different DEK'
                      % (side, kind))
        self.dek = bytes.fromhex(self.keks['legacy']['dek'])
        self.key = cipher_key(self.dek)
        self.small_ct = subprocess.run(openssl_cbc(self.key, IV), input=SMALL_PLAINTEXT,
                                       capture_output=True, check=True).stdout
        check(len(self.small_ct) == 16, 'openssl gave %d bytes' % len(self.small_ct))

    # -- workloads -------------------------------------------------------------

    def small(self):
        ct = self.small_ct
        n = P['small_calls']
        for which in ('encrypt', 'decrypt'):
            row = self.row('%s 15 B, DEK cached (per call)' % which,
                           target='>= 10x ref')
            row.goal = speedup_goal(10)
            try:
                for _, side in self.alternate(P['small_rounds']):
                    a = self.workers[side].call(
                        'small', which=which, kind='legacy', n=n,
                        plaintext=SMALL_PLAINTEXT.hex(), ciphertext=ct.hex())
                    self.record(row, side, a['seconds'] / n, calls=n)
            except (WorkerError, CheckFailed) as e:
                row.fail(e)

    def measure_openssl(self):
        for which in ('encrypt', 'decrypt'):
            try:
                bps = openssl_speed(which == 'decrypt')
                self.openssl[which].append(bps)
                self.raw.append('openssl speed %s | %.0f bytes/s' % (which, bps))
                log('openssl speed %s: %.2f GB/s' % (which, bps / GB))
            except Exception as e:
                self.raw.append('openssl speed %s | failed: %s' % (which, e))
                log('openssl speed %s failed: %s' % (which, e))

    def measure_openssl_gcm(self):
        for which in ('encrypt', 'decrypt'):
            try:
                bps = openssl_speed_gcm(which == 'decrypt')
                self.openssl['gcm ' + which].append(bps)
                self.raw.append('openssl speed gcm %s | %.0f bytes/s' % (which, bps))
                log('openssl speed aes-256-gcm %s: %.2f GB/s' % (which, bps / GB))
            except Exception as e:
                self.raw.append('openssl speed gcm %s | failed: %s' % (which, e))
                log('openssl speed gcm %s failed: %s' % (which, e))

    def openssl_goal(self, which, factor):
        def goal(row):
            figure = max(self.openssl[which]) / GB
            ours = row.gbps('ours')
            return (ours >= factor * figure,
                    '%.2f GB/s vs >= %g x %.2f = %.2f GB/s (openssl %s)'
                    % (ours, factor, figure, factor * figure, which))
        return goal

    def bulk(self):
        size = P['bulk_size']
        plain = os.path.join(RUN, 'bulk.plain')
        cipher = os.path.join(RUN, 'bulk.cipher')
        write_random(plain, size)
        subprocess.run(openssl_cbc(self.key, IV) + ['-in', plain, '-out', cipher],
                       check=True)
        check(os.path.getsize(cipher) == size + 16, 'openssl ciphertext size')
        mib = size // MiB
        rows = {}
        for which, factor in (('encrypt', 0.85), ('decrypt', 0.8)):
            rows[which] = self.row('%s %d MiB bytes' % (which, mib), unit_bytes=size,
                                   target='>= %g x openssl %s' % (factor, which))
            rows[which].goal = self.openssl_goal(which, factor)
        try:
            for side in SIDES:
                self.workers[side].call('load', name='plain', path=plain)
                self.workers[side].call('load', name='cipher', path=cipher)
        except WorkerError as e:
            for row in rows.values():
                row.fail(e)
            return
        for which, row in rows.items():
            try:
                for _, side in self.alternate(P['bulk_rounds']):
                    a = self.workers[side].call('bulk', which=which, kind='legacy',
                                                plain='plain', cipher='cipher')
                    self.record(row, side, a['seconds'],
                                untimed_call_before=round(a['warm_seconds'], 6))
            except (WorkerError, CheckFailed) as e:
                row.fail(e)
        for side in SIDES:
            for name in ('plain', 'cipher'):
                try:
                    self.workers[side].call('drop', name=name)
                except WorkerError:
                    pass
        os.remove(plain)
        os.remove(cipher)

    def check_encrypted_file(self, path, size, plain_sha):
        """Decrypt a file of the encrypt_file format with openssl and compare."""
        fd = os.open(path, os.O_RDONLY)
        try:
            header = os.pread(fd, 24, 0)
            check(len(header) == 24, 'encrypted file shorter than its header')
            (stored,) = struct.unpack('<Q', header[:8])
            check(stored == size, 'size field %d, not %d' % (stored, size))
            total = os.fstat(fd).st_size
            check(total == 24 + (size + 15) // 16 * 16,
                  'encrypted file has %d bytes' % total)
            os.lseek(fd, 24, os.SEEK_SET)  # openssl reads the CBC stream from here
            proc = subprocess.Popen(
                openssl_cbc(self.key, header[8:], decrypt=True, pad=False),
                stdin=fd, stdout=subprocess.PIPE)
            h = hashlib.sha256()
            left = size
            tail = b''
            while True:
                block = proc.stdout.read(MiB)
                if not block:
                    break
                h.update(block[:left])
                tail += block[left:]
                left -= min(left, len(block))
            check(proc.wait() == 0, 'openssl could not decrypt the file')
        finally:
            os.close(fd)
        check(left == 0 and set(tail) <= {0x20},
              'file decrypts to the wrong length or padding')
        check(h.hexdigest() == plain_sha, 'file decrypts to different plaintext')

    def files(self):
        size = P['file_size']
        plain = os.path.join(RUN, 'file.plain')
        made = os.path.join(RUN, 'file.openssl.enc')
        write_random(plain, size)
        plain_sha = sha256_file(plain)
        # The decrypt input, made by openssl alone: size, IV, CBC stream.
        iv = os.urandom(16)
        with open(made, 'wb') as out:
            out.write(struct.pack('<Q', size) + iv)
            out.flush()
            with open(plain, 'rb') as src:
                subprocess.run(openssl_cbc(self.key, iv, pad=size % 16 != 0),
                               stdin=src, stdout=out, check=True)
        mib = size // MiB
        enc = self.row('encrypt_file %d MiB (disk)' % mib, unit_bytes=size,
                       target='>= 0.8 x openssl encrypt')
        enc.goal = self.openssl_goal('encrypt', 0.8)
        try:
            for r, side in self.alternate(P['file_rounds']):
                dst = os.path.join(RUN, 'file.%s.enc' % side)
                a = self.workers[side].call('file', which='encrypt', kind='legacy',
                                            src=plain, dst=dst)
                self.check_encrypted_file(dst, size, plain_sha)
                self.record(enc, side, a['seconds'])
                os.remove(dst)
        except (WorkerError, CheckFailed) as e:
            enc.fail(e)
        dec = self.row('decrypt_file %d MiB (disk)' % mib, unit_bytes=size,
                       target='>= 2 GB/s')

        def goal(row):
            g = row.gbps('ours')
            return g >= 2, '%.2f GB/s vs >= 2 GB/s' % g
        dec.goal = goal
        try:
            for r, side in self.alternate(P['file_rounds']):
                dst = os.path.join(RUN, 'file.%s.out' % side)
                a = self.workers[side].call('file', which='decrypt', kind='legacy',
                                            src=made, dst=dst)
                check(a['out_size'] == size, '%s decrypt_file wrote %d bytes'
                      % (side, a['out_size']))
                check(a['sha256'] == plain_sha, '%s decrypt_file: wrong plaintext' % side)
                self.record(dec, side, a['seconds'])
        except (WorkerError, CheckFailed) as e:
            dec.fail(e)
        os.remove(plain)
        os.remove(made)

    # -- v2: ours in the v2 format ------------------------------------------

    def small_v2(self):
        """v2 on our side against the reference's legacy format."""
        for which in ('encrypt', 'decrypt'):
            row = self.row('v2 %s 15 B, DEK cached (ref: legacy)' % which,
                           target='>= 10x ref legacy')
            row.goal = speedup_goal(10)
            try:
                for _, side in self.alternate(P['small_rounds']):
                    if side == 'ours':
                        a = self.workers[side].call('small_v2', which=which, kind='legacy',
                                                    n=P['small_calls'],
                                                    plaintext=SMALL_PLAINTEXT.hex())
                    else:
                        a = self.workers[side].call(
                            'small', which=which, kind='legacy', n=P['small_calls'],
                            plaintext=SMALL_PLAINTEXT.hex(), ciphertext=self.small_ct.hex())
                    self.record(row, side, a['seconds'] / P['small_calls'],
                                calls=P['small_calls'])
            except (WorkerError, CheckFailed) as e:
                row.fail(e)

    def bulk_v2(self):
        size = P['bulk_size']
        plain = os.path.join(RUN, 'bulk.plain')
        write_random(plain, size)
        rows = {}
        for which in ('encrypt', 'decrypt'):
            rows[which] = self.row('v2 %s %d MiB bytes (ours only)' % (which, size // MiB),
                                   unit_bytes=size,
                                   target='>= 0.8 x openssl gcm %s' % which)
            rows[which].goal = self.openssl_goal('gcm ' + which, 0.8)
        try:
            self.workers['ours'].call('load', name='plain', path=plain)
            for which, row in rows.items():
                for _ in range(P['bulk_rounds']):
                    a = self.workers['ours'].call('bulk_v2', which=which, kind='legacy',
                                                  plain='plain')
                    self.record(row, 'ours', a['seconds'])
        except (WorkerError, CheckFailed) as e:
            for row in rows.values():
                if not row.status:
                    row.fail(e)
        finally:
            try:
                self.workers['ours'].call('drop', name='plain')
            except WorkerError:
                pass
            os.remove(plain)

    def files_v2(self):
        size = P['file_size']
        plain = os.path.join(RUN, 'file.plain')
        write_random(plain, size)
        plain_sha = sha256_file(plain)
        sealed = os.path.join(RUN, 'file.v2.enc')
        mib = size // MiB

        def goal(row):
            g = row.gbps('ours')
            return g >= 2, '%.2f GB/s vs >= 2 GB/s' % g
        enc = self.row('v2 encrypt_file %d MiB (disk, ours only)' % mib, unit_bytes=size,
                       target='>= 2 GB/s')
        dec = self.row('v2 decrypt_file %d MiB (disk, ours only)' % mib, unit_bytes=size,
                       target='>= 2 GB/s')
        enc.goal = dec.goal = goal
        for row, which, src, dst in ((enc, 'encrypt', plain, sealed),
                                     (dec, 'decrypt', sealed, sealed + '.out')):
            try:
                for _ in range(P['file_rounds']):
                    a = self.workers['ours'].call('file_v2', which=which, kind='legacy',
                                                  src=src, dst=dst)
                    if which == 'encrypt':
                        check(a['out_size'] == 82 + size + 16 * (size // 16384 + 1),
                              'v2 file of %d bytes' % a['out_size'])
                    else:
                        check(a['sha256'] == plain_sha, 'v2 decrypt_file: wrong plaintext')
                    self.record(row, 'ours', a['seconds'])
            except (WorkerError, CheckFailed) as e:
                row.fail(e)
        for path in (plain, sealed):
            if os.path.exists(path):
                os.remove(path)

    def zodb_v2(self):
        n = P['zodb_objects']
        row = self.row('ZODB commit + load %d objects, v2 (ref column: our legacy)' % n,
                       target='<= 1.25x our legacy')

        def goal(r):
            ratio = r.median('ours') / r.median('ref')
            return ratio <= 1.25, 'v2 takes %.2fx our legacy time vs <= 1.25x' % ratio
        row.goal = goal
        path = os.path.join(RUN, 'zodb-v2.fs')
        store = os.path.join(RUN, 'zodb-keys-ours')
        try:
            for r, side in self.alternate(P['zodb_rounds']):
                a = self.workers['ours'].call('zodb', path=path, n=n, store=store,
                                              fmt=2 if side == 'ours' else 1)
                self.record(row, side, a['seconds'])
        except (WorkerError, CheckFailed) as e:
            row.fail(e)

    def generate(self):
        row = self.row('generate() (keygen, wrap, store)', target='>= 3x ref')
        row.goal = speedup_goal(3)
        made = {}
        try:
            for r, side in self.alternate(P['generate_samples']):
                store = os.path.join(RUN, 'gen-%s' % side)
                a = self.workers[side].call('generate', store=store)
                made.setdefault(side, (store, a['kek'], a['dek']))
                self.record(row, side, a['seconds'], kek=a['kek'].splitlines()[0])
            # Each side reads a KEK the other generated.
            for side, other in (('ours', 'ref'), ('ref', 'ours')):
                store, kek, dek = made[other]
                self.workers[side].call('unwrap', store=store, kek=kek, dek=dek)
        except (WorkerError, CheckFailed) as e:
            row.fail(e)

    def cold(self):
        for kind, label, factor in (
                ('legacy', 'legacy PEM (DES-EDE3) KEK', 5),
                ('pkcs8', 'PKCS#8 PBKDF2-SHA256 600k KEK', 1.3)):
            n = P['cold_%s_calls' % kind]
            row = self.row('cold getEncryptionKey, %s' % label,
                           target='>= %gx ref' % factor)
            row.goal = speedup_goal(factor)
            try:
                for _, side in self.alternate(P['cold_rounds']):
                    a = self.workers[side].call('cold', store=self.store, kind=kind,
                                                n=n, dek=self.keks[kind]['dek'])
                    self.record(row, side, a['seconds'] / n, calls=n)
            except (WorkerError, CheckFailed) as e:
                row.fail(e)

    def zodb(self):
        n = P['zodb_objects']
        total = self.row('ZODB commit + load %d objects' % n, target='>= 2x ref')
        total.goal = speedup_goal(2)
        commit = self.row('  of which: commit')
        load = self.row('  of which: load in a new connection')
        paths = {side: os.path.join(RUN, 'zodb-%s.fs' % side) for side in SIDES}
        stores = {side: os.path.join(RUN, 'zodb-keys-%s' % side) for side in SIDES}
        try:
            for r, side in self.alternate(P['zodb_rounds']):
                a = self.workers[side].call('zodb', path=paths[side], n=n,
                                            store=stores[side])
                self.record(total, side, a['seconds'])
                self.record(commit, side, a['commit'])
                self.record(load, side, a['load'])
            # Each side reads the database the other wrote.
            for side, other in (('ours', 'ref'), ('ref', 'ours')):
                self.workers[side].call('zodb_verify', path=paths[other], n=n,
                                        store=stores[side])
        except (WorkerError, CheckFailed) as e:
            total.fail(e)
            commit.status = load.status = 'ERROR'

    # -- WSGI ----------------------------------------------------------------

    # The commit before granian: the last one with the event-loop gunicorn worker.
    EVENT_WORKER_COMMIT = '443bb0c'

    def tls_pair(self):
        """A self-signed certificate and PKCS#8 key for 127.0.0.1, in RUN."""
        crt, key = os.path.join(RUN, 'bench.crt'), os.path.join(RUN, 'bench.key')
        if not os.path.exists(crt):
            run(['openssl', 'genpkey', '-algorithm', 'RSA', '-pkeyopt',
                 'rsa_keygen_bits:2048', '-out', key])
            run(['openssl', 'req', '-x509', '-key', key, '-days', '2', '-subj',
                 '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
                 '-out', crt])
        return crt, key

    @staticmethod
    def server_ini_sections():
        """server.ini's [server:main] settings and its logging sections (text)."""
        parser = configparser.RawConfigParser()
        path = os.path.join(ROOT, 'server.ini')
        parser.read(path)
        with open(path) as f:
            text = f.read()
        return dict(parser.items('server:main')), text[text.index('[loggers]'):]

    def write_ini(self, name, app_use, store, server=None, app_settings=None):
        """[app:main] over ``store`` (and ``app_settings``), a [server:main] if
        given, and server.ini's logging (the kmi log on standard error), as
        `make serve` logs."""
        _, logging_sections = self.server_ini_sections()
        lines = ['[app:main]', 'use = %s' % app_use, 'storage-dir = %s' % store]
        lines += ['%s = %s' % kv for kv in (app_settings or {}).items()] + ['']
        if server:
            lines += ['[server:main]'] + ['%s = %s' % kv for kv in server.items()] + ['']
        path = os.path.join(RUN, '%s.ini' % name)
        with open(path, 'w') as f:
            f.write('\n'.join(lines) + '\n' + logging_sections)
        return path

    def start_server(self, name, command, port, tls=False, pythonpath=None):
        """Start ``command`` (a server on 127.0.0.1:port) and wait for GET /."""
        errlog = open(os.path.join(WORK, 'server-%s.log' % name), 'w')
        env = dict(os.environ)
        env.pop('PYTHONPATH', None)
        if pythonpath:
            env['PYTHONPATH'] = pythonpath
        env['XDG_RUNTIME_DIR'] = RUN  # gunicorn >= 25 puts a control socket there
        proc = subprocess.Popen(command, stdout=errlog, stderr=errlog, cwd=RUN, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.servers.append(proc)
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError('the %s server exited (%s); see %s'
                                   % (name, proc.returncode, errlog.name))
            try:
                conn = self.connection(port, tls, timeout=5)
                conn.request('GET', '/')
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status == 200:
                    return port
            except (OSError, http.client.HTTPException):
                pass
            if time.time() > deadline:
                raise RuntimeError('the %s server did not answer GET /' % name)
            time.sleep(0.2)

    def start_gunicorn(self, name, side, store, args=(), tls=False, app_use=None,
                       pythonpath=None, app_settings=None):
        """gunicorn -w 2 on a free port, serving ``app_use`` (the side's
        keas.kmi.wsgi:application_factory) over ``store``."""
        gunicorn = os.path.join(os.path.dirname(PYTHONS[side]), 'gunicorn')
        if not os.path.exists(gunicorn):
            raise RuntimeError('no gunicorn in %s (pip install gunicorn)'
                               % os.path.dirname(gunicorn))
        ini = self.write_ini(name, app_use or 'call:keas.kmi.wsgi:application_factory',
                             store, app_settings=app_settings)
        port = free_port()
        tls_args = []
        if tls:
            crt, key = self.tls_pair()
            tls_args = ['--certfile', crt, '--keyfile', key]
        command = [gunicorn, '-w', '2', *args, *tls_args, '-b', '127.0.0.1:%d' % port,
                   '--paste', ini]
        return self.start_server(name, command, port, tls, pythonpath)

    def start_make_serve(self, store, name='granian', app_settings=None):
        """Ours as `make serve` runs it: `python -m keas.kmi.wsgi` with server.ini's
        [server:main] (granian), on another port and with the bench's certificate."""
        settings, _ = self.server_ini_sections()
        crt, key = self.tls_pair()
        port = free_port()
        settings.update(host='127.0.0.1', port=str(port), ssl_certificate=crt,
                        ssl_keyfile=key)
        ini = self.write_ini(name, 'egg:keas.kmi', store, settings, app_settings)
        self.granian_settings = settings
        return self.start_server(name, [PYTHONS['ours'], '-m', 'keas.kmi.wsgi', ini],
                                 port, tls=True)

    def start_event_worker(self, store, name='eventworker', app_settings=None):
        """Our application under the event-loop gunicorn worker of
        EVENT_WORKER_COMMIT (its worker.py, read from git), with TLS and the
        worker settings of that commit's server.ini. That commit's application
        had the worker answer POST /key for a cached DEK on the loop
        (``inline_request``); the shim does so for every POST /key, which are
        all cached here."""
        commit = self.EVENT_WORKER_COMMIT
        source = subprocess.run(['git', '-C', ROOT, 'show',
                                 '%s:python/keas/kmi/worker.py' % commit],
                                capture_output=True)
        if source.returncode != 0:
            raise RuntimeError('cannot read worker.py of %s from git: %s' % (
                commit, source.stderr.decode(errors='replace').strip()))
        folder = os.path.join(WORK, 'eventworker')
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'eventworker_%s.py' % commit), 'wb') as f:
            f.write(source.stdout)
        with open(os.path.join(folder, 'eventworker_app.py'), 'w') as f:
            f.write('"""keas.kmi.wsgi\'s application with the inline_request hook of %s."""\n'
                    'from keas.kmi.wsgi import application_factory\n\n\n'
                    'def factory(global_config, **settings):\n'
                    '    app = application_factory(global_config, **settings)\n'
                    '    app.inline_request = lambda environ: (\n'
                    '        environ.get("PATH_INFO") == "/key"\n'
                    '        and environ.get("REQUEST_METHOD") == "POST")\n'
                    '    return app\n' % commit)
        args = ['-k', 'eventworker_%s.EventWorker' % commit, '--threads', '32',
                '--keep-alive', '2']
        self.event_worker_args = args
        return self.start_gunicorn(name, 'ours', store, args, tls=True,
                                   app_use='call:eventworker_app:factory',
                                   pythonpath=folder, app_settings=app_settings)

    @staticmethod
    def connection(port, tls, timeout=10):
        if tls:  # the bench's own self-signed certificate
            return http.client.HTTPSConnection(
                '127.0.0.1', port, timeout=timeout,
                context=ssl._create_unverified_context())
        return http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)

    def stop_servers(self):
        for proc in self.servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.servers = []

    def sample_requests(self, port, kek, dek, tls=False, count=6):
        for i in range(count):
            conn = self.connection(port, tls)
            conn.request('POST', '/key', kek, {'Content-Type': 'text/plain'})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            check(resp.status == 200, 'POST /key answered %s' % resp.status)
            check(body == dek, 'POST /key answered a different body (%d bytes)'
                  % len(body))

    def wrk_script(self, kek, dek):
        def lua(data):
            return '"' + ''.join('\\%d' % b for b in data) + '"'
        path = os.path.join(RUN, 'post_key.lua')
        with open(path, 'w') as f:
            f.write('''-- POST /key with the KEK; every answer must be 200 with the DEK.
wrk.method = "POST"
wrk.headers["Content-Type"] = "text/plain"
wrk.body = %s
local expected = %s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) good = 0; bad = 0 end
function response(status, headers, body)
  if status == 200 and body == expected then good = good + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local g, b = 0, 0
  for _, t in ipairs(threads) do g = g + t:get("good"); b = b + t:get("bad") end
  io.write(string.format("CHECK good=%%d bad=%%d\\n", g, b))
end
''' % (lua(kek), lua(dek)))
        return path

    def load(self, port, seconds, script, kek_path, dek, tls=False):
        """Requests per second of POST /key for ``seconds``; checks every answer."""
        if shutil.which('wrk'):
            out = run(['wrk', '-t1', '-c4', '-d%ds' % seconds, '-s', script,
                       '%s://127.0.0.1:%d/key' % ('https' if tls else 'http', port)],
                      timeout=seconds + 60)
            m = re.search(r'CHECK good=(\d+) bad=(\d+)', out)
            check(m is not None, 'wrk did not report its checks:\n' + out)
            good, bad = int(m.group(1)), int(m.group(2))
            errors = re.search(r'Socket errors:.*', out)
            check(bad == 0, '%d of %d answers were not 200 + the DEK' % (bad, good + bad))
            check(good > 0, 'no answers')
            rps = float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1))
            return rps, {'good': good, 'socket_errors': errors.group(0) if errors else ''}
        if tls:
            raise RuntimeError('the TLS rows need wrk (apt-get install wrk)')
        out = run([sys.executable, os.path.join(HERE, 'loadgen.py'), str(port),
                   str(seconds), kek_path, dek.hex()], timeout=seconds + 60)
        result = json.loads(out.strip().splitlines()[-1])
        check(result['bad'] == 0, '%d answers were not 200 + the DEK' % result['bad'])
        check(result['good'] > 0, 'no answers')
        return result['good'] / result['seconds'], {'good': result['good'],
                                                    'loader': 'loadgen.py'}

    def wsgi(self):
        loader = 'wrk -t1 -c4' if shutil.which('wrk') else 'benchmarks/loadgen.py (no wrk)'
        served = self.row('WSGI POST /key, warm, TLS: make serve (granian) vs ref gunicorn',
                          kind='rate', target='>= 5x ref req/s')
        served.goal = speedup_goal(5)
        event = self.row('  same, granian vs (ref column) EventWorker %s'
                         % self.EVENT_WORKER_COMMIT, kind='rate', target='>= 1.0x')
        event.goal = speedup_goal(1.0)
        unaudited = self.row('  same, both with the audit log off', kind='rate')
        # The reference with gunicorn workers that keep connections open.
        gthread = self.row('  same, ref with gthread workers (keep-alive)', kind='rate')
        # The applications alone: gunicorn's sync workers, plain HTTP, both sides.
        sync = self.row('  same sync workers on both sides, plain HTTP', kind='rate')
        probe = subprocess.run([PYTHONS['ours'], '-c', 'import granian, keas.kmi.server'],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            for row in (served, event, unaudited, gthread, sync):
                row.skip('granian or our keas.kmi.server is not importable: %s'
                         % (probe.stderr.strip().splitlines() or ['?'])[-1])
            return
        with open(self.keks['legacy']['kek_path'], 'rb') as f:
            kek = f.read()
        script = self.wrk_script(kek, self.dek)
        store = self.store
        try:
            granian = self.start_make_serve(store)
            ref_tls = self.start_gunicorn('ref-tls', 'ref', store, tls=True)
        except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
            for row in (served, event, unaudited, gthread):
                row.fail(e)
        else:
            served.note = (
                'load: %s, %d s per run, over TLS; ours: python -m keas.kmi.wsgi with '
                "server.ini's [server:main] (%s); ref: gunicorn -w 2, sync workers (its "
                'documented setup), --certfile/--keyfile; sync workers close every '
                'connection, so each reference request includes a TLS handshake; both log '
                "with server.ini's logging sections"
                % (loader, P['wsgi_seconds'], ', '.join(
                    '%s=%s' % kv for kv in sorted(self.granian_settings.items())
                    if kv[0] not in ('host', 'port', 'ssl_certificate', 'ssl_keyfile'))))
            self.wsgi_rounds(served, {'ours': granian, 'ref': ref_tls}, kek, script, tls=True)
            try:
                eventworker = self.start_event_worker(store)
            except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
                event.fail(e)
            else:
                event.note = (
                    'load: %s, %d s per run, over TLS; ours: as above; ref column: our '
                    'application under gunicorn -w 2 %s (worker.py of %s) --certfile/'
                    '--keyfile, POST /key answered on the event loop'
                    % (loader, P['wsgi_seconds'], ' '.join(self.event_worker_args),
                       self.EVENT_WORKER_COMMIT))
                self.wsgi_rounds(event, {'ours': granian, 'ref': eventworker}, kek, script,
                                 tls=True)
            # The servers alone: the same, with the application's audit log off.
            try:
                quiet = {'ours': self.start_make_serve(store, name='granian-noaudit',
                                                       app_settings={'audit': 'off'}),
                         'ref': self.start_event_worker(store, name='eventworker-noaudit',
                                                        app_settings={'audit': 'off'})}
            except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
                unaudited.fail(e)
            else:
                unaudited.note = 'as the row above, both with audit = off'
                self.wsgi_rounds(unaudited, quiet, kek, script, tls=True)
            args = ['-k', 'gthread', '--threads', '4', '--keep-alive', '2']
            try:
                ref_gthread = self.start_gunicorn('ref-gthread', 'ref', store, args, tls=True)
            except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
                gthread.fail(e)
            else:
                gthread.note = ('load: %s, %d s per run, over TLS; ours: as above; ref: '
                                'gunicorn -w 2 %s --certfile/--keyfile'
                                % (loader, P['wsgi_seconds'], ' '.join(args)))
                self.wsgi_rounds(gthread, {'ours': granian, 'ref': ref_gthread}, kek, script,
                                 tls=True)
        finally:
            self.stop_servers()
        sync.note = 'load: %s, %d s per run; both: sync workers, plain HTTP' % (
            loader, P['wsgi_seconds'])
        try:
            ports = {side: self.start_gunicorn('%s-sync' % side, side, store)
                     for side in SIDES}
        except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
            sync.fail(e)
        else:
            self.wsgi_rounds(sync, ports, kek, script, tls=False)
        finally:
            self.stop_servers()

    def audit(self):
        """Warm POST /key through our server with the audit log on and off."""
        loader = 'wrk -t1 -c4' if shutil.which('wrk') else 'benchmarks/loadgen.py (no wrk)'
        row = self.row('WSGI POST /key, warm, TLS, audit log on (ref column: off)',
                       kind='rate', target='>= 0.5x off')
        row.goal = speedup_goal(0.5)
        size = self.row('  audit log: bytes per entry (ours only)', kind='bytes')
        with open(self.keks['legacy']['kek_path'], 'rb') as f:
            kek = f.read()
        script = self.wrk_script(kek, self.dek)
        log_path = os.path.join(RUN, 'audit-bench.jsonl')
        try:
            ports = {
                'ours': self.start_make_serve(self.store, name='audit-on',
                                              app_settings={'audit-log': log_path}),
                'ref': self.start_make_serve(self.store, name='audit-off',
                                             app_settings={'audit': 'off'}),
            }
            row.note = ('load: %s, %d s per run, over TLS; both: our server as make '
                        'serve runs it, over one key directory; on: every POST /key is '
                        'written to the log before it is answered (fsync once a second)'
                        % (loader, P['wsgi_seconds']))
            self.wsgi_rounds(row, ports, kek, script, tls=True)
        except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
            row.fail(e)
        finally:
            self.stop_servers()
        try:
            with open(log_path, 'rb') as f:
                lines = f.read().splitlines()
            check(lines, 'the audit log is empty')
            self.record(size, 'ours', sum(len(line) + 1 for line in lines) / len(lines),
                        entries=len(lines))
            size.note = '%d entries of fetch events, one JSON line each' % len(lines)
        except (OSError, CheckFailed) as e:
            size.fail(e)

    def wsgi_rounds(self, row, ports, kek, script, tls):
        """Alternating load runs against ports {'ours': port, 'ref': port}."""
        kek_path = self.keks['legacy']['kek_path']
        try:
            for side in SIDES:
                # Several requests reach both workers: warm caches, checked bodies.
                self.sample_requests(ports[side], kek, self.dek, tls)
            for side in SIDES:  # warm-up, not recorded
                self.load(ports[side], 2, script, kek_path, self.dek, tls)
            for _, side in self.alternate(P['wsgi_runs']):
                rps, extra = self.load(ports[side], P['wsgi_seconds'], script,
                                       kek_path, self.dek, tls)
                self.record(row, side, rps, **extra)
            for side in SIDES:
                self.sample_requests(ports[side], kek, self.dek, tls, count=2)
        except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
            row.fail(e)

    # -- wrapped keys (issue 14): our client, wrapped mode against legacy mode -----
    #
    # Both columns are our package: 'ours' is LocalKeyManagementFacility with
    # keyMode='wrapped' (GET/PUT /wrapped/<name>, the KEK stays in the client),
    # the 'ref' column the same client in legacy mode (POST /key, POST /new),
    # against one server as make serve runs it (granian, TLS, audit on).

    @staticmethod
    def mode_goal(limit):
        """wrapped / legacy of the medians (times): at most ``limit``."""
        def goal(row):
            ratio = row.median('ours') / row.median('ref')
            return ratio <= limit, 'wrapped/legacy %.2fx vs <= %gx' % (ratio, limit)
        return goal

    def wrapped(self):
        modes = {'ours': 'wrapped', 'ref': 'legacy'}
        cold = self.row('cold getEncryptionKey, wrapped mode (GET /wrapped + local unwrap) '
                        'vs (ref column) legacy mode (POST /key, server unwraps)',
                        target='wrapped <= 1.5x legacy')
        cold.goal = self.mode_goal(1.5)
        gen = self.row('generate(), wrapped mode (local keygen + PUT /wrapped) '
                       'vs (ref column) legacy mode (POST /new)',
                       target='wrapped <= 1.2x legacy')
        gen.goal = self.mode_goal(1.2)
        warm = self.row('  warm getEncryptionKey (client cache), wrapped vs (ref column) '
                        'legacy', target='wrapped <= 1.2x legacy, no request')
        warm.goal = self.mode_goal(1.2)
        warm_enc = self.row('  warm encrypt 15 B, wrapped vs (ref column) legacy',
                            target='wrapped <= 1.2x legacy, no request')
        warm_enc.goal = self.mode_goal(1.2)
        rows = (cold, gen, warm, warm_enc)
        ours = self.workers['ours']
        store = os.path.join(RUN, 'wrapped-store')
        os.makedirs(store, mode=0o700, exist_ok=True)
        crt, _ = self.tls_pair()
        try:
            port = self.start_make_serve(store, name='wrapped')
        except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
            for row in rows:
                row.fail(e)
            return
        url = 'https://127.0.0.1:%d' % port
        try:
            n, rounds = P['wrapped_cold_calls'], P['wrapped_cold_rounds']
            cold.note = ('%d calls per round, each a new client (empty cache) and a KEK '
                         'that no server cache holds (each one is sent to POST /key once), '
                         "one TLS connection per request as the client makes them; server "
                         "as make serve runs it (granian, server.ini's [server:main], "
                         'audit on), directory store' % n)
            try:
                ours.call('client_keys', store=store, count=n * rounds + 1)
                for side in SIDES:  # warm-up (connections, page cache), not recorded
                    ours.call('client_cold', url=url, cafile=crt, mode=modes[side],
                              first=n * rounds, n=1)
                for r, side in self.alternate(rounds):
                    a = ours.call('client_cold', url=url, cafile=crt, mode=modes[side],
                                  first=r * n, n=n)
                    self.record(cold, side, a['seconds'] / n, calls=n)
            except (WorkerError, CheckFailed) as e:
                cold.fail(e)
            gen.note = ('one call per sample, alternating; RSA key generation (2048 bits) '
                        'dominates and varies tenfold from key to key, in the client '
                        '(wrapped) or in a server worker (legacy); each key is then read '
                        'in the other mode')
            try:
                for r, side in self.alternate(P['wrapped_generate_samples']):
                    a = ours.call('client_generate', url=url, cafile=crt, mode=modes[side],
                                  store=store)
                    self.record(gen, side, a['seconds'], pem=a['pem'])
            except (WorkerError, CheckFailed) as e:
                gen.fail(e)
            calls = P['wrapped_warm_calls']
            for row, what in ((warm, 'dek'), (warm_enc, 'encrypt')):
                row.note = ('%d calls per round on one client whose cache holds the DEK; '
                            'the worker checks that no request is made' % calls)
                try:
                    for r, side in self.alternate(P['wrapped_warm_rounds']):
                        a = ours.call('client_warm', url=url, cafile=crt, mode=modes[side],
                                      index=0, n=calls, what=what)
                        self.record(row, side, a['seconds'] / calls, calls=calls)
                except (WorkerError, CheckFailed) as e:
                    row.fail(e)
        finally:
            self.stop_servers()

    # -- key stores: PostgreSQL against the directory (issue 12) ---------------
    #
    # Both sides are our package in the same worker process; only the store
    # differs. Rounds alternate pg dir | dir pg | ... like ours/ref above. The
    # database is a throwaway cluster of tests/pgcluster.py (fsync on, as the
    # directory store fsyncs), on loopback TCP.

    def store_row(self, name, kind='time', target='', goal=None):
        row = self.row(name, kind=kind, target=target)
        row.samples = {'pg': [], 'dir': []}
        row.extra = {'pg': [], 'dir': []}
        row.store = True
        row.goal = goal
        return row

    def store_alternate(self, rounds):
        for r in range(rounds):
            for side in (('pg', 'dir') if r % 2 == 0 else ('dir', 'pg')):
                yield r, side

    @staticmethod
    def ratio_goal(limit, at_most):
        """pg / dir of the medians: at most ``limit`` (times) or at least (rates)."""
        def goal(row):
            ratio = row.median('pg') / row.median('dir')
            ok = ratio <= limit if at_most else ratio >= limit
            return ok, 'pg/dir %.2fx vs %s %gx' % (ratio, '<=' if at_most else '>=', limit)
        return goal

    def stores(self):
        sys.path.insert(0, os.path.join(ROOT, 'tests'))
        import pgcluster
        rows = [
            self.store_row('generate() (keygen, wrap, store)',
                           target='pg <= 1.2x dir', goal=self.ratio_goal(1.2, True)),
            self.store_row('cold getEncryptionKey, legacy PEM (DES-EDE3) KEK',
                           target='pg <= 1.2x dir', goal=self.ratio_goal(1.2, True)),
            self.store_row('  store.get(), one key (per call)'),
            self.store_row('WSGI POST /key, warm, make serve (granian), audit log off',
                           kind='rate', target='pg >= 0.95x dir',
                           goal=self.ratio_goal(0.95, False)),
            self.store_row('  same, audit log on (the default): table vs file', kind='rate',
                           target='pg on >= 0.5x pg off'),
            self.store_row('WSGI POST /new, 4 servers, one store', kind='rate'),
            self.store_row('  same, 1 server', kind='rate'),
        ]
        reason = pgcluster.missing_reason()
        if reason:
            for row in rows:
                row.skip(reason)
            return
        try:
            cluster = pgcluster.Cluster()
        except pgcluster.ClusterError as e:
            for row in rows:
                row.fail(e)
            return
        try:
            cluster.create_database('kmibench')
            self.pg_url = cluster.url('kmibench')
            self.pg_version = cluster.execute('SHOW server_version')[0][0]
            self.store_facility_rows(*rows[:3])
            self.store_wsgi_rows(rows[3], rows[4])
            self.store_new_rows(rows[5], rows[6])
        finally:
            self.stop_servers()
            cluster.destroy()

    def store_facility_rows(self, gen, cold, get):
        from keas.kmi.store import open_store
        from keas.kmi.storecopy import copy_keys
        ours = self.workers['ours']
        url = self.pg_url
        locations = {'pg': url, 'dir': os.path.join(RUN, 'gen-store-dir')}
        try:
            for r, side in self.store_alternate(P['store_generate_samples']):
                a = ours.call('generate', store=locations[side])
                self.record(gen, side, a['seconds'])
        except (WorkerError, CheckFailed) as e:
            gen.fail(e)
        # The legacy KEK's wrapped DEK, copied from the directory the other
        # rows read into the database: the same bytes on both sides.
        src, dst = open_store(self.store), open_store(url)
        result = copy_keys(src, dst)
        src.close()
        dst.close()
        check(not result.conflicts, 'copying the benchmark keys found conflicts')
        stores = {'pg': url, 'dir': self.store}
        n = P['cold_legacy_calls']
        dek = self.keks['legacy']['dek']
        try:
            for side in ('pg', 'dir'):  # warm-up (the pool, the page cache), not recorded
                ours.call('cold', store=stores[side], kind='legacy', n=1, dek=dek)
            for _, side in self.store_alternate(P['cold_rounds']):
                a = ours.call('cold', store=stores[side], kind='legacy', n=n, dek=dek)
                self.record(cold, side, a['seconds'] / n, calls=n)
        except (WorkerError, CheckFailed) as e:
            cold.fail(e)
        name = self.keks['legacy']['name']
        with open(os.path.join(self.store, name + '.dek'), 'rb') as f:
            wrapped = f.read().hex()
        calls = P['small_calls'] // 10
        try:
            for _, side in self.store_alternate(P['small_rounds']):
                a = ours.call('store_get', store=stores[side], name=name, n=calls,
                              expected=wrapped)
                extra = {'calls': calls}
                if 'raw_select_seconds' in a:
                    extra['raw_psycopg_select_per_call'] = a['raw_select_seconds'] / calls
                self.record(get, side, a['seconds'] / calls, **extra)
            raw = [e['raw_psycopg_select_per_call'] for e in get.extra['pg']]
            get.note = ('the same primary-key SELECT on one psycopg connection, no pool: '
                        'median %s' % fmt_time(statistics.median(raw)))
        except (WorkerError, CheckFailed) as e:
            get.fail(e)

    def store_wsgi_rows(self, off, on):
        """Warm POST /key on each store, with the audit log off (the cache
        answers: the store is not read) and on (each request appends an
        entry: a line in a file, or a row through a database round trip)."""
        loader = 'wrk -t1 -c4' if shutil.which('wrk') else 'benchmarks/loadgen.py (no wrk)'
        off.note = ('load: %s over TLS, %d s per run; both: our package as make serve '
                    'runs it (granian); the DEK is cached, so the store is not read'
                    % (loader, P['store_wsgi_seconds']))
        kek_path = self.keks['legacy']['kek_path']
        with open(kek_path, 'rb') as f:
            kek = f.read()
        stores = {'pg': self.pg_url, 'dir': self.store}
        ports = {}
        try:
            for side in ('pg', 'dir'):
                for audit in ('off', 'on'):
                    ports[side, audit] = self.start_make_serve(
                        stores[side], name='store-%s-audit-%s' % (side, audit),
                        app_settings={'audit': audit})
                    self.sample_requests(ports[side, audit], kek, self.dek, tls=True)
            script = self.wrk_script(kek, self.dek)
            for port in ports.values():  # warm-up, not recorded
                self.load(port, 2, script, kek_path, self.dek, tls=True)
            for _, side in self.store_alternate(P['store_wsgi_runs']):
                for audit, row in (('off', off), ('on', on)):
                    rps, extra = self.load(ports[side, audit], P['store_wsgi_seconds'],
                                           script, kek_path, self.dek, tls=True)
                    self.record(row, side, rps, **extra)
        except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
            off.fail(e)
            on.fail(e)
        finally:
            self.stop_servers()

        def goal(row):
            ratio = on.median('pg') / off.median('pg')
            return ratio >= 0.5, ('pg audit on/off %.2fx vs >= 0.5x (dir on/off %.2fx)'
                                  % (ratio, on.median('dir') / off.median('dir')))
        on.goal = goal

    def new_load(self, ports, seconds, clients=8):
        """POST /new from ``clients`` threads round-robin over ``ports`` for
        ``seconds``; every answer must be 200 and a KEK. (KEKs, req/s)."""
        import threading
        keks, bad = [], []
        lock = threading.Lock()
        deadline = time.perf_counter() + seconds

        def loop(c):
            i = c
            while time.perf_counter() < deadline:
                conn = self.connection(ports[i % len(ports)], True, timeout=60)
                try:
                    conn.request('POST', '/new', b'')
                    resp = conn.getresponse()
                    body = resp.read()
                finally:
                    conn.close()
                with lock:
                    if resp.status == 200 and body.startswith(b'-----BEGIN'):
                        keks.append(body)
                    else:
                        bad.append(resp.status)
                i += 1
        t0 = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        check(not bad, '%d POST /new answers were not 200 + a KEK: %r' % (len(bad), bad[:5]))
        return keks, len(keks) / elapsed

    def store_new_rows(self, four, one):
        from keas.kmi.facility import KeyManagementFacility
        stores = {'pg': self.pg_url, 'dir': os.path.join(RUN, 'new-store-dir')}
        seconds = P['wsgi_seconds']
        for row, count in ((four, 4), (one, 1)):
            row.note = ('8 client threads round-robin over the servers, %d s per run, '
                        'over TLS; each server as make serve runs it (granian, 2 '
                        'workers); every KEK is then read back from the store' % seconds)
            try:
                for _, side in self.store_alternate(P['wsgi_runs']):
                    ports = [self.start_make_serve(stores[side], name='new-%s-%d' % (side, i))
                             for i in range(count)]
                    keks, rps = self.new_load(ports, seconds)
                    self.stop_servers()
                    kmf = KeyManagementFacility(stores[side])
                    names = set(kmf.keys())
                    lost = [k for k in keks if hashlib.md5(k).hexdigest() not in names]
                    check(not lost, '%d KEKs handed out are not in the store' % len(lost))
                    for kek in keks[:5]:
                        check(len(kmf.getEncryptionKey(kek)) == 128, 'a stored key is unusable')
                    self.record(row, side, rps, keys=len(keks))
            except (RuntimeError, CheckFailed, subprocess.SubprocessError, OSError) as e:
                row.fail(e)
            finally:
                self.stop_servers()

    # -- memory ----------------------------------------------------------------

    def memory(self):
        mib = P['memory_mib']
        row = self.row('encrypt_file %d MiB: peak RSS growth' % mib, kind='mib',
                       target='ours <= 64 MiB')
        drow = self.row('  decrypt_file %d MiB: peak RSS growth' % mib, kind='mib')

        def goal(r):
            g = r.median('ours')
            return g <= 64, 'ours %.1f MiB vs <= 64 MiB' % g
        row.goal = goal
        for side in SIDES:
            if side == 'ours':
                cmd = [PYTHONS[side], os.path.join(HERE, 'file_memory.py'), str(mib), RUN]
            else:
                # keas.kmi 3.3.0's decrypt_file truncates its output to the
                # stored size, which file_memory.py's hashing sink cannot do;
                # give it a truncate that accepts exactly its own size.
                cmd = [PYTHONS[side], '-c', REF_MEMORY_SHIM, HERE, str(mib), RUN]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True,
                                     timeout=1800, cwd=ROOT)
                if out.returncode != 0:
                    raise CheckFailed('file_memory.py failed: %s' % (
                        out.stderr.strip().splitlines() or ['?'])[-1])
                result = json.loads(out.stdout.strip().splitlines()[-1])
                check(result['round_trip_ok'], 'file_memory.py round trip failed')
                self.record(row, side, result['encrypt_growth_mib'], **result)
                self.record(drow, side, result['decrypt_growth_mib'])
            except (CheckFailed, subprocess.SubprocessError, ValueError) as e:
                if side == 'ours':
                    row.fail(e)
                else:
                    row.note = 'reference: %s' % e
                    drow.note = 'reference: %s' % e
                    self.raw.append('memory | ref | %s' % e)

    # -- report ----------------------------------------------------------------

    def header(self):
        lscpu = try_run(['lscpu'])
        model = re.search(r'Model name:\s*(.*)', lscpu)
        flags = re.search(r'Flags:\s*(.*)', lscpu)
        flags = set(flags.group(1).split()) if flags else set()
        mem = ''
        try:
            with open('/proc/meminfo') as f:
                kib = int(re.search(r'MemTotal:\s+(\d+)', f.read()).group(1))
            mem = '%.1f GiB' % (kib / 1024 / 1024)
        except (OSError, AttributeError):
            pass
        sha = try_run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD']) or 'nogit'
        dirty = bool(try_run(['git', '-C', ROOT, 'status', '--porcelain', '--untracked-files=no']))
        lines = [
            'keas.kmi benchmarks: ours vs reference keas.kmi 3.3.0%s'
            % (' (QUICK smoke run: small sizes, few rounds)' if QUICK else ''),
            'date:    %s' % datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'commit:  %s%s' % (sha, ' (+ uncommitted changes)' if dirty else ''),
            'cpu:     %s' % (model.group(1).strip() if model else platform.processor()),
            'flags:   %s' % ' '.join('%s=%s' % (f, 'yes' if f in flags else 'no')
                                     for f in ('aes', 'vaes', 'avx512f', 'sha_ni')),
            'cores:   %s (nproc %s)' % (os.cpu_count(), try_run(['nproc'])),
            'memory:  %s' % mem,
            'load:    %s (1/5/15 min, at start)' % ' '.join('%.2f' % x for x in os.getloadavg()),
            'kernel:  %s' % platform.platform(),
            'openssl: %s' % try_run(['openssl', 'version']),
            'wrk:     %s' % wrk_version(),
        ]
        for side in SIDES:
            info = self.info.get(side, {})
            lines.append('%-8s python %s (%s); %s' % (
                side + ':', info.get('python', '?'), PYTHONS[side],
                ', '.join('%s %s' % kv for kv in sorted(info.get('versions', {}).items()))))
        return lines, sha

    def report(self, started, header, sha):
        for row in self.rows:
            row.judge()
        main_rows = [r for r in self.rows if not getattr(r, 'store', False)]
        store_rows = [r for r in self.rows if getattr(r, 'store', False)]
        table, notes = render(main_rows)
        lines = header + ['']
        lines.append('openssl speed -evp aes-256-cbc -bytes 16384 -seconds %d (GB/s, '
                     'before and after the bulk rows; targets use the higher): '
                     'encrypt %s, decrypt %s' % (
                         P['openssl_seconds'],
                         ' '.join('%.2f' % (x / GB) for x in self.openssl['encrypt']) or '-',
                         ' '.join('%.2f' % (x / GB) for x in self.openssl['decrypt']) or '-'))
        lines.append('rounds alternate ours/ref (ours ref | ref ours | ...); times are '
                     'per operation; speedup = ref time / ours time (req/s: ours / ref)')
        lines.append('')
        if main_rows:
            lines += table
            lines.append('')
            lines += notes
            lines.append('')
        if store_rows:
            lines.append('key stores: our package on PostgreSQL %s (a throwaway local cluster, '
                         'loopback TCP, fsync on) against our package on a directory; rounds '
                         'alternate pg dir | dir pg | ...; pg / dir = ratio of the medians'
                         % getattr(self, 'pg_version', '?'))
            lines.append('')
            lines += render_stores(store_rows)
            lines.append('')
            lines += ['%s: %s %s' % (row.name, row.status or 'info', row.note)
                      for row in store_rows if row.note]
            lines.append('')
        counts = {}
        for row in self.rows:
            if row.status:
                counts[row.status] = counts.get(row.status, 0) + 1
        lines.append('summary: %s; wall time %.0f s; load at end %s' % (
            ', '.join('%d %s' % (v, k) for k, v in sorted(counts.items())),
            time.time() - started, ' '.join('%.2f' % x for x in os.getloadavg())))
        lines.append('')
        lines.append('raw samples (workload | side | value: seconds per op, req/s or MiB):')
        lines += self.raw
        text = '\n'.join(lines) + '\n'
        print(text, end='')
        day = time.strftime('%Y-%m-%d-%H%M')  # two runs of one commit keep both files
        if QUICK:
            path = os.path.join(WORK, '%s-%s-quick.txt' % (day, sha))
        else:
            os.makedirs(RESULTS, exist_ok=True)
            path = os.path.join(RESULTS, '%s-%s.txt' % (day, sha))
        with open(path, 'w') as f:
            f.write(text)
        log('written to %s' % os.path.relpath(path, ROOT))
        return counts

    def main(self):
        started = time.time()
        os.makedirs(WORK, exist_ok=True)
        # BENCH_ONLY=wsgi,cold: only these sections (comma-separated), for a partial run.
        sections = ('small', 'bulk', 'files', 'generate', 'cold', 'zodb', 'v2', 'wsgi',
                    'wrapped', 'stores', 'audit', 'memory')
        only = [name.strip() for name in os.environ.get('BENCH_ONLY', '').split(',')
                if name.strip()]
        unknown = sorted(set(only) - set(sections))
        if unknown:
            sys.exit('BENCH_ONLY: unknown section %s (known: %s)'
                     % (', '.join(unknown), ', '.join(sections)))
        wanted = set(only or sections)
        for side in SIDES:
            if not os.path.exists(PYTHONS[side]):
                sys.exit('missing %s: run make bench, which creates it' % PYTHONS[side])
        if not shutil.which('openssl'):
            sys.exit('the openssl command is needed')
        def section(name, *steps):
            if name in wanted:
                for step in steps:
                    step()

        try:
            self.setup()
            header, sha = self.header()
            if only:
                header.append('only:    BENCH_ONLY=%s (a partial run)'
                              % ','.join(name for name in sections if name in wanted))
                sha += '-only-' + '-'.join(name for name in sections if name in wanted)
            section('small', self.small)
            section('bulk', self.measure_openssl, self.bulk)
            section('files', self.files, self.measure_openssl)
            section('generate', self.generate)
            section('cold', self.cold)
            section('zodb', self.zodb)
            section('v2', self.small_v2, self.measure_openssl_gcm, self.bulk_v2,
                    self.files_v2, self.measure_openssl_gcm, self.zodb_v2)
            section('wsgi', self.wsgi)
            section('wrapped', self.wrapped)
            section('stores', self.stores)
            section('audit', self.audit)
            for side in SIDES:
                self.workers[side].stop()
            section('memory', self.memory)
        finally:
            self.stop_servers()
            for worker in self.workers.values():
                worker.stop()
        counts = self.report(started, header, sha)
        shutil.rmtree(RUN, ignore_errors=True)
        return 1 if counts.get('ERROR') else 0


if __name__ == '__main__':
    sys.exit(Bench().main())
