"""ZODB 6.4 wraps errors from __setstate__ in StateLoadError; a state that
does not decrypt must surface that way, with the ValueError as its cause.
Runs in the ZODB 6.4 environment (make test); conftest skips it on 6.3."""
import sys

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from ZODB.POSException import StateLoadError

from keas.kmi import persistent as kp

sys.path.insert(0, __file__.rsplit('/', 1)[0])
import persistent_model  # noqa: E402
from persistent_model import Plain, Secret  # noqa: E402


def test_plain_state_surfaces_as_state_load_error(zca, tmp_path):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / 'Data.fs')))
    conn = db.open()
    conn.root()['pwd'] = Plain('xyzzy')
    conn.root()['s'] = Secret('Ann', '1')
    transaction.commit()
    persistent_model.Plain = type('Plain', (kp.EncryptedPersistent,),
                                  {'__module__': Plain.__module__})
    try:
        pwd = db.open().root()['pwd']
        with pytest.raises(StateLoadError) as info:
            pwd.password
        assert isinstance(info.value.__cause__, ValueError)
        assert 'not enough values to unpack' in str(info.value.__cause__)
        kp.convert_object_to_encrypted(pwd)
        assert pwd.password == 'xyzzy'
    finally:
        persistent_model.Plain = Plain
        transaction.abort()


def test_undecryptable_state_surfaces_as_state_load_error(zca, tmp_path):
    path = str(tmp_path / 'Data.fs')
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    conn = db.open()
    conn.root()['s'] = Secret('Ann', '1')
    transaction.commit()
    zca.timeout = 0
    name = __import__('hashlib').md5(zca.generate()).hexdigest()
    del zca[name]  # keys are written once: replace it by deleting first
    zca[name] = b'\0' * 64  # now the DEK no longer unwraps
    conn2 = db.open()
    with pytest.raises(StateLoadError) as info:
        conn2.root()['s'].name
    assert isinstance(info.value.__cause__, ValueError)
    transaction.abort()
    db.close()
