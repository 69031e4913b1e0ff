"""Moving a ZODB application to a new key: the key ring of the key holder,
``kmi reencrypt-zodb --to NEW_KEK`` (on FileStorage, and through a real ZEO
server while an application keeps writing), then deactivating and
destroying the old key."""
import collections
import hashlib
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import transaction
import ZODB
import ZODB.FileStorage
import persistent.mapping
from zope.component import provideUtility

from keas.kmi import facility, interfaces, lifecycle, testing
from keas.kmi.facility import V2_MAGIC
from keas.kmi.keyholder import KeyHolder, KeyRing
from keas.kmi.persistent import decrypt_state, encrypt_state

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from persistent_model import Secret  # noqa: E402
import support  # noqa: E402
from support import KMI, KMI_ENV, free_port  # noqa: E402


def kmi(*args, check=True):
    """``support.kmi``, checked unless told otherwise."""
    return support.kmi(*args, check=check)


class Keys:
    """A master facility with an old and a new KEK, both in files."""

    def __init__(self, tmp_path, facility_class=facility.KeyManagementFacility):
        self.store = tmp_path / 'keys'
        self.kmf = facility_class(str(self.store))
        self.old, self.new = self.kmf.generate(), self.kmf.generate()
        self.old_file, self.new_file = tmp_path / 'old.pem', tmp_path / 'new.pem'
        self.old_file.write_bytes(self.old)
        self.new_file.write_bytes(self.new)
        self.old_kid, self.new_kid = self.kmf.kid(self.old), self.kmf.kid(self.new)

    def name(self, kek):
        from keas.kmi import _kmi
        return _kmi.kek_name(kek)

    def use(self, holder, data_format):
        """Register ``holder`` and the facility (writing ``data_format``)."""
        self.kmf.dataFormat = data_format
        provideUtility(self.kmf, interfaces.IEncryptionService)
        provideUtility(holder, interfaces.IKeyHolder)


@pytest.fixture
def keys(tmp_path, zca):
    return Keys(tmp_path)


def kid_of(state):
    encrypted = state[0]
    return encrypted[10:26] if encrypted[:8] == V2_MAGIC else None


# The key ring ---------------------------------------------------------------


def test_ring_writes_under_the_primary_and_reads_each_state_with_its_key(keys):
    state = {'name': 'Ann', 'ssn': '111'}
    keys.use(KeyRing(keys.old), 1)
    legacy = encrypt_state(state)
    keys.kmf.dataFormat = 2
    under_old = encrypt_state(state)
    assert kid_of(legacy) is None and kid_of(under_old) == keys.old_kid

    ring = KeyRing(keys.new, older=[keys.old], legacy=keys.old)
    keys.use(ring, 2)
    assert ring.key == ring.primary == keys.new
    under_new = encrypt_state(state)
    assert kid_of(under_new) == keys.new_kid
    for sealed in (legacy, under_old, under_new):
        assert decrypt_state(sealed) == state
    assert ring.getDecryptionKey(under_old[0], keys.kmf) == keys.old
    assert ring.getDecryptionKey(under_new[0], keys.kmf) == keys.new
    assert ring.getDecryptionKey(legacy[0], keys.kmf) == keys.old
    assert ring.kid(keys.kmf) == keys.new_kid
    assert ring.kid(keys.kmf, keys.old) == keys.old_kid


def test_a_ring_of_one_key_is_a_key_holder(keys, tmp_path):
    keys.use(KeyRing(keys.old), 1)
    legacy = encrypt_state({'a': 1})
    keys.kmf.dataFormat = 2
    v2 = encrypt_state({'a': 2})
    for holder in (KeyRing(keys.old), KeyHolder(str(keys.old_file))):
        keys.use(holder, 2)
        assert decrypt_state(legacy) == {'a': 1} and decrypt_state(v2) == {'a': 2}
    ring = KeyRing(keys.old)
    assert ring.legacy == keys.old and ring.older == () and ring.keys == (keys.old,)


def test_a_state_under_no_key_of_the_ring_is_a_value_error(keys, tmp_path):
    keys.use(KeyRing(keys.old), 2)
    sealed = encrypt_state({'a': 1})
    stranger = keys.kmf.generate()
    keys.use(KeyRing(keys.new, older=[stranger]), 2)
    with pytest.raises(ValueError, match=r'encrypted under another key \(kid %s\)'
                       % keys.old_kid.hex()):
        decrypt_state(sealed)
    # A key holder with one key says it too (the v2 check, unchanged).
    keys.use(KeyHolder(str(keys.new_file)), 2)
    with pytest.raises(ValueError, match='another key'):
        decrypt_state(sealed)


def test_the_ring_asks_the_service_once_per_key_and_only_when_needed(tmp_path, zca):
    asked = []

    class Counting(facility.KeyManagementFacility):
        def kid(self, key):
            asked.append(key)
            return super().kid(key)

    keys = Keys(tmp_path, Counting)
    keys.use(KeyRing(keys.old), 2)
    under_old = [encrypt_state({'i': i}) for i in range(50)]
    ring = KeyRing(keys.new, older=[keys.old])
    keys.use(ring, 2)
    under_new = [encrypt_state({'i': i}) for i in range(50)]
    del asked[:]
    for i, sealed in enumerate(under_new):
        assert decrypt_state(sealed) == {'i': i}
    assert asked == [keys.new]  # states under the primary never ask for the old key
    for i, sealed in enumerate(under_old + under_new):
        assert decrypt_state(sealed) == {'i': i % 50}
    assert asked == [keys.new, keys.old]


def test_a_destroyed_older_key_does_not_stop_the_ring(keys):
    keys.use(KeyRing(keys.old), 2)
    under_old = encrypt_state({'a': 'old'})
    ring = KeyRing(keys.new, older=[keys.old])
    keys.use(ring, 2)
    under_new = encrypt_state({'a': 'new'})
    name = keys.name(keys.old)
    keys.kmf.change_state(name, lifecycle.DEACTIVATED, 'rotated')
    assert decrypt_state(under_old) == {'a': 'old'}  # deactivated: still decrypts
    keys.kmf.change_state(name, lifecycle.DESTROYED, 'rotated')
    fresh = KeyRing(keys.new, older=[keys.old])
    keys.use(fresh, 2)
    assert decrypt_state(under_new) == {'a': 'new'}
    with pytest.raises(ValueError) as raised:
        decrypt_state(under_old)
    message = str(raised.value)
    assert 'encrypted under another key (kid %s)' % keys.old_kid.hex() in message
    assert name in message and 'destroyed' in message  # why that key could not say


def test_rewrapping_keeps_the_kid_and_the_data(keys):
    keys.use(KeyRing(keys.old), 1)
    legacy = encrypt_state({'a': 1})
    keys.kmf.dataFormat = 2
    v2 = encrypt_state({'a': 2})
    rewrapped = keys.kmf.rewrap(keys.old)
    assert keys.kmf.kid(rewrapped) == keys.old_kid
    keys.use(KeyRing(keys.new, older=[rewrapped], legacy=rewrapped), 2)
    assert decrypt_state(legacy) == {'a': 1} and decrypt_state(v2) == {'a': 2}


def test_ring_from_files(keys, tmp_path):
    ring = KeyRing.fromFiles(str(keys.new_file), [str(keys.old_file)], str(keys.old_file))
    assert (ring.key, ring.older, ring.legacy) == (keys.new, (keys.old,), keys.old)
    assert KeyRing.fromFiles(str(keys.new_file), str(keys.old_file)).older == (keys.old,)
    # The primary is never among the older keys, and each key counts once.
    assert KeyRing(keys.new, [keys.old, keys.new, keys.old]).older == (keys.old,)
    with pytest.raises(TypeError):
        KeyRing(keys.new, keys.old)
    assert interfaces.IKeyHolder.providedBy(ring)


def test_ring_over_a_local_facility(keys):
    """The kids come through any encryption service: here a client of the master."""
    local = facility.LocalKeyManagementFacility('http://localhost')
    testing.setupRestApi(local, keys.kmf)
    keys.use(KeyRing(keys.old), 2)
    under_old = encrypt_state({'a': 'old'})
    local.dataFormat = 2
    provideUtility(local, interfaces.IEncryptionService)
    provideUtility(KeyRing(keys.new, [keys.old]), interfaces.IKeyHolder)
    under_new = encrypt_state({'a': 'new'})
    assert kid_of(under_new) == keys.new_kid
    assert decrypt_state(under_old) == {'a': 'old'}
    assert decrypt_state(under_new) == {'a': 'new'}


# kmi reencrypt-zodb --to, on FileStorage --------------------------------------


def make_database(keys, path, legacy, v2_old, v2_new):
    """Secrets ``users[i]``: the first ``legacy`` in the legacy format under the
    old key, then ``v2_old`` in v2 under it, then ``v2_new`` under the new key.
    Each refers to the one before it."""
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    conn = db.open()
    users = conn.root()['users'] = persistent.mapping.PersistentMapping()
    prev = None
    i = 0
    for count, holder, fmt in ((legacy, KeyRing(keys.old), 1), (v2_old, KeyRing(keys.old), 2),
                               (v2_new, KeyRing(keys.new), 2)):
        keys.use(holder, fmt)
        for _ in range(count):
            s = users[i] = Secret('name%d' % i, 'ssn-%06d' % i)
            s.friend = prev
            prev = s
            i += 1
        transaction.commit()
    db.close()
    return i


def headers(path):
    """{oid: kid} of every stored Secret state (None for legacy)."""
    from keas.kmi.migrate import reachable_oids, stored_header
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=True))
    try:
        conn = db.open()
        found = {}
        for oid in reachable_oids(db.storage):
            header = stored_header(conn, oid)
            if header is not None:
                found[oid] = header[1]
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
            assert (s.friend is None) if i == 0 else (s.friend is users[i - 1])
        transaction.abort()
    finally:
        db.close()


def test_reencrypt_zodb_to_a_new_key_then_deactivate_and_destroy_the_old(keys, tmp_path):
    path = tmp_path / 'Data.fs'
    n = make_database(keys, path, 500, 300, 200)
    found = headers(path)
    assert list(found.values()).count(None) == 500
    assert list(found.values()).count(keys.old_kid) == 300
    old_name = keys.name(keys.old)
    # The old key may be deactivated before (or while) the migration runs:
    # it still decrypts.
    keys.kmf.change_state(old_name, lifecycle.DEACTIVATED, 'rotation to the new key')
    result = kmi('reencrypt-zodb', path, '--kek', keys.old_file, '--to', keys.new_file,
                 '--keys', keys.store, '--batch', 70)
    new, old = keys.new_kid.hex(), keys.old_kid.hex()
    assert '%d objects, 1000 encrypted: 800 re-encrypted to v2 under kid %s, 200 were ' \
        'under it already' % (n + 2, new) in result.stdout
    assert 'moved: 500 from legacy, 300 from kid %s' % old in result.stdout
    assert 'verified: %d objects load, 0 encrypted states still legacy, 0 under another ' \
        'kid than %s' % (n + 2, new) in result.stdout
    assert set(headers(path).values()) == {keys.new_kid}

    keys.kmf.change_state(old_name, lifecycle.DESTROYED, 'rotation done')
    assert keys.kmf.metadata(old_name)['state'] == lifecycle.DESTROYED
    with pytest.raises(lifecycle.KeyStateError, match='destroyed'):
        keys.kmf.getEncryptionKey(keys.old)
    # The new key alone reads everything, legacy refused.
    keys.use(KeyHolder(str(keys.new_file)), 2)
    keys.kmf.acceptLegacy = False
    check_contents(path, n)
    # A ring that still lists the old key reads everything too.
    keys.use(KeyRing(keys.new, [keys.old], legacy=keys.old), 2)
    check_contents(path, n)
    # Run again with the new key alone: nothing to move.
    again = kmi('reencrypt-zodb', path, '--kek', keys.new_file, '--keys', keys.store)
    assert '0 re-encrypted to v2 under kid %s, 1000 were under it already' % new \
        in again.stdout
    # The destroyed key is refused by the command, in one line.
    refused = kmi('reencrypt-zodb', path, '--kek', keys.old_file, '--to', keys.new_file,
                  '--keys', keys.store, check=False)
    assert refused.returncode == 1
    assert refused.stderr.count('\n') == 1 and 'destroyed' in refused.stderr


def test_reencrypt_zodb_from_several_old_keys(keys, tmp_path):
    path = tmp_path / 'Data.fs'
    third = keys.kmf.generate()
    (tmp_path / 'third.pem').write_bytes(third)
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    root = db.open().root()
    for i, (holder, fmt) in enumerate([(KeyRing(keys.old), 1), (KeyRing(keys.old), 2),
                                       (KeyRing(third), 2), (KeyRing(third), 2)]):
        keys.use(holder, fmt)
        root[i] = Secret('n%d' % i, 's%d' % i)
        transaction.commit()
    db.close()
    result = kmi('reencrypt-zodb', path, '--kek', keys.old_file, '--kek', tmp_path / 'third.pem',
                 '--to', keys.new_file, '--keys', keys.store)
    assert 'moved: 2 from kid %s, 1 from kid %s, 1 from legacy' % (
        keys.kmf.kid(third).hex(), keys.old_kid.hex()) in result.stdout
    assert set(headers(path).values()) == {keys.new_kid}
    # Without the third key, its states could not have been read.
    keys.use(KeyHolder(str(keys.new_file)), 2)
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=True))
    root = db.open().root()
    assert [root[i].ssn for i in range(4)] == ['s0', 's1', 's2', 's3']
    transaction.abort()
    db.close()


def test_reencrypt_zodb_to_refuses_a_key_that_cannot_encrypt(keys, tmp_path):
    path = tmp_path / 'Data.fs'
    make_database(keys, path, 5, 5, 0)
    before = headers(path)
    keys.kmf.change_state(keys.name(keys.new), lifecycle.DEACTIVATED, 'not this one')
    other = tmp_path / 'other.pem'
    other.write_bytes(facility.KeyManagementFacility(str(tmp_path / 'elsewhere')).generate())
    for to, message in ((keys.new_file, 'cannot be used to encrypt'),
                        (other, 'does not know the new KEK'),
                        (tmp_path / 'missing.pem', 'cannot read the KEK')):
        result = kmi('reencrypt-zodb', path, '--kek', keys.old_file, '--to', to,
                     '--keys', keys.store, check=False)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('kmi: ') and message in lines[0], \
            result.stderr
    assert headers(path) == before


@pytest.mark.slow
def test_reencrypt_zodb_to_killed_mid_run_and_run_again(keys, tmp_path):
    path = tmp_path / 'Data.fs'
    n = make_database(keys, path, 3000, 2000, 0)
    before = path.stat().st_size
    proc = subprocess.Popen(
        KMI + ['reencrypt-zodb', str(path), '--kek', str(keys.old_file),
               '--to', str(keys.new_file), '--keys', str(keys.store), '--batch', '100'],
        env=KMI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while path.stat().st_size == before and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = list(headers(path).values())
    assert 0 < found.count(keys.new_kid) < n, 'killed mid-run'
    keys.use(KeyRing(keys.new, [keys.old], legacy=keys.old), 2)
    check_contents(path, n)
    result = kmi('reencrypt-zodb', path, '--kek', keys.old_file, '--to', keys.new_file,
                 '--keys', keys.store)
    assert 'verified: %d objects load, 0 encrypted states still legacy, 0 under another ' \
        'kid' % (n + 2) in result.stdout
    assert set(headers(path).values()) == {keys.new_kid}
    check_contents(path, n)


def test_the_migrator_retries_a_batch_another_client_changed(keys, tmp_path):
    """A deterministic conflict: another connection commits a change to an
    object of the batch after the migrator's snapshot began."""
    from keas.kmi.migrate import _Migrator, stored_header
    path = tmp_path / 'Data.fs'
    n = make_database(keys, path, 10, 0, 0)
    keys.use(KeyRing(keys.new, [keys.old], legacy=keys.old), 2)
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    try:
        conn = db.open()
        users = conn.root()['users']
        counts = {'rewritten': 0, 'conflicts': 0, 'by others': 0}
        moved = collections.Counter()
        migrator = _Migrator(conn, keys.new_kid, counts, moved)
        for i in range(n):
            migrator.add(users[i]._p_oid, 'legacy')
        other_tm = transaction.TransactionManager()
        other = db.open(other_tm)
        other.root()['users'][3].ssn = 'changed by the application'
        other_tm.commit()
        migrator.flush()
        assert counts == {'rewritten': n - 1, 'conflicts': 1, 'by others': 1}
        assert moved == {'legacy': n - 1}
        transaction.abort()
        assert users[3].ssn == 'changed by the application'
        assert {stored_header(conn, users[i]._p_oid)[1] for i in range(n)} == {keys.new_kid}
        transaction.abort()
    finally:
        db.close()


# Through ZEO, while an application writes -----------------------------------


@pytest.fixture
def zeo_server(tmp_path):
    """runzeo on a free port over a FileStorage in tmp_path; its address."""
    runzeo = pathlib.Path(sys.executable).with_name('runzeo')
    for _ in range(5):
        port = free_port()
        log = open(tmp_path / 'zeo.log', 'wb')
        proc = subprocess.Popen([str(runzeo), '-a', '127.0.0.1:%d' % port,
                                 '-f', str(tmp_path / 'zeo.fs')],
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
        log.close()  # the port was taken meanwhile: another one
    else:
        pytest.fail('runzeo did not start: %s' % (tmp_path / 'zeo.log').read_text())
    yield ('127.0.0.1', port)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def initial(i):
    return 'ssn-%06d' % i


class Application(threading.Thread):
    """Keeps committing through its own ZEO connection until stopped: each
    transaction reads a few random Secrets (checking each has its last
    committed value), changes one, and sometimes adds one. Conflicts are
    retried, as an application does."""

    def __init__(self, address, n, seed=13):
        super().__init__(name='application', daemon=True)
        self.address, self.n = address, n
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.expected = {i: initial(i) for i in range(n)}
        self.commits = self.conflicts = self.created = self.reads = 0
        self.error = None

    def run(self):
        import ZEO
        from ZODB.POSException import ConflictError
        db = ZEO.DB(self.address)
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            # Bounded: stopped by the test, at the latest after 20000 commits.
            while not self.stop.is_set() and self.commits < 20000:
                keys = list(self.expected)
                target = self.random.choice(keys)
                value = 'v%d-%d' % (target, self.commits)
                sample = self.random.sample(keys, 5)
                add = self.random.random() < 0.2
                while True:
                    try:
                        tm.begin()
                        users = conn.root()['users']
                        for i in sample + [target]:
                            got = users[i].ssn
                            self.reads += 1
                            if got != self.expected[i]:
                                raise AssertionError('users[%d] is %r, last committed %r'
                                                     % (i, got, self.expected[i]))
                        users[target].ssn = value
                        if add:
                            new = self.n + self.created
                            users[new] = Secret('name%d' % new, initial(new))
                        tm.commit()
                        break
                    except ConflictError:
                        tm.abort()
                        self.conflicts += 1
                self.commits += 1
                self.expected[target] = value
                if add:
                    self.expected[self.n + self.created] = initial(self.n + self.created)
                    self.created += 1
        except BaseException as error:  # reported by the test
            self.error = error
            tm.abort()
        finally:
            conn.close()
            db.close()


def test_rotation_through_zeo_while_an_application_writes(keys, tmp_path, zeo_server):
    import ZEO
    from BTrees.IOBTree import IOBTree
    from keas.kmi.migrate import reachable_oids, stored_header

    n = 3000
    db = ZEO.DB(zeo_server)
    try:
        conn = db.open()
        users = conn.root()['users'] = IOBTree()
        for i in range(n):
            # Two thirds legacy, a third v2, all under the old key.
            if i in (0, 2000):
                transaction.commit()
                keys.use(KeyRing(keys.old), 1 if i == 0 else 2)
            users[i] = Secret('name%d' % i, initial(i))
        transaction.commit()
        conn.close()
    finally:
        db.close()
    conf = tmp_path / 'zeo.conf'
    conf.write_text('%%import ZEO\n<zodb>\n  <clientstorage>\n    server %s:%d\n'
                    '  </clientstorage>\n</zodb>\n' % zeo_server)

    # The application, already on the ring: writes under the new key,
    # reads under both.
    keys.use(KeyRing(keys.new, older=[keys.old], legacy=keys.old), 2)
    app = Application(zeo_server, n)
    app.start()
    try:
        while app.commits < 20 and app.is_alive():
            time.sleep(0.01)
        before = app.commits
        result = kmi('reencrypt-zodb', conf, '--kek', keys.old_file, '--to', keys.new_file,
                     '--keys', keys.store, '--batch', 50, check=False)
        during = app.commits - before
        time.sleep(0.2)  # a few more commits after the migration
    finally:
        app.stop.set()
        app.join(120)
    assert not app.is_alive()
    if app.error is not None:
        raise app.error
    print('application: %d commits (%d during the migration), %d conflicts retried, '
          '%d objects created, %d reads' % (app.commits, during, app.conflicts,
                                            app.created, app.reads))
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert during > 0, 'the application wrote while the migration ran'
    new = keys.new_kid.hex()
    # Each encrypted state was moved, found under the new key, or written
    # under it by the application after a conflict.
    counted = re.search(r'(\d+) encrypted: (\d+) re-encrypted to v2 under kid %s, (\d+) '
                        r'were under it already' % new, result.stdout)
    encrypted, moved, already = (int(x) for x in counted.groups())
    conflicts = re.search(r'(\d+) write conflicts with other clients, retried; (\d+) '
                          r'states they wrote', result.stdout)
    by_others = int(conflicts.group(2)) if conflicts else 0
    assert encrypted == moved + already + by_others
    assert encrypted >= n
    assert '0 encrypted states still legacy, 0 under another kid than %s' % new \
        in result.stdout

    # Nothing lost: every object has its last committed value, and every
    # state is under the new key; read with the new key alone.
    keys.use(KeyHolder(str(keys.new_file)), 2)
    keys.kmf.acceptLegacy = False
    db = ZEO.DB(zeo_server)
    try:
        conn = db.open()
        users = conn.root()['users']
        assert dict((i, users[i].ssn) for i in users.keys()) == app.expected
        assert len(app.expected) == n + app.created
        kids = set()
        for oid in reachable_oids(conn._storage):
            header = stored_header(conn, oid)
            if header is not None:
                kids.add(header[1])
        assert kids == {keys.new_kid}
        transaction.abort()
        conn.close()
    finally:
        db.close()

    # Then the old key goes: deactivated, destroyed; the database still loads.
    old_name = keys.name(keys.old)
    keys.kmf.change_state(old_name, lifecycle.DEACTIVATED, 'rotated')
    keys.kmf.change_state(old_name, lifecycle.DESTROYED, 'rotated')
    with pytest.raises(lifecycle.KeyStateError):
        keys.kmf.getEncryptionKey(keys.old)
    db = ZEO.DB(zeo_server)
    try:
        users = db.open().root()['users']
        assert dict((i, users[i].ssn) for i in users.keys()) == app.expected
        transaction.abort()
    finally:
        db.close()


def test_a_state_the_walk_missed_is_moved_after_the_verification(keys, tmp_path,
                                                                  monkeypatch, capsys):
    """As when another client moves an object from where the walk has not
    been to where it has: the verification finds it, it is moved, verified."""
    from keas.kmi import cli, migrate
    path = tmp_path / 'Data.fs'
    n = make_database(keys, path, 20, 0, 0)
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=True))
    hidden = db.open().root()['users'][5]._p_oid
    transaction.abort()
    db.close()
    walks = []
    real = migrate.reachable_oids

    def walk(storage):
        walks.append(storage)
        for oid in real(storage):
            if len(walks) > 1 or oid != hidden:
                yield oid

    monkeypatch.setattr(migrate, 'reachable_oids', walk)
    assert cli.main(['reencrypt-zodb', str(path), '--kek', str(keys.old_file),
                     '--to', str(keys.new_file), '--keys', str(keys.store)]) == 0
    out = capsys.readouterr().out
    assert '19 encrypted: 19 re-encrypted' in out
    assert 'the verification found 1 more states not under the new key' in out
    assert 'moved: 20 from legacy' in out
    assert 'verified: %d objects load, 0 encrypted states still legacy' % (n + 2) in out
    assert len(walks) == 3  # the walk, the verification that found it, the one after
    assert set(headers(path).values()) == {keys.new_kid}


def test_a_compromised_key_is_re_encrypted_only_with_the_flag(tmp_path, zca):
    from test_migrate import kmi, make_database, states
    from keas.kmi import facility, interfaces, keyholder
    from zope.component import provideUtility
    store = tmp_path / 'keys'
    kmf = facility.KeyManagementFacility(str(store))
    old, new = kmf.generate(), kmf.generate()
    (tmp_path / 'old.kek').write_bytes(old)
    (tmp_path / 'new.kek').write_bytes(new)
    provideUtility(kmf, interfaces.IEncryptionService)
    provideUtility(keyholder.KeyHolder(str(tmp_path / 'old.kek')))
    path = tmp_path / 'Data.fs'
    make_database(path, 20)
    kmf.change_state(hashlib.md5(old).hexdigest(), 'compromised', 'KEK leaked')
    args = ['reencrypt-zodb', path, '--kek', tmp_path / 'old.kek', '--to',
            tmp_path / 'new.kek', '--keys', store]
    refused = kmi(*args, check=False)
    assert refused.returncode == 1 and 'compromised' in refused.stderr
    done = kmi(*args, '--allow-compromised')
    assert 'verified: 22 objects load' in done.stdout
    assert len(set(states(path).values())) == 1
    via_server = kmi('reencrypt-zodb', path, '--kek', tmp_path / 'old.kek', '--keys',
                     'https://127.0.0.1:1', '--allow-compromised', check=False)
    assert via_server.returncode == 1 and 'key store' in via_server.stderr
