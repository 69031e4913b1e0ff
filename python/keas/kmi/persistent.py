"""Persistent objects whose state is stored encrypted in ZODB.

The state of an ``EncryptedPersistent`` is pickled with every persistent
object it refers to replaced by an index into a list of references; the pickle
is encrypted and stored as ``(ciphertext, references)``, so ZODB still sees
and follows the references. The key comes from the ``IKeyHolder`` utility,
the cipher from the ``IEncryptionService`` utility.
"""
import io
import threading

import persistent
import persistent.wref
from zodbpickle.pickle import Pickler, Unpickler
from zope.component import getUtility

from keas.kmi.interfaces import IEncryptionService, IKeyHolder

# Set by convert_object_to_encrypted while it loads one object's plain state.
_loading_plain = threading.local()


class EncryptedPersistent(persistent.Persistent):
    """Subclass this instead of ``persistent.Persistent`` to store encrypted."""

    def __getstate__(self):
        return encrypt_state(super(EncryptedPersistent, self).__getstate__())

    def __setstate__(self, state):
        if getattr(_loading_plain, 'obj', None) is not self:
            state = decrypt_state(state)
        super(EncryptedPersistent, self).__setstate__(state)


def encrypt_state(state):
    """``(encrypt(key, pickle), references)`` for an object's plain state."""
    key = getUtility(IKeyHolder).key
    service = getUtility(IEncryptionService)
    data, refs = pickle_nonpersistent(state)
    return service.encrypt(key, data), refs


def decrypt_state(state):
    """The plain state from what ``encrypt_state`` returned."""
    encrypted, refs = state
    key = getUtility(IKeyHolder).key
    service = getUtility(IEncryptionService)
    return unpickle_nonpersistent(service.decrypt(key, encrypted), refs)


# What ZODB stores as a reference of its own rather than inside the pickle.
_REFERENCE_TYPES = (persistent.Persistent, type, persistent.wref.WeakRef)
# Types that are never references: a set lookup settles most objects.
_PLAIN_TYPES = frozenset([str, bytes, int, float, bool, type(None), tuple,
                          list, dict, set, frozenset, complex])


class _ReferencePickler(Pickler):

    def __init__(self, file):
        Pickler.__init__(self, file, 2)
        self.refs = []
        self._index = {}

    def persistent_id(self, obj):
        if type(obj) in _PLAIN_TYPES or not isinstance(obj, _REFERENCE_TYPES):
            return None
        index = self._index.get(id(obj))
        if index is None:
            index = self._index[id(obj)] = len(self.refs)
            self.refs.append(obj)
        return index


class _ReferenceUnpickler(Unpickler):

    def __init__(self, file, refs):
        Unpickler.__init__(self, file)
        self.refs = refs

    def persistent_load(self, index):
        return self.refs[index]


def pickle_nonpersistent(state):
    """A protocol-2 pickle of ``state`` and the persistent objects it refers to."""
    buf = io.BytesIO()
    pickler = _ReferencePickler(buf)
    pickler.dump(state)
    return buf.getvalue(), pickler.refs


def unpickle_nonpersistent(data, persistent_refs):
    """The reverse of ``pickle_nonpersistent``."""
    return _ReferenceUnpickler(io.BytesIO(data), persistent_refs).load()


def convert_object_to_encrypted(obj):
    """Load ``obj``, whose class became an ``EncryptedPersistent`` after its
    state was stored in plain, from that plain state, and mark it changed so
    the next commit stores it encrypted.

    Only for test databases: the plain state stays on the storage's disk.
    """
    _loading_plain.obj = obj
    try:
        obj._p_activate()
    finally:
        _loading_plain.obj = None
    obj._p_changed = True
