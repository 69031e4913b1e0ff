"""The audit spool of a PostgreSQL store (keas.kmi.auditspool): fetch
entries reach the table within a second and in order, a server killed
before it shipped loses none and none is shipped twice, a spool that cannot
be written refuses the request, and ``audit-spool = off`` goes straight to
the table. (Outages of the database: tests/test_pgserver.py.)"""
import os
import subprocess
import sys
import time

import pytest

from keas.kmi.audit import AuditError
from keas.kmi.auditspool import AuditSpool
from keas.kmi.store import open_store
from test_audit import full_tmpfs  # noqa: F401 (a fixture)


@pytest.fixture
def spool_dir(tmp_path):
    return str(tmp_path / 'spool')


def table_entries(pg_url):
    store = open_store(pg_url, audit_spool='off')
    try:
        return store.audit_log().tail(0)
    finally:
        store.close()


def test_fetch_entries_reach_the_table_within_a_second(pg_url, spool_dir):
    store = open_store(pg_url, audit_spool=spool_dir)
    for i in range(50):
        store.audit(event='fetch', name='k%d' % i, outcome='ok')
    assert len(os.listdir(spool_dir)) == 1  # written, locally, before any answer
    deadline = time.monotonic() + AuditSpool.MAX_LAG
    while len(table_entries(pg_url)) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    entries = table_entries(pg_url)
    assert [e['name'] for e in entries] == ['k%d' % i for i in range(50)]
    count, _, broken = store.audit_log().verify()
    assert broken is None and count == 50
    assert len(os.listdir(spool_dir)) == 1  # the next file, being written
    store.close()
    assert os.listdir(spool_dir) == []


def test_a_key_change_follows_the_fetches_before_it(pg_url, spool_dir):
    store = open_store(pg_url, audit_spool=spool_dir)
    store.add('abc', b'x')
    for _ in range(3):
        store.audit(event='fetch', name='abc', outcome='ok')
    meta = store.meta('abc')
    store.set_meta('abc', dict(meta, state='suspended'),
                   audit=dict(event='state', name='abc', outcome='ok'))
    assert [e['event'] for e in table_entries(pg_url)] == ['fetch'] * 3 + ['state']
    store.close()


KILLED = """
import os, signal, sys
from keas.kmi import auditspool
from keas.kmi.store import open_store
auditspool.AuditSpool.INTERVAL = 3600  # nothing shipped on its own
store = open_store(sys.argv[1], audit_spool=sys.argv[2])
for i in range(20):
    store.audit(event='fetch', name='k%d' % i, outcome='ok')
if sys.argv[3] == 'after-commit':
    # Killed between the shipment's commit and the removal of its file.
    auditspool._remove = lambda path: os.kill(os.getpid(), signal.SIGKILL)
    store.flush_audit()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize('when', ['before-shipping', 'after-commit'])
def test_a_killed_server_loses_no_entry_and_none_is_shipped_twice(pg_url, spool_dir, when):
    done = subprocess.run([sys.executable, '-c', KILLED, pg_url, spool_dir, when],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    # Its file (after the shipment: the shipped one and the next, empty).
    assert len(os.listdir(spool_dir)) == (2 if when == 'after-commit' else 1)
    assert len(table_entries(pg_url)) == (20 if when == 'after-commit' else 0)
    # The next server over the database and spool ships what it left, once.
    store = open_store(pg_url, audit_spool=spool_dir)
    store.audit(event='fetch', name='next', outcome='ok')
    store.flush_audit()
    assert [e['name'] for e in table_entries(pg_url)] == ['k%d' % i for i in range(20)] + [
        'next']
    store.close()
    assert os.listdir(spool_dir) == []


def test_a_spool_that_cannot_be_written_refuses_the_request(pg_url, full_tmpfs):  # noqa: F811
    from keas.kmi import wsgi
    from keas.kmi.facility import KeyManagementFacility
    from test_pgserver import call
    app = wsgi.application_factory({}, **{'storage-dir': pg_url,
                                          'audit-spool': str(full_tmpfs / 'spool')})
    status, _, kek = call(app, 'POST', '/new')
    assert status == 200
    assert call(app, 'POST', '/key', kek)[0] == 200
    with open(full_tmpfs / 'filler', 'wb', buffering=0) as f:
        for size in (65536, 4096, 1):
            try:
                while True:
                    f.write(b'\0' * size)
            except OSError:
                pass
    # The page the spool file is on holds a few more entries.
    served, deadline = 0, time.monotonic() + 2
    while True:
        status, headers, body = call(app, 'POST', '/key', kek)
        if status != 200 or time.monotonic() > deadline:
            break
        served += 1
    assert status == 503 and headers['Retry-After'] == wsgi.RETRY_AFTER
    # Nothing lost, nothing partial: every DEK sent is in the table, which verifies.
    app.facility.store.flush_audit()
    log = KeyManagementFacility(pg_url).store.audit_log()
    count, _, broken = log.verify()
    assert broken is None
    assert [e['event'] for e in log.tail(0)] == ['generate'] + ['fetch'] * (1 + served)
    assert len(log.tail(0)) == count


def test_a_spool_directory_open_to_others_is_refused(pg_url, tmp_path):
    shared = tmp_path / 'shared'
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    store = open_store(pg_url, audit_spool=str(shared))
    with pytest.raises(AuditError, match='mode 0700'):
        store.audit(event='fetch', name='k', outcome='ok')
    store.close()


def test_without_a_spool_each_entry_goes_to_the_table_at_once(pg_url):
    store = open_store(pg_url, audit_spool='off')
    store.audit(event='fetch', name='k', outcome='ok')
    assert [e['name'] for e in table_entries(pg_url)] == ['k']
    store.close()


def test_a_failed_rotation_does_not_stop_the_spool(pg_url, spool_dir, monkeypatch):
    # After a shipment takes the file being written, opening the next one
    # fails once (a full disk): the next entry opens it, and nothing is
    # shipped twice or left behind.
    monkeypatch.setattr(AuditSpool, 'INTERVAL', 3600)  # only the test ships
    store = open_store(pg_url, audit_spool=spool_dir)
    store.audit(event='fetch', name='a', outcome='ok')
    spool = store._db.spool()
    real_open, calls = AuditSpool._open, []

    def open_once_failing(self):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, 'No space left on device')
        return real_open(self)
    monkeypatch.setattr(AuditSpool, '_open', open_once_failing)
    assert spool.ship()
    store.audit(event='fetch', name='b', outcome='ok')
    assert spool.ship()
    assert [e['name'] for e in table_entries(pg_url)] == ['a', 'b']
    store.close()
    assert os.listdir(spool_dir) == []


def test_a_shipped_file_that_cannot_be_removed_is_not_shipped_twice(pg_url, spool_dir,
                                                                     monkeypatch):
    from keas.kmi import auditspool
    monkeypatch.setattr(AuditSpool, 'INTERVAL', 3600)  # only the test ships
    store = open_store(pg_url, audit_spool=spool_dir)
    store.audit(event='fetch', name='a', outcome='ok')
    spool = store._db.spool()
    real_remove, calls = auditspool._remove, []

    def remove_once_failing(path):
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(13, 'Permission denied')
        return real_remove(path)
    monkeypatch.setattr(auditspool, '_remove', remove_once_failing)
    assert not spool.ship()  # in the table, but its file is still there
    assert spool.ship()
    store.audit(event='fetch', name='b', outcome='ok')
    assert spool.ship()
    assert [e['name'] for e in table_entries(pg_url)] == ['a', 'b']
    store.close()
    assert os.listdir(spool_dir) == []
