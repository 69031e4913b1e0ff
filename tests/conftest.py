"""Fixtures shared by the test modules: key stores, facilities, a component registry."""
import pathlib
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
