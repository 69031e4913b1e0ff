"""The key stores (issue 12): the same behaviour on a directory and on PostgreSQL.

The mapping tests run on both stores. The PostgreSQL ones use a real server
(tests/pgcluster.py): the schema and its versions, concurrent first starts,
timeouts, a restart, TLS with a test CA, libpq's environment, and the
least-privilege roles of the README, run as the README gives them.
"""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keas.kmi import _kmi
from keas.kmi.facility import KeyManagementFacility
from keas.kmi.store import KeyExistsError, StoreUnavailable, open_store
from support import free_port
from support import md5hex

REPO = Path(__file__).resolve().parent.parent


def pg():
    from keas.kmi import pgstore
    return pgstore


@pytest.fixture
def store(store_location):
    s = open_store(store_location)
    yield s
    s.close()


def put_raw(location, name, data, cluster=None):
    """Overwrite what a store holds under ``name``, behind its back."""
    if location.startswith('postgresql://'):
        dbname = location.rsplit('/', 1)[1].split('?')[0]
        # Past the trigger that keeps keys written once (as an attacker
        # who owns the table could).
        for statement, params in (('ALTER TABLE kmi.keys DISABLE TRIGGER USER', None), (
                'UPDATE kmi.keys SET wrapped = %s WHERE name = %s', [data, name]), (
                'ALTER TABLE kmi.keys ENABLE TRIGGER USER', None)):
            cluster.execute(statement, params, dbname=dbname)
    else:
        with open(os.path.join(location, name + '.dek'), 'wb') as f:
            f.write(data)


# The mapping API, on both stores ------------------------------------------------


def test_a_new_store_is_empty(store):
    assert store.names() == []
    assert len(store) == 0
    assert 'abc' not in store
    with pytest.raises(KeyError):
        store.get('abc')


def test_add_get_names_delete(store):
    store.add('abc', b'wrapped one')
    store.add('def', bytearray(b'wrapped two'))
    assert store.get('abc') == b'wrapped one'
    assert store.get('def') == b'wrapped two'
    assert sorted(store.names()) == ['abc', 'def']
    assert len(store) == 2
    assert 'abc' in store and 'xyz' not in store
    store.delete('abc')
    assert 'abc' not in store
    assert store.names() == ['def']
    with pytest.raises(KeyError):
        store.get('abc')
    with pytest.raises(KeyError):
        store.delete('abc')


def test_keys_are_written_once(store):
    store.add('abc', b'first')
    store.add('abc', b'first')  # the same bytes again: success (a repeated copy)
    with pytest.raises(KeyExistsError) as info:
        store.add('abc', b'second')
    assert isinstance(info.value, ValueError)
    assert 'abc' in str(info.value)
    assert store.get('abc') == b'first'
    # Deleted, a name can be used again.
    store.delete('abc')
    store.add('abc', b'second')
    assert store.get('abc') == b'second'


@pytest.mark.parametrize('name', ['', '../x', 'a/b', '.hidden', 'a\0b', 'a\\b', '\udcff'])
def test_names_neither_store_can_hold_are_key_errors(store, name):
    with pytest.raises(KeyError):
        store.add(name, b'x')
    with pytest.raises(KeyError):
        store.get(name)
    with pytest.raises(KeyError):
        store.delete(name)
    assert name not in store
    assert store.names() == []


@pytest.mark.parametrize('name', [None, 12, b'abc'])
def test_names_that_are_not_strings(store, name):
    with pytest.raises(KeyError):
        store.get(name)
    with pytest.raises(KeyError):
        store.delete(name)
    assert name not in store


def test_unicode_names_and_odd_values(store):
    store.add('clé-ü', b'')
    store.add('zero', b'\0' * 300)
    assert store.get('clé-ü') == b''
    assert store.get('zero') == b'\0' * 300
    assert sorted(store.names()) == ['clé-ü', 'zero']


def test_facility_over_each_store(store_location):
    kmf = KeyManagementFacility(store_location)
    kek = kmf.generate()
    name = md5hex(kek)
    assert kmf.keys() == [name] and name in kmf and len(kmf) == 1
    dek = kmf.getEncryptionKey(kek)
    assert len(dek) == 128
    # Another facility (another process, another machine) reads the same DEK.
    other = KeyManagementFacility(store_location)
    assert other.getEncryptionKey(kek) == dek
    assert other.decrypt(kek, kmf.encrypt(kek, b'secret data')) == b'secret data'
    assert kmf[name] == other[name] and kmf.get('nope') is None
    assert dict(other.items()) == {name: kmf[name]}
    # The mapping writes once.
    with pytest.raises(KeyExistsError):
        other[name] = b'other bytes'
    other[name] = kmf[name]
    del other[name]
    assert name not in kmf
    with pytest.raises(KeyError):
        other.getEncryptionKey(kek)
    with pytest.raises(KeyError):
        del other[name]


def test_unknown_and_unreadable_keks(store_location):
    kmf = KeyManagementFacility(store_location)
    with pytest.raises(KeyError):
        kmf.getEncryptionKey(b'-----BEGIN RSA PRIVATE KEY-----\nnot one\n')
    # A known name whose KEK cannot be read: ValueError, not a DEK.
    kmf['e3b0'] = b'x' * 256
    kek = b'not a PEM at all'
    kmf2 = KeyManagementFacility(store_location)
    kmf2[md5hex(kek)] = b'x' * 256
    with pytest.raises(ValueError):
        kmf2.getEncryptionKey(kek)


def test_the_dek_cache_and_timeout_are_the_same(store_location):
    kmf = KeyManagementFacility(store_location)
    kek = kmf.generate()
    dek = kmf.getEncryptionKey(kek)
    KeyManagementFacility(store_location).store.delete(md5hex(kek))
    assert kmf.getEncryptionKey(kek) == dek  # cached for `timeout` seconds
    kmf.timeout = 0
    with pytest.raises(KeyError):
        kmf.getEncryptionKey(kek)


CORRUPTIONS = {
    'one bit flipped': lambda w: w[:100] + bytes([w[100] ^ 1]) + w[101:],
    'truncated': lambda w: w[:-1],
    'extended': lambda w: w + b'\0',
    'empty': lambda w: b'',
    'zeros': lambda w: bytes(len(w)),
}


@pytest.fixture(scope='module')
def two_keks(tmp_path_factory):
    """Two KEKs and their wrapped DEKs, made once for the corruption tests."""
    kmf = KeyManagementFacility(str(tmp_path_factory.mktemp('two-keks')))
    keks = [kmf.generate(), kmf.generate()]
    return [(kek, kmf[md5hex(kek)], kmf.getEncryptionKey(kek)) for kek in keks]


@pytest.mark.parametrize('how', sorted(CORRUPTIONS) + ['another key'])
def test_a_corrupt_stored_key_is_a_value_error_naming_it(store_location, two_keks, how,
                                                         request):
    (kek, wrapped, dek), (_, other_wrapped, _) = two_keks
    name = md5hex(kek)
    cluster = (request.getfixturevalue('pg_cluster')
               if store_location.startswith('postgresql') else None)
    kmf = KeyManagementFacility(store_location)
    kmf[name] = wrapped
    bad = other_wrapped if how == 'another key' else CORRUPTIONS[how](wrapped)
    put_raw(store_location, name, bad, cluster)
    fresh = KeyManagementFacility(store_location)
    assert fresh[name] == bad
    with pytest.raises(ValueError) as info:
        fresh.getEncryptionKey(kek)
    assert name in str(info.value)
    with pytest.raises(ValueError):
        fresh.encrypt(kek, b'data')
    # Restored, the same facility serves the right DEK: nothing wrong was cached.
    put_raw(store_location, name, wrapped, cluster)
    assert fresh.getEncryptionKey(kek) == dek


# PostgreSQL: the schema ------------------------------------------------------------


def test_schema_is_created_on_first_use(pg_cluster, pg_database, pg_url):
    assert pg_cluster.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'kmi'",
                              dbname=pg_database) == []
    store = open_store(pg_url)
    assert store.version() == 2 == pg().SCHEMA_VERSION
    columns = pg_cluster.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'kmi' AND table_name = 'keys' ORDER BY ordinal_position",
        dbname=pg_database)
    assert columns == [('name', 'text', 'NO'), ('wrapped', 'bytea', 'YES'),
                       ('created', 'timestamp with time zone', 'NO'),
                       ('state', 'text', 'NO'), ('kid', 'bytea', 'YES'),
                       ('kek_fingerprint', 'bytea', 'YES'), ('transitions', 'jsonb', 'NO'),
                       ('details', 'jsonb', 'NO')]
    primary = pg_cluster.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'kmi.keys'::regclass"
        " AND i.indisprimary", dbname=pg_database)
    assert primary == [('name',)]
    versions = pg_cluster.execute('SELECT version, software FROM kmi.schema_version',
                                  dbname=pg_database)
    assert [v for v, _ in sorted(versions)] == [1, 2] and versions[0][1].startswith('keas.kmi')
    store.add('abc', b'x')
    created = pg_cluster.execute("SELECT created > now() - interval '1 hour'"
                                 " FROM kmi.keys", dbname=pg_database)
    assert created == [(True,)]
    # Nothing outside its own schema.
    tables = pg_cluster.execute(
        "SELECT table_schema, table_name FROM information_schema.tables"
        " WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 2",
        dbname=pg_database)
    assert tables == [('kmi', 'audit'), ('kmi', 'audit_spool'), ('kmi', 'keys'),
                      ('kmi', 'schema_version')]
    store.close()


def test_a_schema_of_your_choice(pg_cluster, pg_database, pg_url):
    a = open_store(pg_url + '?schema=tenant_a')
    b = open_store(pg_url, schema='Tenant B')
    a.add('abc', b'in a')
    b.add('abc', b'in b')
    assert a.get('abc') == b'in a' and b.get('abc') == b'in b'
    assert pg_cluster.execute('SELECT wrapped FROM "Tenant B".keys',
                              dbname=pg_database) == [(b'in b',)]


def test_settings_from_the_url_and_keywords(pg_url):
    store = open_store(pg_url + '?statement_timeout=2.5&pool_max_size=3&connect_timeout=7',
                       pool_max_size=4)
    settings = store._settings
    assert (settings.statement_timeout, settings.pool_max_size) == (2.5, 4)
    assert 'connect_timeout=7' in settings.conninfo
    with store._db.pool.connection() as conn:
        assert conn.execute('SHOW statement_timeout').fetchone()[0] == '2500ms'
        assert conn.execute('SHOW synchronous_commit').fetchone()[0] == 'on'
    with pytest.raises(ValueError):
        open_store(pg_url, pool_max_size=0)
    with pytest.raises(ValueError):
        open_store(pg_url + '?statement_timeout=soon')
    with pytest.raises(ValueError):
        open_store(pg_url, colour='blue')
    with pytest.raises(ValueError):
        open_store('postgresql://host/db?no_such_libpq_setting=1')


def test_synchronous_commit_is_on_whatever_the_database_says(pg_cluster, pg_database,
                                                             pg_url):
    pg_cluster.execute('ALTER DATABASE "%s" SET synchronous_commit = off' % pg_database)
    store = open_store(pg_url)
    with store._db.pool.connection() as conn:
        assert conn.execute('SHOW synchronous_commit').fetchone()[0] == 'on'


MIGRATE_AT = """
import sys, time
from keas.kmi.store import open_store
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
store = open_store(sys.argv[1])
store.add('key-%s' % sys.argv[3], b'x')
print(store.version())
"""


def test_servers_starting_together_migrate_once(pg_cluster, pg_database, pg_url):
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, '-c', MIGRATE_AT, pg_url, str(start), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outs
    assert [out.strip() for out, _ in outs] == ['2'] * 6
    assert pg_cluster.execute('SELECT version FROM kmi.schema_version ORDER BY 1',
                              dbname=pg_database) == [(1,), (2,)]
    assert len(open_store(pg_url)) == 6


APPEND_AT = """
import sys, threading, time
from keas.kmi.store import open_store
start = float(sys.argv[2])
store = open_store(sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
def appends():
    for i in range(100):
        store.audit(event='fetch' if i % 5 else 'state', name=sys.argv[3], outcome='ok')
threads = [threading.Thread(target=appends) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_processes_and_threads_extend_one_audit_chain(pg_cluster, pg_database, pg_url):
    open_store(pg_url).close()
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, '-c', APPEND_AT, pg_url, str(start), 'p%d' % i],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    store = open_store(pg_url)
    count, _, broken = store.audit_log().verify()
    assert broken is None and count == 1200
    assert [e['seq'] for e in store.audit_log().tail(0)] == list(range(1, 1201))
    assert sorted(set(e['name'] for e in store.audit_log().tail(0))) == ['p0', 'p1', 'p2', 'p3']
    store.close()


def test_a_version_1_schema_is_upgraded_and_keeps_its_keys(pg_cluster, pg_database,
                                                          pg_url, monkeypatch):
    # A database a keas.kmi of schema version 1 (issue 12) filled.
    pgstore = pg()
    real = pgstore.MIGRATIONS
    monkeypatch.setattr(pgstore, 'MIGRATIONS', real[:1])
    monkeypatch.setattr(pgstore, 'SCHEMA_VERSION', 1)
    open_store(pg_url).close()
    pg_cluster.execute("INSERT INTO kmi.keys (name, wrapped) VALUES ('abc', 'kept')",
                       dbname=pg_database)
    pgstore._Database.close_all()
    # This keas.kmi (version 2: key states and the audit log) upgrades it.
    monkeypatch.setattr(pgstore, 'MIGRATIONS', real)
    monkeypatch.setattr(pgstore, 'SCHEMA_VERSION', len(real))
    upgraded = open_store(pg_url)
    assert upgraded.version() == 2
    assert upgraded.get('abc') == b'kept'
    assert upgraded.meta('abc')['state'] == 'active'
    assert pg_cluster.execute('SELECT name, state FROM kmi.keys',
                              dbname=pg_database) == [('abc', 'active')]
    assert [v for v, in pg_cluster.execute('SELECT version FROM kmi.schema_version'
                                           ' ORDER BY 1', dbname=pg_database)] == [1, 2]
    upgraded.close()
    pgstore._Database.close_all()
    # An appended step is all a version 3 takes.
    step = "ALTER TABLE {schema}.keys ADD COLUMN note text NOT NULL DEFAULT ''"
    monkeypatch.setattr(pgstore, 'MIGRATIONS', real + (step,))
    monkeypatch.setattr(pgstore, 'SCHEMA_VERSION', len(real) + 1)
    newer = open_store(pg_url)
    assert newer.version() == 3 and newer.get('abc') == b'kept'
    newer.close()
    pgstore._Database.close_all()
    # And this keas.kmi, which knows only version 2, refuses a version 3 schema.
    monkeypatch.setattr(pgstore, 'MIGRATIONS', real)
    monkeypatch.setattr(pgstore, 'SCHEMA_VERSION', len(real))
    with pytest.raises(pgstore.SchemaVersionError, match='version 3, newer than'):
        open_store(pg_url)


def test_kmi_store_migrate(pg_cluster, pg_database, pg_url):
    kmi = [sys.executable, '-m', 'keas.kmi.cli', 'store', 'migrate']
    first = subprocess.run([*kmi, pg_url], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert 'upgraded from version 0 to 2' in first.stdout
    again = subprocess.run([*kmi, pg_url], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and 'at version 2, up to date' in again.stdout


def test_stores_of_one_process_share_a_pool(pg_url):
    a, b = open_store(pg_url), open_store(pg_url)
    assert a._db is b._db
    a.add('abc', b'x')
    a.close()
    assert b.get('abc') == b'x'
    with pytest.raises(ValueError):
        a.get('abc')
    b.close()
    assert b._db.pool.closed
    c = open_store(pg_url)
    assert c._db is not b._db and c.get('abc') == b'x'


# PostgreSQL: faults -----------------------------------------------------------------


def test_unreachable_database_is_one_clear_error():
    url = 'postgresql://kmi@127.0.0.1:%d/kmi' % free_port()
    with pytest.raises(StoreUnavailable) as info:
        open_store(url)
    message = str(info.value)
    assert '\n' not in message
    assert 'cannot connect to the key database postgresql://kmi@127.0.0.1' in message
    assert 'refused' in message
    with pytest.raises(StoreUnavailable):
        KeyManagementFacility(url)


def test_a_password_never_shows_in_errors():
    url = 'postgresql://kmi:s3cret@127.0.0.1:%d/kmi' % free_port()
    with pytest.raises(StoreUnavailable) as info:
        open_store(url)
    assert 's3cret' not in str(info.value) and 'kmi:***@' in str(info.value)


def test_a_server_that_never_answers_times_out_on_connect():
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(8)  # accepts the TCP connection, then says nothing
    try:
        url = 'postgresql://kmi@127.0.0.1:%d/kmi?connect_timeout=2' % listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match='timeout'):
            open_store(url)
        assert time.monotonic() - t0 < 60  # it returns: no hang
    finally:
        listener.close()


def test_statement_timeout_is_store_unavailable_and_the_pool_survives(pg_cluster,
                                                                      pg_database, pg_url):
    store = open_store(pg_url, statement_timeout=0.5)
    store.add('abc', b'x')
    locker = pg_cluster.connect(pg_database)
    try:
        locker.execute('BEGIN')
        locker.execute('LOCK TABLE kmi.keys IN ACCESS EXCLUSIVE MODE')
        with pytest.raises(StoreUnavailable, match='statement timeout'):
            store.get('abc')
        with pytest.raises(StoreUnavailable):
            store.add('new', b'y')
    finally:
        locker.execute('ROLLBACK')
        locker.close()
    assert store.get('abc') == b'x'
    assert 'new' not in store


def eventually(call, seconds=30):
    """``call()``'s result once it stops raising StoreUnavailable."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_database_restart_is_unavailable_then_served_again(pg_cluster, pg_url):
    kmf = KeyManagementFacility(pg_url)
    keks = [kmf.generate() for _ in range(2)]
    deks = [kmf.getEncryptionKey(k) for k in keks]
    other = KeyManagementFacility(pg_url)
    assert other.getEncryptionKey(keks[0]) == deks[0]  # cached in `other` now
    pg_cluster.stop('fast')
    try:
        with pytest.raises(StoreUnavailable):
            other.getEncryptionKey(keks[1])
        with pytest.raises(StoreUnavailable):
            kmf.generate()
        with pytest.raises(StoreUnavailable):
            len(other)
        # The cache still answers for the keys it holds, with the right DEK.
        assert other.getEncryptionKey(keks[0]) == deks[0]
    finally:
        pg_cluster.start()
    # Back by itself: the dead connections are replaced (a store that found
    # the database down tries again at most every PROBE_INTERVAL seconds).
    assert eventually(lambda: other.getEncryptionKey(keks[1])) == deks[1]
    kek = kmf.generate()
    assert KeyManagementFacility(pg_url).getEncryptionKey(kek) == kmf.getEncryptionKey(kek)
    assert len(other) == 3


# PostgreSQL: TLS and libpq ------------------------------------------------------------


def ssl_in_use(store):
    with store._db.pool.connection() as conn:
        return conn.execute('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()'
                            ).fetchone()[0]


def test_sslmode_require(pg_cluster, pg_database):
    store = open_store(pg_cluster.url(pg_database, sslmode='require'))
    store.add('abc', b'x')
    assert ssl_in_use(store) is True
    plain = open_store(pg_cluster.url(pg_database, sslmode='disable'))
    assert ssl_in_use(plain) is False and plain.get('abc') == b'x'


def test_sslmode_verify_full_with_the_test_ca(pg_cluster, pg_database):
    for host in ('localhost', '127.0.0.1'):
        url = 'postgresql://postgres@%s:%d/%s?sslmode=verify-full&sslrootcert=%s' % (
            host, pg_cluster.port, pg_database, pg_cluster.ca)
        store = open_store(url)
        store.add('abc', b'x')
        assert ssl_in_use(store) is True


def test_verify_full_refuses_another_ca(pg_cluster, pg_database, tmp_path):
    import pgcluster
    stranger = pgcluster.make_ca(str(tmp_path), 'stranger', '/CN=not our CA')
    url = pg_cluster.url(pg_database, sslmode='verify-full', sslrootcert=stranger)
    with pytest.raises(StoreUnavailable, match='certificate verify failed'):
        open_store(url)


def test_verify_full_refuses_a_wrong_host_name(pg_cluster, pg_database):
    # The right server at the right address, under a name its certificate lacks.
    url = pg_cluster.url(pg_database, sslmode='verify-full', sslrootcert=pg_cluster.ca,
                         hostaddr='127.0.0.1').replace('@127.0.0.1:', '@kms-db.invalid:')
    with pytest.raises(StoreUnavailable, match='does not match host name'):
        open_store(url)
    # verify-ca checks the chain only: the same name is accepted.
    assert open_store(url.replace('verify-full', 'verify-ca')).names() == []


def test_libpq_environment_variables(pg_cluster, pg_database, monkeypatch):
    monkeypatch.setenv('PGHOST', '127.0.0.1')
    monkeypatch.setenv('PGPORT', str(pg_cluster.port))
    monkeypatch.setenv('PGUSER', 'postgres')
    monkeypatch.setenv('PGSSLMODE', 'require')
    monkeypatch.setenv('PGAPPNAME', 'kms-env-test')
    store = open_store('postgresql:///%s' % pg_database)
    assert ssl_in_use(store) is True
    with store._db.pool.connection() as conn:
        assert conn.execute('SHOW application_name').fetchone()[0] == 'kms-env-test'


def test_a_password_from_pgpass(pg_cluster, pg_database, tmp_path, monkeypatch):
    pg_cluster.execute("CREATE ROLE kmi_pw LOGIN PASSWORD 'from-pgpass'")
    pg_cluster.execute('GRANT CREATE ON DATABASE "%s" TO kmi_pw' % pg_database)
    try:
        # Password authentication for this role alone (the others are trusted).
        pg_cluster.set_hba('hostssl all kmi_pw 127.0.0.1/32 scram-sha-256\n')
        passfile = tmp_path / 'pgpass'
        passfile.write_text('127.0.0.1:%d:%s:kmi_pw:from-pgpass\n'
                            % (pg_cluster.port, pg_database))
        passfile.chmod(0o600)
        url = pg_cluster.url(pg_database, user='kmi_pw', sslmode='require')
        monkeypatch.setenv('PGPASSFILE', str(tmp_path / 'missing'))
        with pytest.raises(StoreUnavailable, match='password'):
            open_store(url)
        monkeypatch.setenv('PGPASSFILE', str(passfile))
        store = open_store(url)
        store.add('abc', b'x')
        assert store.get('abc') == b'x'
    finally:
        pg_cluster.set_hba('')
        pg()._Database.close_all()
        pg_cluster.execute('DROP OWNED BY kmi_pw', dbname=pg_database)
        pg_cluster.execute('DROP ROLE kmi_pw')


# PostgreSQL: the least-privilege roles of the README ------------------------------------


def readme_sql(title):
    """The ```sql block under the README heading ``title``."""
    text = (REPO / 'README.md').read_text()
    section = text.split(title, 1)[1]
    return re.search(r'```sql\n(.*?)```', section, re.S).group(1)


def run_sql(cluster, script, dbname='postgres', user='postgres'):
    """Run a README SQL script statement by statement (psql's \\c switches)."""
    parts = re.split(r'(?m)^\\c\s+(\S+)(?:\s+(\S+))?\s*$', script)
    statements = [(parts[0], dbname, user)]
    for i in range(1, len(parts), 3):
        dbname, user = parts[i], parts[i + 1] or user
        statements.append((parts[i + 2], dbname, user))
    for body, db, role in statements:
        for statement in body.split(';'):
            lines = [line for line in statement.splitlines()
                     if line.strip() and not line.strip().startswith('--')]
            if lines:
                cluster.execute('\n'.join(lines), dbname=db, user=role)


@pytest.fixture
def least_privilege(pg_cluster):
    """The README's database, owner and server roles, made with its SQL."""
    run_sql(pg_cluster, readme_sql('Setting up the database'))
    yield
    pg()._Database.close_all()
    pg_cluster.execute('DROP DATABASE IF EXISTS kmi WITH (FORCE)')
    for role in ('kmi_server', 'kmi_owner'):
        pg_cluster.execute('DROP ROLE IF EXISTS %s' % role)


def test_least_privilege_roles_of_the_readme(pg_cluster, least_privilege):
    owner = pg_cluster.url('kmi', user='kmi_owner')
    server = pg_cluster.url('kmi', user='kmi_server')
    # Before the schema exists the server role may not create it: one clear error.
    with pytest.raises(PermissionError, match='kmi store migrate'):
        open_store(server)
    kmi = [sys.executable, '-m', 'keas.kmi.cli', 'store', 'migrate', owner]
    done = subprocess.run(kmi, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    run_sql(pg_cluster, readme_sql('grants for the servers'), dbname='kmi', user='kmi_owner')
    # The server role generates and reads keys, and can do no more.
    kmf = KeyManagementFacility(server)
    kek = kmf.generate()
    assert KeyManagementFacility(server).getEncryptionKey(kek) == kmf.getEncryptionKey(kek)
    assert len(kmf) == 1 and kmf.keys() == [md5hex(kek)]
    with pytest.raises(KeyExistsError):
        kmf[md5hex(kek)] = b'other'
    with pytest.raises(PermissionError):
        del kmf[md5hex(kek)]
    # A server (auditing) runs the whole key lifecycle with these grants.
    served = KeyManagementFacility(server, audit=True)
    other = served.generate()
    assert served.getEncryptionKey(other)
    new_kek = served.rewrap(other, grace=3600)
    served.change_state(md5hex(new_kek), 'suspended', 'test')
    served.change_state(md5hex(new_kek), 'active', 'test')
    served.change_state(md5hex(other), 'destroyed', 'test')
    served.audit('fetch', md5hex(new_kek))  # what the server logs for each POST /key
    assert served.getEncryptionKey(new_kek) == KeyManagementFacility(owner).getEncryptionKey(
        new_kek)
    served.store.flush_audit()  # the fetch's entry, from the spool into the table
    log = open_store(owner).audit_log()
    count, _, broken = log.verify()
    assert broken is None and count == 7
    assert [e['event'] for e in log.tail(0)] == [
        'generate', 'rewrap', 'state', 'state', 'state', 'state', 'fetch']
    import psycopg
    for statement in ("UPDATE kmi.keys SET wrapped = 'x'", "UPDATE kmi.keys SET name = 'x'",
                      "UPDATE kmi.keys SET kid = 'x'", 'DELETE FROM kmi.keys',
                      "INSERT INTO kmi.audit VALUES (99, 'x', 'x', 'x')",
                      "UPDATE kmi.audit SET fields = 'x'", 'DELETE FROM kmi.audit',
                      "SELECT kmi.audit_extend(ARRAY['forged'])",
                      'CREATE TABLE kmi.more (x int)', 'CREATE TABLE public.more (x int)',
                      'DROP TABLE kmi.keys', "INSERT INTO kmi.schema_version VALUES (9)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pg_cluster.execute(statement, dbname='kmi', user='kmi_server')
    # Not even the owner gives a key other bytes.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match='written once'):
        pg_cluster.execute("UPDATE kmi.keys SET wrapped = 'x'", dbname='kmi', user='kmi_owner')
    # The owner (and a role it grants DELETE to) may delete.
    KeyManagementFacility(owner).__delitem__(md5hex(kek))
    assert md5hex(kek) not in kmf.keys()
    # No one else may even connect.
    pg_cluster.execute('CREATE ROLE stranger LOGIN')
    try:
        with pytest.raises(StoreUnavailable, match='permission denied'):
            open_store(pg_cluster.url('kmi', user='stranger'))
    finally:
        pg_cluster.execute('DROP ROLE stranger')


def test_least_privilege_roles_before_the_grants(pg_cluster, least_privilege):
    owner = pg_cluster.url('kmi', user='kmi_owner')
    open_store(owner).add('abc', b'x')  # the owner creates the tables on first use
    with pytest.raises(PermissionError):
        open_store(pg_cluster.url('kmi', user='kmi_server'))


def test_store_unavailable_is_an_os_error():
    assert issubclass(StoreUnavailable, OSError)
    assert not issubclass(StoreUnavailable, (KeyError, ValueError))
    assert issubclass(_kmi.KeyExistsError, ValueError)


def test_directory_errors_that_mean_unavailable():
    import errno
    from keas.kmi.store import unavailable
    away = unavailable(OSError(errno.ESTALE, 'Stale file handle'), '/mnt/keys')
    assert isinstance(away, StoreUnavailable) and '/mnt/keys' in str(away)
    full = OSError(errno.ENOSPC, 'No space left on device')
    assert unavailable(full, '/mnt/keys') is full



def test_a_read_only_database_is_unavailable_for_writes_only(pg_cluster, pg_database,
                                                             pg_url):
    """What a server meets when its connections land on a standby (during a
    failover): reads are served, writes are StoreUnavailable, not an error
    of another kind; service resumes when the database takes writes again."""
    store = open_store(pg_url)
    store.add('abc', b'x')
    pg_cluster.execute('ALTER DATABASE "%s" SET default_transaction_read_only = on'
                       % pg_database)
    # Drop the store's connections: the new ones are read-only.
    pg_cluster.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity'
                       ' WHERE datname = %s AND pid <> pg_backend_pid()', [pg_database])
    with pytest.raises(StoreUnavailable, match='read-only'):
        eventually(lambda: store.add('new', b'y'), seconds=5)
    assert eventually(lambda: store.get('abc')) == b'x'
    pg_cluster.execute('ALTER DATABASE "%s" RESET default_transaction_read_only'
                       % pg_database)
    pg_cluster.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity'
                       ' WHERE datname = %s AND pid <> pg_backend_pid()', [pg_database])
    eventually(lambda: store.add('new', b'y'))
    assert store.get('new') == b'y'


def test_one_connection_killed_is_retried_unnoticed(pg_cluster, pg_database, pg_url):
    store = open_store(pg_url)
    store.add('abc', b'x')
    pg_cluster.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity'
                       ' WHERE datname = %s AND pid <> pg_backend_pid()', [pg_database])
    assert store.get('abc') == b'x'  # the broken connection is replaced at once
    store.add('def', b'y')
    assert sorted(store.names()) == ['abc', 'def']
