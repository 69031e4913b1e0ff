"""Nothing lost: keys survive SIGKILL mid-generation and concurrent writers,
and absurd KEKs fail fast with ValueError."""
import base64
import hashlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from keas.kmi import facility

GENERATOR = textwrap.dedent('''
    import base64, sys
    from keas.kmi.facility import KeyManagementFacility

    class Fast(KeyManagementFacility):
        rsaKeyLength = 1024
        keyLength = 64

    kmf = Fast(sys.argv[1])
    for _ in range(int(sys.argv[2])):
        kek = kmf.generate()
        # generate() returned: the DEK must be durable from here on.
        sys.stdout.write(base64.b64encode(kek).decode() + '\\n')
        sys.stdout.flush()
''')


class Fast(facility.KeyManagementFacility):
    rsaKeyLength = 1024
    keyLength = 64


def spawn(storage_dir, count):
    return subprocess.Popen([sys.executable, '-c', GENERATOR, storage_dir, str(count)],
                            stdout=subprocess.PIPE, text=True)


def returned_keks(out):
    return [base64.b64decode(line) for line in out.splitlines() if line.strip()]


def check_store(storage_dir, keks):
    kmf = Fast(storage_dir)
    names = kmf.keys()
    assert not [n for n in names if n.startswith('.')], names
    for name in names:
        wrapped = kmf[name]
        assert len(wrapped) == 128, (name, len(wrapped))  # never partial or empty
    for kek in keks:
        name = hashlib.md5(kek).hexdigest()
        assert name in kmf
        assert len(kmf.getEncryptionKey(kek)) == 64
    return names


def test_sigkill_mid_generation_loses_nothing(storage_dir):
    rng = random.Random(1234)
    keks = []
    for _ in range(12):
        proc = spawn(storage_dir, 1000)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        keks.extend(returned_keks(out))
    names = check_store(storage_dir, keks)
    # Keys generated but killed before they were returned may also be there,
    # whole; every returned one is.
    assert len(names) >= len(keks) > 0


def test_processes_generating_into_one_directory(storage_dir):
    procs = [spawn(storage_dir, 4) for _ in range(4)]
    keks = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        keks.extend(returned_keks(out))
    assert len(keks) == 16
    names = check_store(storage_dir, keks)
    assert len(names) == 16


def der_int(value):
    body = value.to_bytes(value.bit_length() // 8 + 1, 'big')
    return b'\x02' + der_len(len(body)) + body


def der_len(n):
    if n < 128:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, 'big')
    return bytes([0x80 | len(raw)]) + raw


def pem(label, der):
    b64 = base64.b64encode(der).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return ('-----BEGIN %s-----\n%s\n-----END %s-----\n'
            % (label, '\n'.join(lines), label)).encode()


def test_absurd_modulus_is_refused(kmf):
    n = (1 << 100_000) - 1
    fields = [0, n, 65537, n - 2, (1 << 50_000) - 1, (1 << 50_000) - 3, 1, 1, 1]
    body = b''.join(der_int(v) for v in fields)
    kek = pem('RSA PRIVATE KEY', b'\x30' + der_len(len(body)) + body)
    kmf[hashlib.md5(kek).hexdigest()] = b'\0' * 12_500
    with pytest.raises(ValueError, match='limit'):
        kmf.getEncryptionKey(kek)


@pytest.mark.parametrize('kek', [
    b'', b'\0' * 100, b'-----BEGIN RSA PRIVATE KEY-----\n',
    b'-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----',
    b'-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----',
])
def test_garbage_keks_are_value_errors(kmf, kek):
    kmf[hashlib.md5(kek).hexdigest()] = b'\0' * 256
    with pytest.raises(ValueError):
        kmf.getEncryptionKey(kek)
    with pytest.raises(ValueError):
        kmf.encrypt(kek, b'data')
