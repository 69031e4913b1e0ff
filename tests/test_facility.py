"""The master and local facilities: key generation, the store, caches, the
data cipher and the file format, as a keas.kmi user sees them."""
import base64
import hashlib
import io
import os
import re
import stat
import threading
import time

import pytest
from zope.interface import verify

from keas.kmi import _kmi, facility, interfaces, testing
from keas.kmi.store import KeyExistsError

PLAIN = b'Stephan Richter'


def test_interfaces(kmf):
    assert verify.verifyObject(interfaces.IExtendedKeyManagementFacility, kmf)
    assert interfaces.IExtendedKeyManagementFacility.extends(
        __import__('zope.interface.common.mapping', fromlist=['IMapping']).IMapping)
    local = facility.LocalKeyManagementFacility('https://kms.example')
    assert verify.verifyObject(interfaces.IKeyManagementFacility, local)


def test_generate_writes_legacy_pem_and_a_durable_dek(keyring):
    kmf, keks = keyring
    kek = keks[0]
    text = kek.decode('ascii')
    m = re.fullmatch(
        r'-----BEGIN RSA PRIVATE KEY-----\n'
        r'Proc-Type: 4,ENCRYPTED\n'
        r'DEK-Info: DES-EDE3-CBC,([0-9A-F]{16})\n\n'
        r'((?:[A-Za-z0-9+/=]{64}\n)*[A-Za-z0-9+/=]{1,64}\n)'
        r'-----END RSA PRIVATE KEY-----', text)
    assert m, text
    body = base64.b64decode(m.group(2))
    assert len(body) % 8 == 0
    name = hashlib.md5(kek).hexdigest()
    assert name in kmf and name in kmf.keys()
    assert len(kmf[name]) == 256
    path = os.path.join(kmf.storage_dir, name + '.dek')
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(kmf.getEncryptionKey(kek)) == kmf.keyLength == 128


def test_storage_directory_is_created_private(tmp_path):
    path = tmp_path / 'new' / 'keys'
    kmf = facility.KeyManagementFacility(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert repr(kmf) == '<KeyManagementFacility (0)>'


def test_mapping_api(kmf):
    kmf['abc'] = b'wrapped'
    assert kmf['abc'] == b'wrapped'
    assert kmf.get('abc') == b'wrapped'
    assert kmf.get('nope', 42) == 42
    assert list(kmf) == ['abc'] == kmf.keys()
    assert kmf.items() == [('abc', b'wrapped')]
    assert kmf.values() == [b'wrapped']
    assert len(kmf) == 1 and kmf.has_key('abc')
    assert repr(kmf) == '<KeyManagementFacility (1)>'
    del kmf['abc']
    assert 'abc' not in kmf
    with pytest.raises(KeyError):
        kmf['abc']
    with pytest.raises(KeyError):
        del kmf['abc']


@pytest.mark.parametrize('name', ['', '../x', 'a/b', '..', 'x\0y', '/etc/passwd', '.hidden'])
def test_names_outside_the_store_are_refused(kmf, tmp_path, name):
    assert name not in kmf
    with pytest.raises((KeyError, ValueError)):
        kmf[name]
    with pytest.raises((KeyError, ValueError)):
        kmf[name] = b'x'
    with pytest.raises((KeyError, ValueError)):
        del kmf[name]
    assert kmf.get(name) is None
    assert not (tmp_path / 'x.dek').exists()


def test_encrypt_is_deterministic_and_sized(keyring):
    kmf, keks = keyring
    for n in (0, 1, 15, 16, 17, 1000):
        data = os.urandom(n)
        enc = kmf.encrypt(keks[0], data)
        assert len(enc) == 16 * (n // 16 + 1)
        assert kmf.encrypt(keks[0], data) == enc
        assert kmf.decrypt(keks[0], enc) == data
    assert kmf.encrypt(keks[0], PLAIN) != kmf.encrypt(keks[1], PLAIN)


def test_bytes_like_inputs(keyring):
    kmf, keks = keyring
    enc = kmf.encrypt(keks[0], PLAIN)
    assert kmf.encrypt(keks[0], bytearray(PLAIN)) == enc
    assert kmf.encrypt(keks[0], memoryview(PLAIN)) == enc
    assert kmf.decrypt(keks[0], bytearray(enc)) == PLAIN
    with pytest.raises(TypeError):
        kmf.encrypt(keks[0], 'text')
    with pytest.raises(TypeError):
        kmf.decrypt(keks[0], None)


def test_encrypt_matches_the_formula(keyring, tmp_path):
    """AES-256-CBC, key md5-derived from the DEK, fixed IV (FORMATS.md 3), checked with openssl."""
    kmf, keks = keyring
    dek = kmf.getEncryptionKey(keks[0])
    salted = dek + b'12345678'
    d1 = hashlib.md5(salted).digest()
    key = d1 + hashlib.md5(d1 + salted).digest()
    assert _kmi.derive_key(dek, b'12345678') == key
    src = tmp_path / 'plain'
    src.write_bytes(PLAIN * 3)
    import subprocess
    expected = subprocess.run(
        ['openssl', 'enc', '-aes-256-cbc', '-K', key.hex(),
         '-iv', b'0123456789ABCDEF'.hex(), '-in', str(src)],
        check=True, capture_output=True).stdout
    assert kmf.encrypt(keks[0], PLAIN * 3) == expected


@pytest.mark.parametrize('bad', [
    b'', b'x', b'\0' * 15, b'\0' * 17,
])
def test_decrypt_of_non_ciphertexts_is_a_value_error(keyring, bad):
    kmf, keks = keyring
    with pytest.raises(ValueError):
        kmf.decrypt(keks[0], bad)


def test_decrypt_of_damaged_ciphertexts(keyring):
    kmf, keks = keyring
    enc = kmf.encrypt(keks[0], PLAIN * 4)
    with pytest.raises(ValueError):
        kmf.decrypt(keks[0], enc[:-1])
    with pytest.raises(ValueError):
        kmf.decrypt(keks[0], enc + b'x')
    # Flipping the last byte of the second-to-last block breaks the padding.
    damaged = bytearray(enc)
    damaged[-17] ^= 0x01
    with pytest.raises(ValueError):
        kmf.decrypt(keks[0], bytes(damaged))
    # Under another key the padding check fails (almost always: 255/256).
    other = [kmf.encrypt(keks[1], os.urandom(20)) for _ in range(20)]
    failures = 0
    for enc in other:
        try:
            kmf.decrypt(keks[0], enc)
        except ValueError:
            failures += 1
    assert failures >= 18


def test_unknown_and_unusable_keks(keyring, kmf):
    _, keks = keyring
    with pytest.raises(KeyError):
        kmf.getEncryptionKey(keks[0])  # known elsewhere, not here
    with pytest.raises(KeyError):
        kmf.encrypt(b'garbage', PLAIN)
    # A .dek under the garbage KEK's name: now the KEK itself is parsed.
    kmf[hashlib.md5(b'garbage').hexdigest()] = b'\0' * 256
    with pytest.raises(ValueError, match='PEM'):
        kmf.getEncryptionKey(b'garbage')


def test_corrupt_dek_file_names_the_key(keyring, kmf, storage_dir):
    _, keks = keyring
    source = keyring[0]
    name = hashlib.md5(keks[0]).hexdigest()
    good = source[name]
    path = os.path.join(storage_dir, name + '.dek')
    for bad in (good[:-1], good[:100], bytes(256), bytes([good[0] ^ 1]) + good[1:]):
        with open(path, 'wb') as f:  # damaged on disk, behind the store's back
            f.write(bad)
        kmf._KeyManagementFacility__dek_cache.clear()
        with pytest.raises(ValueError, match='key ' + name):
            kmf.getEncryptionKey(keks[0])


def test_keys_are_written_once(kmf, storage_dir):
    kmf['abc'] = b'wrapped'
    kmf['abc'] = b'wrapped'  # the same bytes again: a repeated copy
    with pytest.raises(KeyExistsError, match='written once'):
        kmf['abc'] = b'other'
    with pytest.raises(ValueError):
        kmf['abc'] = b'other'
    assert kmf['abc'] == b'wrapped'
    assert sorted(os.listdir(storage_dir)) == ['abc.dek']
    del kmf['abc']
    kmf['abc'] = b'other'
    assert kmf['abc'] == b'other'


def test_wrong_passphrase_is_a_value_error(keyring, storage_dir):
    source, keks = keyring
    name = hashlib.md5(keks[0]).hexdigest()
    kmf = facility.KeyManagementFacility(storage_dir)
    kmf.rsaPassphrase = 'not the passphrase'
    kmf[name] = source[name]
    with pytest.raises(ValueError, match='passphrase'):
        kmf.getEncryptionKey(keks[0])


def test_dek_cache_view_and_timeout(keyring):
    source, keks = keyring
    kmf = facility.KeyManagementFacility(source.storage_dir)
    name = hashlib.md5(keks[0]).hexdigest()
    cache = kmf._KeyManagementFacility__dek_cache
    assert name not in cache
    dek = kmf.getEncryptionKey(keks[0])
    first, cached = cache[name]
    assert cached == dek and first <= time.time()
    kmf.encrypt(keks[0], PLAIN)
    assert cache[name][0] == first  # served from the cache
    kmf.timeout = 0
    kmf.decrypt(keks[0], kmf.encrypt(keks[0], PLAIN))
    assert cache[name][0] > first
    assert dict(cache) == {name: cache[name]}
    del cache[name]
    assert len(cache) == 0


def test_dek_cache_is_bounded(keyring):
    source, keks = keyring

    class Small(facility.KeyManagementFacility):
        maxCachedKeys = 2

    kmf = Small(source.storage_dir)
    for kek in keks:
        kmf.getEncryptionKey(kek)
        assert len(kmf._KeyManagementFacility__dek_cache) <= 2


def test_subclass_overrides_change_what_encrypt_uses(keyring, storage_dir):
    source, keks = keyring
    fixed = b'k' * 32

    class Fixed(facility.KeyManagementFacility):
        def getEncryptionKey(self, key):
            return fixed

    kmf = Fixed(storage_dir)
    expected = _kmi.encrypt(_kmi.derive_key(fixed, b'12345678'), b'0123456789ABCDEF', PLAIN)
    assert kmf.encrypt(b'anything', PLAIN) == expected
    assert kmf.decrypt(b'anything', expected) == PLAIN

    class Salted(facility.KeyManagementFacility):
        _bytesToKeySalt = b'87654321'
        initializationVector = b'F' * 16

    salted = Salted(source.storage_dir)
    dek = source.getEncryptionKey(keks[0])
    assert salted.encrypt(keks[0], PLAIN) == _kmi.encrypt(
        _kmi.derive_key(dek, b'87654321'), b'F' * 16, PLAIN)
    assert salted.encrypt(keks[0], PLAIN) != source.encrypt(keks[0], PLAIN)


def test_subclass_key_sizes(storage_dir):
    class Small(facility.KeyManagementFacility):
        rsaKeyLength = 1024
        keyLength = 64
        rsaPassphrase = b'bytes work too'

    kmf = Small(storage_dir)
    kek = kmf.generate()
    assert len(kmf[hashlib.md5(kek).hexdigest()]) == 128
    assert len(kmf.getEncryptionKey(kek)) == 64


def test_testing_facility_and_holder(storage_dir):
    kmf = testing.TestingKeyManagementFacility(storage_dir)
    kek = kmf.generate()
    assert kek == testing.KeyEncyptingKey == testing.TestingKeyHolder.key
    assert len(kmf.getEncryptionKey(kek)) == 32
    assert kmf.decrypt(kek, kmf.encrypt(kek, PLAIN)) == PLAIN


def test_key_holder_reads_its_file(tmp_path):
    from keas.kmi.keyholder import KeyHolder
    path = tmp_path / 'kek.pem'
    path.write_bytes(testing.KeyEncyptingKey)
    holder = KeyHolder(str(path))
    assert verify.verifyObject(interfaces.IKeyHolder, holder)
    assert holder.key == testing.KeyEncyptingKey


# Files

class TrickleReader(io.RawIOBase):
    """A pipe-like reader that returns at most a few bytes per read."""

    def __init__(self, data):
        self._data = io.BytesIO(data)
        self._n = 0

    def readable(self):
        return True

    def read(self, n=-1):
        self._n = self._n % 7 + 1
        return self._data.read(min(n, self._n) if n and n > 0 else self._n)


@pytest.mark.parametrize('size', [0, 1, 15, 16, 17, 24 * 1024 - 1, 24 * 1024, 100_000])
@pytest.mark.parametrize('chunksize', [16, 1000, 24 * 1024, 64 * 1024])
def test_file_round_trip(keyring, size, chunksize):
    kmf, keks = keyring
    data = os.urandom(size)
    enc = io.BytesIO(b'prefix')
    enc.seek(0, io.SEEK_END)
    kmf.encrypt_file(keks[0], io.BytesIO(data), enc, chunksize)
    assert enc.tell() == len(enc.getvalue())
    raw = enc.getvalue()[6:]
    assert int.from_bytes(raw[:8], 'little') == size
    assert len(raw) == 24 + -(-size // 16) * 16
    src = io.BytesIO(raw)
    out = io.BytesIO()
    kmf.decrypt_file(keks[0], src, out, chunksize)
    assert out.getvalue() == data


def test_file_output_does_not_depend_on_reads(keyring, monkeypatch):
    kmf, keks = keyring
    data = os.urandom(5000)
    outputs = set()
    for reader in (io.BytesIO(data), TrickleReader(data)):
        for chunksize in (16, 1024, 24 * 1024):
            if isinstance(reader, io.BytesIO):
                reader.seek(0)
            else:
                reader = TrickleReader(data)
            out = io.BytesIO()
            kmf.encrypt_file(keks[0], reader, out, chunksize)
            # Replace the random IV by re-encrypting: compare everything but it.
            value = out.getvalue()
            dec = io.BytesIO()
            kmf.decrypt_file(keks[0], io.BytesIO(value), dec)
            assert dec.getvalue() == data
            outputs.add(len(value))
    assert outputs == {24 + 5008}


def test_damaged_files_are_value_errors(keyring):
    kmf, keks = keyring
    out = io.BytesIO()
    kmf.encrypt_file(keks[0], io.BytesIO(b'x' * 1000), out)
    good = out.getvalue()
    damaged = [good[:10], good[:-1], good[:-16], good + b'\0' * 15,
               bytes([1]) + good[1:]]
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF
    damaged.append(bytes(flipped))
    for bad in damaged:
        with pytest.raises(ValueError):
            kmf.decrypt_file(keks[0], io.BytesIO(bad), io.BytesIO())
    # Whole blocks after the stated size are an old file's tail: read as the
    # reference reads them (test_differential checks that it does).
    back = io.BytesIO()
    kmf.decrypt_file(keks[0], io.BytesIO(good + b'\0' * 32), back)
    assert back.getvalue() == b'x' * 1000


def test_real_files(keyring, tmp_path):
    kmf, keks = keyring
    data = os.urandom(300_000)
    (tmp_path / 'plain').write_bytes(data)
    with open(tmp_path / 'plain', 'rb') as src, open(tmp_path / 'enc', 'wb') as dst:
        kmf.encrypt_file(keks[0], src, dst)
    with open(tmp_path / 'enc', 'rb') as src, open(tmp_path / 'out', 'wb') as dst:
        kmf.decrypt_file(keks[0], src, dst)
    assert (tmp_path / 'out').read_bytes() == data


# Threads

def test_generate_releases_the_gil(storage_dir):
    kmf = facility.KeyManagementFacility(storage_dir)
    ticks = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    try:
        before = len(ticks)
        for _ in range(3):
            kmf.generate()
        during = len(ticks) - before
    finally:
        done.set()
        t.join()
    # Keygen takes tens of milliseconds; with the GIL held the ticker could not run.
    assert during >= 10


def test_threads_share_one_facility(keyring):
    source, keks = keyring
    kmf = facility.KeyManagementFacility(source.storage_dir)
    kmf.timeout = 0.01
    errors = []

    def work(i):
        try:
            for j in range(200):
                kek = keks[(i + j) % len(keks)]
                data = b'%d-%d' % (i, j)
                assert kmf.decrypt(kek, kmf.encrypt(kek, data)) == data
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# The local facility over the in-process fake connection

def test_local_facility_over_fake_connection(keyring):
    master, keks = keyring
    local = facility.LocalKeyManagementFacility('https://kms.example/keys')
    testing.setupRestApi(local, master)
    assert local.httpsConnFactory is local.httpConnFactory
    assert local.decrypt(keks[0], master.encrypt(keks[0], PLAIN)) == PLAIN
    assert keks[0] in local._LocalKeyManagementFacility__cache
    with pytest.raises(KeyError):
        local.getEncryptionKey(b'no such key')
    assert repr(local) == "<LocalKeyManagementFacility 'https://kms.example/keys'>"


def test_local_facility_uses_the_factory_of_the_scheme(keyring):
    master, keks = keyring
    seen = []

    def factory(scheme):
        base = type('Fake', (testing.FakeHTTPConnection,), {'context': master})

        def make(host, **kwargs):
            seen.append((scheme, host, sorted(kwargs)))
            return base(host, **kwargs)
        return make

    for url, scheme in (('http://a:1', 'http'), ('https://b:2', 'https')):
        local = facility.LocalKeyManagementFacility(url)
        local.httpConnFactory = factory('http')
        local.httpsConnFactory = factory('https')
        local.getEncryptionKey(keks[1])
        assert seen[-1][0] == scheme
    assert seen[-1] == ('https', 'b:2', ['context', 'timeout'])
    with pytest.raises(ValueError):
        facility.LocalKeyManagementFacility('ftp://x').generate()


def test_local_facility_reports_unreachable_servers():
    local = facility.LocalKeyManagementFacility('http://127.0.0.1:9', connect_timeout=2)
    with pytest.raises(facility.KeyServiceError):
        local.generate()
