"""Peak memory of encrypt_file / decrypt_file on a generated 1 GiB stream.

Usage: python benchmarks/file_memory.py [MiB] [workdir]

Streams MiB of generated data through encrypt_file into a real file, then
decrypt_file from that file into a hashing sink; then the same between
regular files on both sides (the positional-I/O path). Prints, as JSON, the
peak RSS growth of each of the four over the interpreter's RSS before the
first. The plaintext is never held whole: the source makes it block by block.

Peaks are this process's own high-water mark (VmHWM in /proc/self/status),
reset before each operation (``5`` written to /proc/self/clear_refs). Not
ru_maxrss: Linux carries that across fork and exec, so a child of a process
that once used 16 GiB reads 16 GiB before it starts, and every growth below
that reads 0 (the benchmark touches most of the memory up front).
"""
import hashlib
import io
import json
import os
import resource
import sys
import tempfile

from keas.kmi import testing

BLOCK = 1 << 20


class GeneratedSource(io.RawIOBase):
    """``size`` bytes of a deterministic pattern, produced on demand."""

    def __init__(self, size):
        self.remaining = size
        self.digest = hashlib.sha256()
        seed = hashlib.sha256(b'kmi').digest() * (BLOCK // 32)
        self.pattern = seed

    def readable(self):
        return True

    def read(self, n=-1):
        n = self.remaining if n is None or n < 0 else min(n, self.remaining)
        out = bytearray()
        while len(out) < n:
            out += self.pattern[:n - len(out)]
        self.remaining -= n
        out = bytes(out)
        self.digest.update(out)
        return out


class HashingSink(io.RawIOBase):
    def __init__(self):
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self):
        return True

    def write(self, b):
        self.digest.update(b)
        self.size += len(b)
        return len(b)


def _status_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRss:
    """This process's peak RSS over its RSS when created (the baseline), in KiB.

    ``reset()`` starts a new peak from the current RSS, so that each operation
    is measured on its own; growth stays relative to the baseline, so that
    memory an earlier operation left allocated still counts.
    """

    def __init__(self):
        try:
            _status_kib('VmHWM')
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self.source = 'VmHWM'
            self.baseline = _status_kib('VmRSS')
        except (OSError, KeyError):  # not Linux: ru_maxrss, which may be inherited
            self.source = 'ru_maxrss'
            self.baseline = self.peak_kib()

    def peak_kib(self):
        if self.source == 'VmHWM':
            return _status_kib('VmHWM')
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def reset(self):
        if self.source == 'VmHWM':
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')

    def growth_kib(self):
        return self.peak_kib() - self.baseline


def main(mib=1024, workdir=None):
    size = mib << 20
    kmf = testing.TestingKeyManagementFacility(tempfile.mkdtemp())
    kek = kmf.generate()
    kmf.getEncryptionKey(kek)
    peak = PeakRss()
    baseline = peak.baseline
    growth = {}
    paths = {}
    for name in ('enc', 'plain', 'enc2', 'out'):
        fd, paths[name] = tempfile.mkstemp(dir=workdir, suffix='.' + name)
        os.close(fd)
    try:
        # Streams: a generated source and a hashing sink (the generic path).
        src = GeneratedSource(size)
        peak.reset()
        with open(paths['enc'], 'wb') as dst:
            kmf.encrypt_file(kek, src, dst)
        growth['encrypt'] = peak.growth_kib()
        sink = HashingSink()
        peak.reset()
        with open(paths['enc'], 'rb') as enc:
            kmf.decrypt_file(kek, enc, sink)
        growth['decrypt'] = peak.growth_kib()
        ok = sink.size == size and sink.digest.digest() == src.digest.digest()
        os.remove(paths['enc'])
        # Regular files on both sides (positional I/O with reader and writer threads).
        with open(paths['plain'], 'wb') as plain:
            source = GeneratedSource(size)
            while source.remaining:
                plain.write(source.read(BLOCK))
        peak.reset()
        with open(paths['plain'], 'rb') as fsrc, open(paths['enc2'], 'wb') as fdst:
            kmf.encrypt_file(kek, fsrc, fdst)
        growth['file_encrypt'] = peak.growth_kib()
        os.remove(paths['plain'])
        peak.reset()
        with open(paths['enc2'], 'rb') as fsrc, open(paths['out'], 'wb') as fdst:
            kmf.decrypt_file(kek, fsrc, fdst)
        growth['file_decrypt'] = peak.growth_kib()
        digest = hashlib.sha256()
        with open(paths['out'], 'rb') as out:
            for block in iter(lambda: out.read(BLOCK), b''):
                digest.update(block)
        ok = ok and digest.digest() == source.digest.digest()
    finally:
        for path in paths.values():
            if os.path.exists(path):
                os.remove(path)
    mib_of = lambda kib: round(kib / 1024, 1)  # noqa: E731
    result = {
        'size_mib': mib,
        'peak_source': peak.source,
        'baseline_mib': mib_of(baseline),
        'round_trip_ok': ok,
    }
    for name, kib in growth.items():
        result[name + '_growth_mib'] = mib_of(kib)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1024,
         sys.argv[2] if len(sys.argv) > 2 else None)
