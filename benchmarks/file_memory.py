"""Peak memory of encrypt_file / decrypt_file on a generated 1 GiB stream.

Usage: python benchmarks/file_memory.py [MiB] [workdir]

Streams MiB of generated data through encrypt_file into a real file, then
decrypt_file from that file into a hashing sink, and prints the peak RSS
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
    fd, path = tempfile.mkstemp(dir=workdir, suffix='.enc')
    os.close(fd)
    try:
        src = GeneratedSource(size)
        with open(path, 'wb') as dst:
            kmf.encrypt_file(kek, src, dst)
        after_encrypt = peak_kib()
        sink = HashingSink()
        with open(path, 'rb') as enc:
            kmf.decrypt_file(kek, enc, sink)
        after_decrypt = peak_kib()
        ok = sink.size == size and sink.digest.digest() == src.digest.digest()
    finally:
        os.remove(path)
    result = {
        'size_mib': mib,
        'baseline_mib': round(baseline / 1024, 1),
        'encrypt_growth_mib': round((after_encrypt - baseline) / 1024, 1),
        'decrypt_growth_mib': round((after_decrypt - baseline) / 1024, 1),
        'round_trip_ok': ok,
    }
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1024,
         sys.argv[2] if len(sys.argv) > 2 else None)
