"""Persistent objects whose state is stored encrypted in ZODB.

The state of an ``EncryptedPersistent`` is pickled with every persistent
object it refers to replaced by an index into a list of references; the pickle
is encrypted and stored as ``(ciphertext, references)``, so ZODB still sees
and follows the references. The key comes from the ``IKeyHolder`` utility
(for reading, from a key ring's KEK that the ciphertext names), the cipher
from the ``IEncryptionService`` utility.
"""
import io
import threading

import persistent
import persistent.wref
from zodbpickle.pickle import Pickler, Unpickler
from zope.component import ComponentLookupError, getSiteManager

from keas.kmi import _kmi
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


def _holder_and_service():
    """The key holder and the encryption service: ``getUtility`` for both,
    from one site manager lookup."""
    registry = getSiteManager()
    holder = registry.queryUtility(IKeyHolder)
    if holder is None:
        raise ComponentLookupError(IKeyHolder, '')
    service = registry.queryUtility(IEncryptionService)
    if service is None:
        raise ComponentLookupError(IEncryptionService, '')
    return holder, service


def _key_and_service():
    """The key holder's key (the one new states are written under) and the
    encryption service."""
    holder, service = _holder_and_service()
    return holder.key, service


def encrypt_state(state):
    """``(encrypt(key, pickle), references)`` for an object's plain state,
    under the key holder's ``key`` (a key ring's primary)."""
    holder, service = _holder_and_service()
    data, refs = pickle_nonpersistent(state)
    return service.encrypt(holder.key, data), refs


def decrypt_state(state):
    """The plain state from what ``encrypt_state`` returned.

    A key ring (``keas.kmi.keyholder.IKeyRing``) chooses the KEK by the kid
    the ciphertext names; any other key holder gives its one ``key``.
    """
    encrypted, refs = state
    holder, service = _holder_and_service()
    choose = getattr(holder, 'getDecryptionKey', None)
    key = holder.key if choose is None else choose(encrypted, service)
    return unpickle_nonpersistent(service.decrypt(key, encrypted), refs)


# What ZODB stores as a reference of its own rather than inside the pickle.
_REFERENCE_TYPES = (persistent.Persistent, type, persistent.wref.WeakRef)
# Types that are never references: a set lookup settles most objects.
_PLAIN_TYPES = frozenset([str, bytes, int, float, bool, type(None), tuple,
                          list, dict, set, frozenset, complex])


def pickle_nonpersistent(state):
    """A protocol-2 pickle of ``state`` and the persistent objects it refers to."""
    # A state of builtin values only (the usual case) is pickled in Rust, to
    # the same bytes; anything else goes through zodbpickle.
    data = _kmi.dump_state(state)
    if data is not None:
        return data, []
    buf = io.BytesIO()
    refs = []
    index = {}

    def persistent_id(obj):
        if type(obj) in _PLAIN_TYPES or not isinstance(obj, _REFERENCE_TYPES):
            return None
        i = index.get(id(obj))
        if i is None:
            i = index[id(obj)] = len(refs)
            refs.append(obj)
        return i

    # A plain C pickler with a persistent_id attribute: a subclass with an
    # __init__ of its own costs a third more per object.
    pickler = Pickler(buf, 2)
    pickler.persistent_id = persistent_id
    pickler.dump(state)
    return buf.getvalue(), refs


# What _kmi.load_state answers for a pickle it leaves to zodbpickle.
_UNREAD = object()


def unpickle_nonpersistent(data, persistent_refs):
    """The reverse of ``pickle_nonpersistent``."""
    if not persistent_refs:
        state = _kmi.load_state(data, _UNREAD)
        if state is not _UNREAD:
            return state
    unpickler = Unpickler(io.BytesIO(data))
    unpickler.persistent_load = persistent_refs.__getitem__
    return unpickler.load()


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
