"""Hypothesis properties of the cipher, the file format and the KEK reader:
round trips hold, and bad input is an exception, never a crash or a hang."""
import hashlib
import os
import io

from hypothesis import HealthCheck, given, settings, strategies as st

from keas.kmi import _kmi, testing

KEY = _kmi.derive_key(b'd' * 32, b'12345678')
IV = b'0123456789ABCDEF'
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.binary(max_size=5000))
def test_string_round_trip(data):
    enc = _kmi.encrypt(KEY, IV, data)
    assert len(enc) == 16 * (len(data) // 16 + 1)
    assert _kmi.decrypt(KEY, IV, enc) == data


@SETTINGS
@given(st.binary(max_size=2000))
def test_decrypt_of_arbitrary_bytes_never_crashes(data):
    try:
        out = _kmi.decrypt(KEY, IV, data)
    except ValueError:
        return
    # Without an integrity check some garbage decrypts; it re-encrypts to itself.
    assert _kmi.encrypt(KEY, IV, out) == data


class Pieces(io.RawIOBase):
    """Returns the data in the given piece sizes, like a pipe."""

    def __init__(self, data, sizes):
        self._data = data
        self._sizes = sizes or [7]
        self._i = 0

    def readable(self):
        return True

    def read(self, n=-1):
        size = self._sizes[self._i % len(self._sizes)]
        self._i += 1
        size = max(1, min(size, n if n > 0 else size))
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk


@SETTINGS
@given(st.binary(max_size=3000), st.sampled_from([16, 100, 1024, 24 * 1024]),
       st.lists(st.integers(1, 600), max_size=5))
def test_file_round_trip_with_any_read_pattern(data, chunksize, sizes):
    enc = io.BytesIO()
    _kmi.encrypt_file(KEY, Pieces(data, sizes), enc, chunksize)
    raw = enc.getvalue()
    assert len(raw) == 24 + -(-len(data) // 16) * 16
    out = io.BytesIO()
    _kmi.decrypt_file(KEY, Pieces(raw, sizes), out, chunksize)
    assert out.getvalue() == data


@SETTINGS
@given(st.binary(max_size=600))
def test_decrypt_file_of_arbitrary_bytes_never_crashes(data):
    out = io.BytesIO()
    try:
        _kmi.decrypt_file(KEY, io.BytesIO(data), out)
    except ValueError:
        return
    assert len(out.getvalue()) == int.from_bytes(data[:8], 'little')


@SETTINGS
@given(st.binary(max_size=1500) | st.text(max_size=1500).map(str.encode))
def test_kek_reader_rejects_garbage(storage_dir, kek):
    kmf = testing.TestingKeyManagementFacility(storage_dir)
    name = hashlib.md5(kek).hexdigest()
    kmf[name] = testing.EncryptedEncryptionKey
    try:
        dek = kmf.getEncryptionKey(kek)
    except ValueError:
        return
    finally:
        del kmf[name]
    assert kek == testing.KeyEncyptingKey or dek  # only a real key unwraps


@SETTINGS
@given(st.integers(0, len(testing.KeyEncyptingKey) - 1), st.integers(1, 255))
def test_damaged_testing_kek_never_yields_a_wrong_dek(storage_dir, pos, flip):
    kmf = testing.TestingKeyManagementFacility(storage_dir)
    good = kmf.getEncryptionKey(testing.KeyEncyptingKey)
    kek = bytearray(testing.KeyEncyptingKey)
    kek[pos] ^= flip
    kek = bytes(kek)
    name = hashlib.md5(kek).hexdigest()
    kmf[name] = testing.EncryptedEncryptionKey
    try:
        assert kmf.getEncryptionKey(kek) == good
    except ValueError:
        pass
    finally:
        del kmf[name]


@SETTINGS
@given(st.binary(min_size=64, max_size=64))
def test_damaged_dek_files_never_yield_a_wrong_dek(storage_dir, wrapped):
    kmf = testing.TestingKeyManagementFacility(storage_dir)
    good = kmf.getEncryptionKey(testing.KeyEncyptingKey)
    kmf._KeyManagementFacility__dek_cache.clear()
    name = hashlib.md5(testing.KeyEncyptingKey).hexdigest()
    # Keys are written once: damage the file on disk, as a failing disk would.
    path = os.path.join(storage_dir, name + '.dek')
    with open(path, 'wb') as f:
        f.write(wrapped)
    try:
        dek = kmf.getEncryptionKey(testing.KeyEncyptingKey)
    except ValueError:
        return
    finally:
        with open(path, 'wb') as f:
            f.write(testing.EncryptedEncryptionKey)
    # Only a re-randomised wrapping of the same DEK may succeed.
    assert dek == good or wrapped == testing.EncryptedEncryptionKey
