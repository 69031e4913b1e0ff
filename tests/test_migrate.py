"""``kmi reencrypt-zodb`` and ``kmi reencrypt-file``: real FileStorage
databases and real files, through the installed ``kmi`` command, killed
with SIGKILL mid-run and run again."""
import io
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import transaction
import ZODB
import ZODB.FileStorage
import persistent.mapping
from zope.component import provideUtility

from keas.kmi import facility, interfaces, keyholder
from keas.kmi.facility import V2_MAGIC

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from persistent_model import Secret  # noqa: E402
import support  # noqa: E402
from support import KMI, KMI_ENV  # noqa: E402


def kmi(*args, check=True):
    """``support.kmi``, checked unless told otherwise."""
    return support.kmi(*args, check=check)


@pytest.fixture
def keys(tmp_path, zca):
    """A master facility writing legacy, registered as the ZODB services."""
    store = tmp_path / 'keys'
    kmf = facility.KeyManagementFacility(str(store))
    kek = kmf.generate()
    (tmp_path / 'kek.pem').write_bytes(kek)
    provideUtility(kmf, interfaces.IEncryptionService)
    provideUtility(keyholder.KeyHolder(str(tmp_path / 'kek.pem')))
    return kmf, kek, store, tmp_path / 'kek.pem'


def make_database(path, n):
    """``n`` Secrets in a mapping, each referring to the one before (cross
    references between encrypted objects), plus a plain mapping between."""
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    conn = db.open()
    root = conn.root()
    users = root['users'] = persistent.mapping.PersistentMapping()
    prev = None
    for i in range(n):
        s = Secret('name%d' % i, 'ssn-%06d' % i)
        s.friend = prev
        s.folder = users
        users[i] = s
        prev = s
        if i % 1000 == 999:
            transaction.commit()
    transaction.commit()
    db.close()


def states(path):
    """The format of every stored Secret state: {oid: 1 or 2}."""
    from keas.kmi.migrate import reachable_oids, stored_format
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=True))
    try:
        conn = db.open()
        found = {}
        for oid in reachable_oids(db.storage):
            fmt = stored_format(conn, oid)
            if fmt is not None:
                found[oid] = fmt
        transaction.abort()
        return found
    finally:
        db.close()


def check_contents(path, n):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=True))
    try:
        users = db.open().root()['users']
        assert len(users) == n
        for i in range(n):
            s = users[i]
            assert (s.name, s.ssn) == ('name%d' % i, 'ssn-%06d' % i)
            assert s.folder is users
            assert (s.friend is None) if i == 0 else (s.friend is users[i - 1])
        transaction.abort()
    finally:
        db.close()


def test_reencrypt_zodb_moves_every_state_to_v2(keys, tmp_path):
    kmf, kek, store, kek_file = keys
    path = tmp_path / 'Data.fs'
    make_database(path, 2000)
    assert set(states(path).values()) == {1}
    result = kmi('reencrypt-zodb', path, '--kek', kek_file, '--keys', store, '--batch', 300)
    assert '2000 encrypted: 2000 re-encrypted to v2' in result.stdout
    assert 'verified: 2002 objects load, 0 encrypted states still legacy' in result.stdout
    assert '2002/2002' in result.stderr  # the progress bar
    found = states(path)
    assert len(found) == 2000 and set(found.values()) == {2}
    kmf.dataFormat = 2
    kmf.acceptLegacy = False  # step 4 of the migration: legacy refused
    check_contents(path, 2000)
    again = kmi('reencrypt-zodb', path, '--kek', kek_file, '--keys', store)
    assert '0 re-encrypted to v2 under kid %s, 2000 were under it already' \
        % kmf.kid(kek).hex() in again.stdout


def test_reencrypt_zodb_killed_mid_run_and_run_again(keys, tmp_path):
    kmf, kek, store, kek_file = keys
    path = tmp_path / 'Data.fs'
    n = 6000
    make_database(path, n)
    before = path.stat().st_size
    for delay in (0.0, 0.3):
        proc = subprocess.Popen(
            KMI + ['reencrypt-zodb', str(path), '--kek', str(kek_file),
                   '--keys', str(store), '--batch', '100'],
            env=KMI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill it once it has committed something, and before it is done.
        deadline = time.time() + 120
        while path.stat().st_size == before and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = path.stat().st_size
    found = states(path)
    assert 0 < sum(1 for f in found.values() if f == 2) < n, 'killed mid-run'
    check_contents(path, n)  # every object reads, in either format
    result = kmi('reencrypt-zodb', path, '--kek', kek_file, '--keys', store)
    assert 'verified: %d objects load, 0 encrypted states still legacy' % (n + 2) \
        in result.stdout
    assert set(states(path).values()) == {2}
    check_contents(path, n)


def test_reencrypt_zodb_errors_are_one_line(keys, tmp_path):
    kmf, kek, store, kek_file = keys
    path = tmp_path / 'Data.fs'
    make_database(path, 10)
    other = tmp_path / 'other.pem'
    other.write_bytes(facility.KeyManagementFacility(str(tmp_path / 'elsewhere')).generate())
    for args, message in (
            ((tmp_path / 'missing.fs', '--kek', kek_file, '--keys', store), 'no such database'),
            ((path, '--kek', tmp_path / 'nope.pem', '--keys', store), 'cannot read the KEK'),
            ((path, '--kek', other, '--keys', store), 'does not know'),
            ((path, '--kek', kek_file, '--keys', tmp_path / 'nokeys'), 'no such key storage'),
            ((path, '--kek', kek_file, '--keys', 'https://127.0.0.1:1'), 'cannot'),
    ):
        result = kmi('reencrypt-zodb', *args, check=False)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('kmi: ') and message in lines[0], \
            result.stderr
    assert set(states(path).values()) == {1}


def test_reencrypt_zodb_through_a_zconfig_file(keys, tmp_path):
    kmf, kek, store, kek_file = keys
    path = tmp_path / 'Data.fs'
    make_database(path, 50)
    conf = tmp_path / 'zodb.conf'
    conf.write_text('<zodb>\n  <filestorage>\n    path %s\n  </filestorage>\n</zodb>\n' % path)
    result = kmi('reencrypt-zodb', conf, '--kek', kek_file, '--keys', store)
    assert '50 re-encrypted to v2' in result.stdout
    assert set(states(path).values()) == {2}


def test_reencrypt_file(keys, tmp_path):
    kmf, kek, store, kek_file = keys
    plain = os.urandom(300_000)
    with open(tmp_path / 'doc.enc', 'wb') as out:
        kmf.encrypt_file(kek, io.BytesIO(plain), out)
    result = kmi('reencrypt-file', tmp_path / 'doc.enc', tmp_path / 'doc.v2',
                 '--kek', kek_file, '--keys', store)
    assert 'verified' in result.stdout
    sealed = (tmp_path / 'doc.v2').read_bytes()
    assert sealed[:8] == V2_MAGIC
    out = io.BytesIO()
    kmf.decrypt_file(kek, io.BytesIO(sealed), out)
    assert out.getvalue() == plain
    # In place, and a second time it says the file is v2 already.
    kmi('reencrypt-file', tmp_path / 'doc.enc', tmp_path / 'doc.enc',
        '--kek', kek_file, '--keys', store)
    assert (tmp_path / 'doc.enc').read_bytes()[:8] == V2_MAGIC
    again = kmi('reencrypt-file', tmp_path / 'doc.enc', tmp_path / 'doc.enc',
                '--kek', kek_file, '--keys', store, check=False)
    assert again.returncode == 1 and 'v2 format already' in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.kmi')) == []


def test_reencrypt_file_of_a_damaged_file_leaves_nothing(keys, tmp_path):
    kmf, kek, store, kek_file = keys
    with open(tmp_path / 'doc.enc', 'wb') as out:
        kmf.encrypt_file(kek, io.BytesIO(os.urandom(100_000)), out)
    data = (tmp_path / 'doc.enc').read_bytes()
    (tmp_path / 'doc.enc').write_bytes(data[:-5])
    result = kmi('reencrypt-file', tmp_path / 'doc.enc', tmp_path / 'doc.v2',
                 '--kek', kek_file, '--keys', store, check=False)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()[-1:]) == 1
    assert 'truncated' in result.stderr
    assert not (tmp_path / 'doc.v2').exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.kmi')]
