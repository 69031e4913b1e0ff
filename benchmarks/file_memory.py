"""Peak memory of encrypt_file / decrypt_file on a generated 1 GiB stream.

Usage: python benchmarks/file_memory.py [MiB] [workdir]

Streams MiB of generated data through encrypt_file into a real file, then
decrypt_file from that file into a hashing sink; then the same between
regular files on both sides (the positional-I/O path). Prints the peak RSS
growth over the interpreter's baseline (ru_maxrss) for each, as JSON. The
plaintext is never held whole: the source makes it block by block.
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


def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(mib=1024, workdir=None):
    size = mib << 20
    kmf = testing.TestingKeyManagementFacility(tempfile.mkdtemp())
    kek = kmf.generate()
    kmf.getEncryptionKey(kek)
    baseline = peak_kib()
    paths = {}
    for name in ('enc', 'plain', 'enc2', 'out'):
        fd, paths[name] = tempfile.mkstemp(dir=workdir, suffix='.' + name)
        os.close(fd)
    try:
        # Streams: a generated source and a hashing sink (the generic path).
        src = GeneratedSource(size)
        with open(paths['enc'], 'wb') as dst:
            kmf.encrypt_file(kek, src, dst)
        after_encrypt = peak_kib()
        sink = HashingSink()
        with open(paths['enc'], 'rb') as enc:
            kmf.decrypt_file(kek, enc, sink)
        after_decrypt = peak_kib()
        ok = sink.size == size and sink.digest.digest() == src.digest.digest()
        os.remove(paths['enc'])
        # Regular files on both sides (positional I/O with reader and writer threads).
        with open(paths['plain'], 'wb') as plain:
            source = GeneratedSource(size)
            while source.remaining:
                plain.write(source.read(BLOCK))
        files_baseline = peak_kib()
        with open(paths['plain'], 'rb') as fsrc, open(paths['enc2'], 'wb') as fdst:
            kmf.encrypt_file(kek, fsrc, fdst)
        after_file_encrypt = peak_kib()
        os.remove(paths['plain'])
        with open(paths['enc2'], 'rb') as fsrc, open(paths['out'], 'wb') as fdst:
            kmf.decrypt_file(kek, fsrc, fdst)
        after_file_decrypt = peak_kib()
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
        'baseline_mib': mib_of(baseline),
        'encrypt_growth_mib': mib_of(after_encrypt - baseline),
        'decrypt_growth_mib': mib_of(after_decrypt - baseline),
        'file_encrypt_growth_mib': mib_of(after_file_encrypt - files_baseline),
        'file_decrypt_growth_mib': mib_of(after_file_decrypt - files_baseline),
        'round_trip_ok': ok,
    }
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1024,
         sys.argv[2] if len(sys.argv) > 2 else None)
