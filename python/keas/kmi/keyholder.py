"""Key holder utilities: ``KeyHolder`` keeps one KEK, read from a file;
``KeyRing`` keeps a primary KEK for writing and older ones for reading, so
that an application can move to a new key while its data still names the old.
"""
import threading

from zope.interface import implementer

from keas.kmi import _kmi
from keas.kmi.interfaces import IKeyHolder

V2_MAGIC = _kmi.V2_MAGIC
_KID = slice(10, 26)  # where a v2 ciphertext names its DEK (FORMATS.md 7)


def _read(filename):
    with open(filename, 'rb') as f:
        return f.read()


@implementer(IKeyHolder)
class KeyHolder(object):
    """Holds the KEK stored in ``filename``."""

    def __init__(self, filename):
        self.key = _read(filename)


class IKeyRing(IKeyHolder):
    """A key holder with several KEKs: ``key`` (the primary) encrypts,
    ``getDecryptionKey`` chooses the KEK that opens a given ciphertext."""

    def getDecryptionKey(ciphertext, service):
        """The KEK whose DEK ``ciphertext`` was encrypted under, as far as
        ``service`` (an ``IEncryptionService``) tells; ValueError if none."""


def kid_of(service, key):
    """The 16-byte v2 kid of the DEK that ``service`` holds for the KEK ``key``."""
    kid = getattr(service, 'kid', None)
    if kid is not None:
        return kid(key)
    return _kmi.V2Key(service.getEncryptionKey(key)).kid


@implementer(IKeyRing)
class KeyRing(object):
    """A primary KEK for writing and ``older`` KEKs for reading.

    ``key`` is the primary, so whatever knows only ``IKeyHolder.key`` keeps
    working and writes under it. A v2 ciphertext names its DEK by a kid
    (FORMATS.md 7); ``getDecryptionKey`` returns the KEK of the ring whose
    DEK has that kid, asking the encryption service once per KEK, and only
    when a ciphertext names a kid not met before. Legacy ciphertexts name
    nothing: they are read with ``legacy``, the primary unless given.

    The keys are PEM bytes; ``fromFiles`` reads them from files.
    """

    def __init__(self, primary, older=(), legacy=None):
        if isinstance(older, (bytes, str)):
            raise TypeError('older is a sequence of KEKs, not one KEK')
        self.key = primary
        self.older = tuple(k for k in dict.fromkeys(older) if k != primary)
        self.legacy = primary if legacy is None else legacy
        self._lock = threading.Lock()
        # (service, {kid: KEK}, the KEKs learned): one attribute, replaced
        # whole when another service asks, so a reader never mixes two.
        self._cache = (None, {}, set())

    @classmethod
    def fromFiles(cls, primary, older=(), legacy=None):
        """A ring of the KEKs in these files (``older``: a list of file names)."""
        if isinstance(older, str):
            older = [older]
        return cls(_read(primary), [_read(name) for name in older],
                   None if legacy is None else _read(legacy))

    @property
    def primary(self):
        return self.key

    @property
    def keys(self):
        """Every KEK of the ring, the primary first, then ``older``, then
        ``legacy`` if it is neither."""
        keys = (self.key,) + self.older
        if self.legacy not in keys:
            keys += (self.legacy,)
        return keys

    def kid(self, service, key=None):
        """The kid of ``key`` (the primary by default) through ``service``."""
        key = self.key if key is None else key
        cached, by_kid, _ = self._cache
        if cached is service:
            for kid, known in list(by_kid.items()):
                if known == key:
                    return kid
        return kid_of(service, key)

    def getDecryptionKey(self, ciphertext, service):
        """The KEK that opens ``ciphertext``: ``legacy`` for a legacy one,
        the ring's KEK with its kid for a v2 one."""
        if ciphertext[:8] != V2_MAGIC:
            return self.legacy
        if len(ciphertext) < 26:
            return self.key  # too short to name a key: the service says what is wrong
        cache = self._cache
        if cache[0] is service:
            key = cache[1].get(ciphertext[_KID])
            if key is not None:
                return key
        return self._learn(ciphertext[_KID], service)

    def _learn(self, kid, service):
        """Ask ``service`` for the kids of the KEKs not learned yet, in ring
        order, until one has ``kid``. A KEK the service cannot use now (not
        known, destroyed, key server down) is asked again next time."""
        with self._lock:
            if self._cache[0] is not service:
                self._cache = (service, {}, set())
            _, by_kid, learned = self._cache
            key = by_kid.get(kid)
            if key is not None:
                return key
            failures = []
            for candidate in self.keys:
                if candidate in learned:
                    continue
                try:
                    found = kid_of(service, candidate)
                except (KeyError, ValueError, OSError) as error:
                    failures.append('%s: %s' % (_name(candidate), _one_line(error)))
                    continue
                by_kid.setdefault(found, candidate)
                learned.add(candidate)
                if found == kid:
                    return by_kid[found]
        message = ('encrypted under another key (kid %s): no key of the ring has it'
                   % kid.hex())
        if failures:
            message += ' (keys not usable: %s)' % '; '.join(failures)
        raise ValueError(message)

    def __repr__(self):
        return '<%s: primary %s, %d older>' % (
            self.__class__.__name__, _name(self.key), len(self.older))


def _name(key):
    try:
        return _kmi.kek_name(key)
    except Exception:
        return '?'


def _one_line(error):
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.splitlines()[0] if text else type(error).__name__

