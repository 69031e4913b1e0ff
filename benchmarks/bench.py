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
    'cold_legacy_calls': (20, 5),
    'cold_pkcs8_calls': (3, 1),
    'cold_rounds': (7, 3),
    'zodb_objects': (10000, 1000),
    'zodb_rounds': (5, 2),
    'wsgi_seconds': (10, 3),
    'wsgi_runs': (2, 1),
    'memory_mib': (1024, 64),
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
        f = {'time': fmt_time, 'rate': fmt_num,
             'mib': lambda v: '%.1f' % v}[self.kind]
        suffix = {'time': '', 'rate': ' req/s', 'mib': ' MiB'}[self.kind]
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
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = []
    for i, r in enumerate(table):
        lines.append('| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |')
        if i == 0:
            lines.append('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    notes = ['%s: %s %s' % (row.name, row.status or 'info', row.note)
             for row in rows if row.note]
    return lines, notes


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
        self.openssl = {'encrypt': [], 'decrypt': []}
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

    # -- workloads -------------------------------------------------------------

    def small(self):
        ct = subprocess.run(openssl_cbc(self.key, IV), input=SMALL_PLAINTEXT,
                            capture_output=True, check=True).stdout
        check(len(ct) == 16, 'openssl gave %d bytes' % len(ct))
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

    def shipped_worker_args(self):
        """gunicorn flags for the worker settings of our server.ini (what
        `make serve` runs): worker class, threads, keep-alive."""
        from keas.kmi.wsgi import server_settings
        settings = server_settings(os.path.join(ROOT, 'server.ini'))
        flags = {'worker_class': '-k', 'threads': '--threads', 'keepalive': '--keep-alive'}
        args = []
        for name, flag in flags.items():
            if name in settings:
                args += [flag, str(settings[name])]
        return args

    def start_server(self, side, store, worker_args=()):
        venv_bin = os.path.dirname(PYTHONS[side])
        gunicorn = os.path.join(venv_bin, 'gunicorn')
        if not os.path.exists(gunicorn):
            raise RuntimeError('no gunicorn in %s (pip install gunicorn)' % venv_bin)
        ini = os.path.join(RUN, 'wsgi-%s.ini' % side)
        with open(ini, 'w') as f:
            f.write('[app:main]\nuse = call:keas.kmi.wsgi:application_factory\n'
                    'storage-dir = %s\n' % store)
        port = free_port()
        errlog = open(os.path.join(WORK, 'gunicorn-%s.log' % side), 'w')
        env = dict(os.environ)
        env.pop('PYTHONPATH', None)
        proc = subprocess.Popen(
            [gunicorn, '-w', '2', *worker_args, '-b', '127.0.0.1:%d' % port,
             '--paste', ini],
            stdout=errlog, stderr=errlog, cwd=RUN, env=env,
            start_new_session=True)
        self.servers.append(proc)
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError('gunicorn for %s exited (%s); see %s'
                                   % (side, proc.returncode, errlog.name))
            try:
                conn = http.client.HTTPConnection('127.0.0.1', port, timeout=5)
                conn.request('GET', '/')
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status == 200:
                    return proc, port
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError('gunicorn for %s did not answer GET /' % side)
            time.sleep(0.2)

    def stop_servers(self):
        for proc in self.servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.servers = []

    @staticmethod
    def sample_requests(port, kek, dek, count=6):
        for i in range(count):
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
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

    def load(self, port, seconds, script, kek_path, dek):
        """Requests per second of POST /key for ``seconds``; checks every answer."""
        if shutil.which('wrk'):
            out = run(['wrk', '-t1', '-c4', '-d%ds' % seconds, '-s', script,
                       'http://127.0.0.1:%d/key' % port], timeout=seconds + 60)
            m = re.search(r'CHECK good=(\d+) bad=(\d+)', out)
            check(m is not None, 'wrk did not report its checks:\n' + out)
            good, bad = int(m.group(1)), int(m.group(2))
            errors = re.search(r'Socket errors:.*', out)
            check(bad == 0, '%d of %d answers were not 200 + the DEK' % (bad, good + bad))
            check(good > 0, 'no answers')
            rps = float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1))
            return rps, {'good': good, 'socket_errors': errors.group(0) if errors else ''}
        out = run([sys.executable, os.path.join(HERE, 'loadgen.py'), str(port),
                   str(seconds), kek_path, dek.hex()], timeout=seconds + 60)
        result = json.loads(out.strip().splitlines()[-1])
        check(result['bad'] == 0, '%d answers were not 200 + the DEK' % result['bad'])
        check(result['good'] > 0, 'no answers')
        return result['good'] / result['seconds'], {'good': result['good'],
                                                    'loader': 'loadgen.py'}

    def wsgi(self):
        shipped = self.shipped_worker_args()
        # Each side as it ships: ours with server.ini's workers, the reference
        # with gunicorn's default sync workers (its documented setup).
        self.wsgi_row('WSGI POST /key, warm, gunicorn -w 2, as shipped',
                      {'ours': shipped, 'ref': []}, '>= 2x ref req/s',
                      'ours: %s; ref: sync workers' % ' '.join(shipped))
        # The same sync workers on both sides: the applications alone differ.
        self.wsgi_row('  same sync workers on both sides', {'ours': [], 'ref': []},
                      None, 'both: sync workers')

    def wsgi_row(self, title, worker_args, target, config):
        row = self.row(title, kind='rate', target=target)
        if target:
            row.goal = speedup_goal(2)
        loader = 'wrk -t1 -c4' if shutil.which('wrk') else 'benchmarks/loadgen.py (no wrk)'
        row.note = 'load: %s, %d s per run; %s' % (loader, P['wsgi_seconds'], config)
        probe = subprocess.run(
            [PYTHONS['ours'], '-c', 'from keas.kmi.wsgi import application_factory'],
            capture_output=True, text=True)
        if probe.returncode != 0:
            row.skip('our keas.kmi.wsgi:application_factory is not importable: %s'
                     % (probe.stderr.strip().splitlines() or ['?'])[-1])
            return
        kek_path = self.keks['legacy']['kek_path']
        with open(kek_path, 'rb') as f:
            kek = f.read()
        ports = {}
        try:
            for side in SIDES:
                ports[side] = self.start_server(side, self.store, worker_args[side])[1]
                # Several requests reach both workers: warm caches, checked bodies.
                self.sample_requests(ports[side], kek, self.dek)
            script = self.wrk_script(kek, self.dek)
            for side in SIDES:  # warm-up, not recorded
                self.load(ports[side], 2, script, kek_path, self.dek)
            for _, side in self.alternate(P['wsgi_runs']):
                rps, extra = self.load(ports[side], P['wsgi_seconds'], script,
                                       kek_path, self.dek)
                self.record(row, side, rps, **extra)
            for side in SIDES:
                self.sample_requests(ports[side], kek, self.dek, count=2)
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
        table, notes = render(self.rows)
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
        lines += table
        lines.append('')
        lines += notes
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
        for side in SIDES:
            if not os.path.exists(PYTHONS[side]):
                sys.exit('missing %s: run make bench, which creates it' % PYTHONS[side])
        if not shutil.which('openssl'):
            sys.exit('the openssl command is needed')
        # BENCH_ONLY=bulk,files: only these sections (the results file says so).
        sections = ('small', 'bulk', 'files', 'generate', 'cold', 'zodb', 'wsgi', 'memory')
        only = [n.strip() for n in os.environ.get('BENCH_ONLY', '').split(',') if n.strip()]
        if set(only) - set(sections):
            sys.exit('BENCH_ONLY: unknown section(s) %s; the sections are %s' % (
                ', '.join(sorted(set(only) - set(sections))), ','.join(sections)))
        run = [name for name in sections if not only or name in only]
        try:
            self.setup()
            header, sha = self.header()
            if only:
                header.append('only:    BENCH_ONLY=%s (a partial run)' % ','.join(run))
                sha += '-only-' + '-'.join(run)
            if 'small' in run:
                self.small()
            if 'bulk' in run or 'files' in run:
                self.measure_openssl()
            if 'bulk' in run:
                self.bulk()
            if 'files' in run:
                self.files()
            if 'bulk' in run or 'files' in run:
                self.measure_openssl()
            for name in ('generate', 'cold', 'zodb', 'wsgi'):
                if name in run:
                    getattr(self, name)()
            for side in SIDES:
                self.workers[side].stop()
            if 'memory' in run:
                self.memory()
        finally:
            self.stop_servers()
            for worker in self.workers.values():
                worker.stop()
        counts = self.report(started, header, sha)
        shutil.rmtree(RUN, ignore_errors=True)
        return 1 if counts.get('ERROR') else 0


if __name__ == '__main__':
    sys.exit(Bench().main())
