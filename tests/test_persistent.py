"""EncryptedPersistent in real ZODB FileStorage databases (ZODB 6.3 here;
test_zodb64.py covers 6.4)."""
import sys

import pytest
import persistent.mapping
import persistent.wref
import transaction
import ZODB
import ZODB.FileStorage
from zodbpickle import pickle

from keas.kmi import persistent as kp
from keas.kmi import testing

sys.path.insert(0, __file__.rsplit('/', 1)[0])
from persistent_model import Plain, Secret  # noqa: E402


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / 'Data.fs')


def open_db(path):
    return ZODB.DB(ZODB.FileStorage.FileStorage(path))


def test_state_is_ciphertext_and_references(zca):
    users = persistent.mapping.PersistentMapping()
    a, b = Secret('Ann', '111'), Secret('Bob', '222')
    a.friend, b.friend, a.parent = b, a, users
    a.ref = persistent.wref.WeakRef(b)
    encrypted, refs = a.__getstate__()
    assert isinstance(encrypted, bytes) and len(encrypted) % 16 == 0
    assert refs[0] is b and users in refs and Secret not in refs
    plain = zca.decrypt(testing.KeyEncyptingKey, encrypted)
    assert pickle.loads.__module__  # zodbpickle is the pickler
    assert plain.startswith(b'\x80\x02')  # protocol 2
    state = kp.unpickle_nonpersistent(plain, refs)
    assert state['friend'] is b and state['name'] == 'Ann'


def test_pickle_round_trip_hides_the_data(zca):
    s = Secret('Stephan Richter', '123456789')
    data = pickle.dumps(s)
    assert b'123456789' not in data and b'Stephan' not in data
    again = pickle.loads(data)
    assert (again.name, again.ssn) == ('Stephan Richter', '123456789')


def test_filestorage_round_trip_with_cross_references(zca, db_path):
    db = open_db(db_path)
    conn = db.open()
    users = conn.root()['users'] = persistent.mapping.PersistentMapping()
    users['a'] = Secret('Ann', '111-22-3333')
    users['b'] = Secret('Bob', '444-55-6666')
    users['a'].friend = users['b']
    users['b'].friend = users['a']
    users['a'].__parent__ = users['b'].__parent__ = users
    transaction.commit()
    db.close()
    with open(db_path, 'rb') as f:
        raw = f.read()
    assert b'111-22-3333' not in raw and b'Ann' not in raw

    db = open_db(db_path)
    users = db.open().root()['users']
    a, b = users['a'], users['b']
    assert (a.name, b.ssn) == ('Ann', '444-55-6666')
    assert a.friend is b and b.friend is a and a.__parent__ is users
    db.close()


def test_setstate_of_plain_state_is_a_value_error(zca, db_path):
    db = open_db(db_path)
    conn = db.open()
    conn.root()['pwd'] = Plain('xyzzy')
    transaction.commit()
    Secretive = type('Plain', (kp.EncryptedPersistent,), {'__module__': Plain.__module__})
    import persistent_model
    persistent_model.Plain = Secretive
    try:
        conn2 = db.open()
        pwd = conn2.root()['pwd']
        with pytest.raises(ValueError, match='not enough values to unpack'):
            pwd.password
        kp.convert_object_to_encrypted(pwd)
        assert pwd.password == 'xyzzy'
        transaction.commit()
        conn3 = db.open()
        assert conn3.root()['pwd'].password == 'xyzzy'
    finally:
        persistent_model.Plain = Plain
        transaction.abort()
        db.close()


def test_wrong_key_is_a_value_error(zca, db_path, storage_dir):
    db = open_db(db_path)
    conn = db.open()
    conn.root()['s'] = Secret('Ann', '1')
    transaction.commit()
    # Reading with a holder whose DEK differs fails loudly, never silently.
    from zope.component import provideUtility
    from keas.kmi import facility, interfaces
    other = facility.KeyManagementFacility(storage_dir)
    kek = other.generate()
    holder = type('Holder', (), {'key': kek})()
    provideUtility(other, interfaces.IKeyManagementFacility)
    provideUtility(holder, interfaces.IKeyHolder)
    conn2 = db.open()
    # The padding check catches a wrong key 255 times in 256; otherwise the
    # garbage fails to unpickle.
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        conn2.root()['s'].name
    transaction.abort()
    db.close()


def raw_state(db_path, name):
    """The stored (ciphertext, references) state of root[name], unpickled raw."""
    db = ZODB.DB(ZODB.FileStorage.FileStorage(db_path, read_only=True))
    try:
        conn = db.open()
        oid = conn.root()[name]._p_oid
        data, _ = db.storage.load(oid)
        state = conn._reader.getState(data)
        transaction.abort()
        return state
    finally:
        db.close()


def test_states_follow_the_services_format_and_both_read(zca, db_path):
    from keas.kmi.facility import V2_MAGIC
    db = open_db(db_path)
    conn = db.open()
    conn.root()['old'] = Secret('Ann', '111')
    transaction.commit()
    zca.dataFormat = 2
    friend = Secret('Bob', '222')
    conn.root()['new'] = Secret('Cy', '333')
    conn.root()['new'].friend = friend
    transaction.commit()
    db.close()
    old, new = raw_state(db_path, 'old'), raw_state(db_path, 'new')
    assert old[0][:8] != V2_MAGIC and len(old[0]) % 16 == 0
    assert new[0][:8] == V2_MAGIC
    assert isinstance(new, tuple) and len(new[1]) == 1  # the reference stays in clear
    for fmt in (1, 2):
        zca.dataFormat = fmt
        db = open_db(db_path)
        root = db.open().root()
        assert (root['old'].name, root['new'].name, root['new'].friend.ssn) == \
            ('Ann', 'Cy', '222')
        transaction.abort()
        db.close()
    zca.acceptLegacy = False
    db = open_db(db_path)
    root = db.open().root()
    assert root['new'].name == 'Cy'
    with pytest.raises(ValueError, match='acceptLegacy'):
        root['old'].name
    transaction.abort()
    db.close()


def test_a_v2_state_under_another_key_says_so(zca, db_path, storage_dir):
    zca.dataFormat = 2
    db = open_db(db_path)
    conn = db.open()
    conn.root()['s'] = Secret('Ann', '1')
    transaction.commit()
    from zope.component import provideUtility
    from keas.kmi import facility, interfaces
    other = facility.KeyManagementFacility(storage_dir)
    holder = type('Holder', (), {'key': other.generate()})()
    provideUtility(other, interfaces.IKeyManagementFacility)
    provideUtility(holder, interfaces.IKeyHolder)
    with pytest.raises(ValueError, match='another key'):
        db.open().root()['s'].name
    transaction.abort()
    db.close()
