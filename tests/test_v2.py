"""The v2 authenticated format (FORMATS.md 7) through the Python API.

Known answers from the shared vectors, round trips at every size around the
16 KiB chunk boundaries (hypothesis), and every kind of damage: each must be
a ValueError that says what happened, never a wrong plaintext.
"""
import io
import json
import os
import pathlib
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keas.kmi import _kmi, facility, testing
from keas.kmi.facility import V2_MAGIC

VECTORS = pathlib.Path(__file__).parent / 'vectors' / 'v2.json'
SHARED_VECTORS = pathlib.Path(__file__).resolve().parent.parent.parent / 'shared' / 'vectors' / 'v2.json'
CHUNK = 16384
SEALED_CHUNK = CHUNK + 16
BOUNDARY_SIZES = [0, 1, 16383, 16384, 16385, 32768, 32769]
KEK = testing.KeyEncyptingKey


def vectors():
    return json.loads(VECTORS.read_text())


def test_the_vectors_copy_is_the_shared_one():
    if SHARED_VECTORS.exists():
        assert json.loads(SHARED_VECTORS.read_text()) == vectors()


@pytest.mark.parametrize('vector', vectors(), ids=lambda v: v['name'])
def test_known_answers(vector):
    dek, salt, ad, plain, kid, sealed = (
        bytes.fromhex(vector[k]) for k in
        ('dek', 'salt', 'associated_data', 'plaintext', 'kid', 'ciphertext'))
    key = _kmi.V2Key(dek)
    assert key.kid == kid
    assert key.seal(plain, ad, _salt=salt) == sealed
    assert key.open(sealed, ad) == plain
    # The same through a facility whose DEK is the vector's.
    service = DekService(dek)
    assert service.decrypt(b'kek', sealed, ad) == plain
    out = io.BytesIO()
    service.decrypt_file(b'kek', io.BytesIO(sealed), out, associated_data=ad)
    assert out.getvalue() == plain


class DekService(facility.EncryptionService):
    """An encryption service over one given DEK."""

    def __init__(self, dek):
        self.dek = dek

    def getEncryptionKey(self, key):
        return self.dek


@pytest.fixture
def kmf(tmp_path):
    service = testing.TestingKeyManagementFacility(str(tmp_path / 'keys'))
    service.dataFormat = 2
    return service


def test_sizes_and_layout(kmf):
    blob = kmf.encrypt(KEK, b'Stephan Richter')
    assert len(blob) == 113
    assert blob[:8] == V2_MAGIC and blob[8:10] == b'\x02\x01'
    assert blob[10:26] == _kmi.V2Key(kmf.getEncryptionKey(KEK)).kid
    assert len(kmf.encrypt(KEK, b'')) == 98
    assert kmf.encrypt(KEK, b'x') != kmf.encrypt(KEK, b'x'), 'a fresh salt each time'


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from(BOUNDARY_SIZES) | st.integers(0, 3 * CHUNK),
       ad=st.one_of(st.just(b''), st.binary(min_size=1, max_size=64)),
       seed=st.binary(min_size=1, max_size=8))
def test_round_trips(kmf, size, ad, seed):
    plain = (seed * (size // len(seed) + 1))[:size]
    blob = kmf.encrypt(KEK, plain, ad)
    n = len(plain)
    assert len(blob) == 82 + n + 16 * (n // CHUNK + 1)
    assert kmf.decrypt(KEK, blob, ad) == plain
    assert kmf.decrypt(KEK, bytearray(blob), ad) == plain
    assert kmf.decrypt(KEK, memoryview(blob), associated_data=ad) == plain
    out = io.BytesIO()
    kmf.encrypt_file(KEK, io.BytesIO(plain), out, associated_data=ad)
    assert len(out.getvalue()) == len(blob)
    out.seek(0)
    back = io.BytesIO()
    kmf.decrypt_file(KEK, out, back, associated_data=ad)
    assert back.getvalue() == plain


@pytest.mark.parametrize('size', BOUNDARY_SIZES + [5 * CHUNK + 3, (4 << 20) + 7])
def test_files_round_trip_between_regular_files_and_streams(kmf, tmp_path, size):
    plain = os.urandom(size)
    src = tmp_path / 'plain'
    src.write_bytes(b'PRE' + plain)
    with open(src, 'rb') as fsrc, open(tmp_path / 'enc', 'wb') as fdst:
        fdst.write(b'HEADER')
        fsrc.seek(3)
        kmf.encrypt_file(KEK, fsrc, fdst, chunksize=1000)
        assert fsrc.tell() == 3 + size
        assert fdst.tell() == 6 + 82 + size + 16 * (size // CHUNK + 1)
    sealed = (tmp_path / 'enc').read_bytes()[6:]
    assert kmf.decrypt(KEK, sealed) == plain
    with open(tmp_path / 'enc', 'rb') as fsrc, open(tmp_path / 'out', 'wb') as fdst:
        fsrc.seek(6)
        kmf.decrypt_file(KEK, fsrc, fdst)
    assert (tmp_path / 'out').read_bytes() == plain
    # A pipe: not seekable, short reads; the format check reads ahead.
    r, w = os.pipe()
    writer = threading.Thread(target=_write_all, args=(w, sealed))
    writer.start()
    out = io.BytesIO()
    with open(r, 'rb', buffering=0) as pipe:
        kmf.decrypt_file(KEK, pipe, out)
    writer.join()
    assert out.getvalue() == plain


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)


def refused(kmf, blob, ad=b'', match=None):
    with pytest.raises(ValueError, match=match):
        kmf.decrypt(KEK, blob, ad)
    out = io.BytesIO(b'before')
    out.seek(6)
    with pytest.raises(ValueError, match=match):
        kmf.decrypt_file(KEK, io.BytesIO(blob), out, associated_data=ad)
    assert out.getvalue() == b'before', 'unverified plaintext left behind'


def test_every_single_byte_change_of_a_small_message_is_refused(kmf):
    blob = kmf.encrypt(KEK, b'Stephan Richter', b'ad')
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            # A changed magic makes it "legacy", which does not decrypt either.
            with pytest.raises(ValueError):
                kmf.decrypt(KEK, bytes(bad), b'ad' if i >= 8 else b'')


@pytest.fixture(scope='module')
def three_chunks():
    service = DekService(os.urandom(128))
    service.dataFormat = 2
    plain = os.urandom(2 * CHUNK + 100)
    return service, plain, service.encrypt(b'kek', plain, b'ad')


def test_each_header_field_changed(three_chunks):
    service, plain, blob = three_chunks
    for at, why in ((8, 'unsupported v2 version or suite'),
                    (9, 'unsupported v2 version or suite'),
                    (10, 'another key'), (25, 'another key'),
                    (26, 'header altered'), (49, 'header altered'),
                    (50, 'header altered'), (81, 'header altered')):
        bad = bytearray(blob)
        bad[at] ^= 0x10
        refused(service, bytes(bad), b'ad', why)
    bad = bytearray(blob)
    bad[0] ^= 1  # no magic: taken for legacy data, which it is not
    with pytest.raises(ValueError, match='legacy'):
        service.decrypt(b'kek', bytes(bad), b'ad')
    with pytest.raises(ValueError):
        service.decrypt(b'kek', bytes(bad))


def test_damaged_chunks_name_the_chunk(three_chunks):
    service, plain, blob = three_chunks
    for at, chunk in ((82, 0), (82 + SEALED_CHUNK + 5, 1), (len(blob) - 1, 2)):
        bad = bytearray(blob)
        bad[at] ^= 1
        refused(service, bytes(bad), b'ad', 'chunk %d' % chunk)


def test_truncation_extension_and_reordering(three_chunks):
    service, plain, blob = three_chunks
    for cut in (82, 97, 82 + SEALED_CHUNK, 82 + 2 * SEALED_CHUNK):
        refused(service, blob[:cut], b'ad', 'truncated')
    for cut in (8, 20, 50):
        refused(service, blob[:cut], b'ad', 'truncated')
    refused(service, blob[:82 + 1000], b'ad', 'chunk 0')
    refused(service, blob[:-1], b'ad', 'chunk 2')
    refused(service, blob + bytes(16), b'ad')
    refused(service, blob + blob[82:82 + SEALED_CHUNK], b'ad')
    first, second = (blob[82:82 + SEALED_CHUNK],
                     blob[82 + SEALED_CHUNK:82 + 2 * SEALED_CHUNK])
    rest = blob[82 + 2 * SEALED_CHUNK:]
    refused(service, blob[:82] + second + first + rest, b'ad', 'chunk 0')
    refused(service, blob[:82] + first + first + rest, b'ad', 'chunk 1')


def test_associated_data_and_another_dek(three_chunks):
    service, plain, blob = three_chunks
    refused(service, blob, b'', 'other associated data')
    refused(service, blob, b'ae', 'other associated data')
    other = DekService(os.urandom(128))
    refused(other, blob, b'ad', 'encrypted under another key')


def test_decrypt_file_truncates_a_regular_destination_on_failure(three_chunks, tmp_path):
    service, plain, blob = three_chunks
    damaged = bytearray(blob)
    damaged[-1] ^= 1  # the last chunk: the first two are written first
    (tmp_path / 'enc').write_bytes(bytes(damaged))
    with open(tmp_path / 'out', 'wb') as out:
        out.write(b'kept')
        with open(tmp_path / 'enc', 'rb') as src, pytest.raises(ValueError, match='chunk 2'):
            service.decrypt_file(b'kek', src, out, associated_data=b'ad')
    assert (tmp_path / 'out').read_bytes() == b'kept'
    # Cut at a chunk boundary: every chunk present verifies, the end does not.
    (tmp_path / 'enc').write_bytes(blob[:82 + 2 * SEALED_CHUNK])
    with open(tmp_path / 'out', 'wb') as out:
        with open(tmp_path / 'enc', 'rb') as src, pytest.raises(ValueError, match='truncated'):
            service.decrypt_file(b'kek', src, out, associated_data=b'ad')
    assert (tmp_path / 'out').read_bytes() == b''


def test_data_format_on_class_and_instance(tmp_path):
    class V2Facility(testing.TestingKeyManagementFacility):
        dataFormat = 2

    v2 = V2Facility(str(tmp_path / 'a'))
    legacy = testing.TestingKeyManagementFacility(str(tmp_path / 'b'))
    assert v2.encrypt(KEK, b'x')[:8] == V2_MAGIC
    assert legacy.encrypt(KEK, b'x')[:8] != V2_MAGIC
    legacy.dataFormat = 2
    assert legacy.encrypt(KEK, b'x')[:8] == V2_MAGIC
    legacy.dataFormat = 3
    with pytest.raises(ValueError, match='dataFormat'):
        legacy.encrypt(KEK, b'x')


def test_both_formats_read_whatever_the_data_format(kmf):
    v2 = kmf.encrypt(KEK, b'secret')
    kmf.dataFormat = 1
    old = kmf.encrypt(KEK, b'secret')
    assert len(old) == 16
    for fmt in (1, 2):
        kmf.dataFormat = fmt
        assert kmf.decrypt(KEK, v2) == kmf.decrypt(KEK, old) == b'secret'


def test_accept_legacy_false_refuses_planted_legacy_data(kmf):
    kmf.dataFormat = 1
    old = kmf.encrypt(KEK, b'secret')
    out = io.BytesIO()
    kmf.encrypt_file(KEK, io.BytesIO(b'file'), out)
    kmf.acceptLegacy = False
    with pytest.raises(ValueError, match='acceptLegacy'):
        kmf.decrypt(KEK, old)
    out.seek(0)
    with pytest.raises(ValueError, match='acceptLegacy'):
        kmf.decrypt_file(KEK, out, io.BytesIO())
    kmf.dataFormat = 2
    assert kmf.decrypt(KEK, kmf.encrypt(KEK, b'new')) == b'new'


def test_associated_data_with_the_legacy_format_is_an_error(kmf):
    kmf.dataFormat = 1
    with pytest.raises(ValueError, match='associated data'):
        kmf.encrypt(KEK, b'x', b'ad')
    with pytest.raises(ValueError, match='associated data'):
        kmf.encrypt_file(KEK, io.BytesIO(b'x'), io.BytesIO(), associated_data=b'ad')
    old = kmf.encrypt(KEK, b'x')
    with pytest.raises(ValueError, match='associated data'):
        kmf.decrypt(KEK, old, b'ad')


def test_the_local_facility_seals_locally(tmp_path):
    master = testing.TestingKeyManagementFacility(str(tmp_path / 'keys'))
    local = facility.LocalKeyManagementFacility('https://kms.example')
    testing.setupRestApi(local, master)
    local.dataFormat = 2
    blob = local.encrypt(KEK, b'secret', b'ad')
    assert blob[:8] == V2_MAGIC
    assert master.decrypt(KEK, blob, b'ad') == b'secret'
    assert local.decrypt(KEK, blob, b'ad') == b'secret'
    with pytest.raises(ValueError, match='associated data'):
        local.decrypt(KEK, blob)
    out = io.BytesIO()
    local.encrypt_file(KEK, io.BytesIO(b'file data'), out, associated_data=b'f')
    out.seek(0)
    back = io.BytesIO()
    master.decrypt_file(KEK, out, back, associated_data=b'f')
    assert back.getvalue() == b'file data'


def test_a_subclass_with_its_own_get_encryption_key(tmp_path):
    class Custom(facility.KeyManagementFacility):
        def getEncryptionKey(self, key):
            return b'k' * 128

    custom = Custom(str(tmp_path / 'keys'))
    custom.dataFormat = 2
    blob = custom.encrypt(b'anything', b'x')
    assert _kmi.V2Key(b'k' * 128).open(blob) == b'x'
    assert custom.decrypt(b'anything', blob) == b'x'


def test_large_inputs_release_the_gil(kmf):
    kmf.getEncryptionKey(KEK)
    big = bytes(64 << 20)
    ticks = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(1)
            done.wait(0.0005)

    t = threading.Thread(target=tick)
    t.start()
    try:
        for _ in range(3):
            before = len(ticks)
            assert kmf.decrypt(KEK, kmf.encrypt(KEK, big)) == big
    finally:
        done.set()
        t.join()
    assert len(ticks) > before, 'the other thread never ran'
