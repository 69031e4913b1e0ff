"""The keas.kmi 3.2.0 package page, run unchanged as a doctest.

The file lives outside the project, in ../shared/conformance; see its README
for the fixture reproduced here.
"""
import doctest
import io
import os
import pathlib
import shutil
import sys
import tempfile
import types
import unittest

import pytest
import transaction
import zope.component.testing
from zope.component import provideUtility

from keas.kmi import interfaces, testing

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFORMANCE = pathlib.Path(os.environ.get(
    'KMI_CONFORMANCE_DIR', ROOT.parent / 'shared' / 'conformance'))
DOCTEST = CONFORMANCE / 'keas.kmi-3.2.0.txt'
MODULE_NAME = 'keas_kmi_conformance'


def set_up(test):
    # Classes defined in the examples get pickled by ZODB, so the examples
    # run in the namespace of a module that pickle can import.
    module = types.ModuleType(MODULE_NAME)
    module.__dict__.update(test.globs)
    module.__dict__['__name__'] = MODULE_NAME
    sys.modules[MODULE_NAME] = module
    test.globs = module.__dict__
    zope.component.testing.setUp(test)
    storage = tempfile.mkdtemp(prefix='kmi-conformance-')
    test.globs['_conformance_storage'] = storage
    provideUtility(testing.TestingKeyManagementFacility(storage),
                   interfaces.IKeyManagementFacility)


def tear_down(test):
    transaction.abort()
    zope.component.testing.tearDown(test)
    shutil.rmtree(test.globs.pop('_conformance_storage'), ignore_errors=True)
    sys.modules.pop(MODULE_NAME, None)


def test_conformance_doctest():
    if not DOCTEST.exists():
        if os.environ.get('CI'):
            pytest.fail('%s is missing; CI must run the conformance doctest' % DOCTEST)
        pytest.skip('conformance file %s is absent (../shared is not beside '
                    'this checkout)' % DOCTEST)
    suite = doctest.DocFileSuite(
        str(DOCTEST), module_relative=False, encoding='utf-8',
        setUp=set_up, tearDown=tear_down,
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    out = io.StringIO()
    result = unittest.TextTestRunner(stream=out, verbosity=2).run(suite)
    assert result.testsRun == 1
    assert result.wasSuccessful(), out.getvalue()
