"""Fixtures shared by the test modules: key stores, facilities, a component registry."""
import os
import pathlib
import tempfile
from importlib.metadata import version

import pytest
import zope.component.testing
from zope.component import provideUtility

from keas.kmi import facility, interfaces, testing

ROOT = pathlib.Path(__file__).resolve().parent.parent
ZODB_VERSION = tuple(int(p) for p in version('ZODB').split('.')[:2])

# ZODB 6.4 changed how __setstate__ errors surface: test_zodb64.py runs in a
# second environment with 6.4 (see the Makefile), everything else on 6.3.
collect_ignore = ['test_zodb64.py'] if ZODB_VERSION < (6, 4) else []

# The default audit spool of PostgreSQL stores (keas.kmi.auditspool) and any
# other state the tests' processes keep: in a directory of the run's own.
os.environ['XDG_STATE_HOME'] = tempfile.mkdtemp(prefix='kmi-test-state-')


@pytest.fixture
def storage_dir(tmp_path):
    path = tmp_path / 'keys'
    path.mkdir()
    return str(path)


@pytest.fixture
def kmf(storage_dir):
    """A master facility over a fresh directory."""
    return facility.KeyManagementFacility(storage_dir)


@pytest.fixture(scope='session')
def keyring(tmp_path_factory):
    """A master facility holding a few 2048-bit KEKs, made once per session."""
    f = facility.KeyManagementFacility(str(tmp_path_factory.mktemp('keyring')))
    return f, [f.generate() for _ in range(3)]


@pytest.fixture
def zca(tmp_path):
    """A fresh component registry with the testing key holder and facility."""
    zope.component.testing.setUp()
    service = testing.TestingKeyManagementFacility(str(tmp_path / 'zca-keys'))
    provideUtility(service, interfaces.IKeyManagementFacility)
    provideUtility(testing.TestingKeyHolder())
    yield service
    zope.component.testing.tearDown()


# PostgreSQL ---------------------------------------------------------------------
# One throwaway cluster per session (tests/pgcluster.py), a database per test.
# Skipped with the reason where PostgreSQL is missing; in CI that is a failure.


def pg_unavailable_reason():
    import importlib.util
    import pgcluster
    reason = pgcluster.missing_reason()
    if reason is None and not all(importlib.util.find_spec(m) for m in ('psycopg', 'psycopg_pool')):
        reason = "psycopg and psycopg_pool are missing (pip install -e '.[test]')"
    return reason


@pytest.fixture(scope='session')
def pg_cluster():
    """A PostgreSQL server of our own on a free loopback port, TLS on."""
    import os
    import pgcluster
    reason = pg_unavailable_reason()
    if reason:
        if os.environ.get('CI'):
            pytest.fail('CI runs the PostgreSQL tests, but: ' + reason)
        pytest.skip(reason)
    cluster = pgcluster.Cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_database(pg_cluster):
    """A fresh database's name; dropped afterwards with its connections."""
    import uuid
    from keas.kmi import pgstore
    name = pg_cluster.create_database('kmi_%s' % uuid.uuid4().hex[:12])
    yield name
    pgstore._Database.close_all()
    if pg_cluster.running():
        pg_cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


@pytest.fixture
def pg_url(pg_cluster, pg_database):
    """The URL of a fresh database (as the superuser, over TCP)."""
    return pg_cluster.url(pg_database)


@pytest.fixture(params=['directory', 'postgresql'])
def store_location(request, tmp_path):
    """Each key store in turn: a fresh directory, a fresh database."""
    if request.param == 'directory':
        return str(tmp_path / 'keys')
    return request.getfixturevalue('pg_url')
