"""The key management facilities.

``KeyManagementFacility`` is the master: it generates KEKs, keeps the wrapped
DEKs in a storage directory and unwraps them on request.
``LocalKeyManagementFacility`` runs next to the data: it asks a master for
KEKs and DEKs over HTTP(S) and encrypts locally. Both delegate the
cryptography to ``keas.kmi._kmi``.
"""
import contextvars
import http.client
import logging
import ssl
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from zope.interface import implementer

from keas.kmi import _kmi, interfaces, lifecycle
from keas.kmi.audit import requester
from keas.kmi.store import open_store

logger = logging.getLogger('kmi')

# True while the key server (keas.kmi.wsgi) handles a request: it logs each
# key event itself, with the client's address, in place of the lines below.
logged_by_server = contextvars.ContextVar('logged_by_server', default=False)

DEFAULT_CHUNKSIZE = 24 * 1024


def _passphrase(value):
    """``rsaPassphrase`` as bytes; str is Latin-1 when it can be, as PyCrypto read it."""
    if value is None:
        return b''
    if isinstance(value, bytes):
        return value
    try:
        return value.encode('latin-1')
    except UnicodeEncodeError:
        return value.encode('utf-8')


# The two data formats (FORMATS.md): 1, legacy AES-256-CBC with a fixed IV
# (sections 3-4), which keas.kmi 3.x reads; 2, v2, authenticated (section 7).
LEGACY = 1
V2 = 2
V2_MAGIC = _kmi.V2_MAGIC


def _check_format(service):
    fmt = service.dataFormat
    if fmt not in (LEGACY, V2):
        raise ValueError('dataFormat must be 1 (legacy) or 2 (v2), not %r' % (fmt,))
    return fmt


def _check_legacy(service, associated_data, reading):
    """The legacy format is allowed here, or a ValueError saying why not."""
    if associated_data:
        raise ValueError('associated data needs the v2 format (dataFormat = 2); '
                         'the legacy format cannot bind it')
    if reading and not service.acceptLegacy:
        raise ValueError('legacy (unauthenticated) data refused: acceptLegacy is False')


def _peek_head(fsrc):
    """The first 8 bytes of ``fsrc`` (fewer at its end), and whether the
    stream was put back where it was, so that they may be read again."""
    try:
        start = fsrc.tell() if fsrc.seekable() else None
    except (AttributeError, OSError):
        start = None
    head = b''
    while len(head) < 8:
        more = fsrc.read(8 - len(head))
        if not more:
            break
        head += bytes(more)
    if start is not None:
        fsrc.seek(start)
        return head, True
    return head, False


def _position(stream):
    try:
        return stream.tell() if stream.seekable() else None
    except (AttributeError, OSError):
        return None


@implementer(interfaces.IEncryptionService)
class EncryptionService(object):
    """Data encryption under the DEK that ``getEncryptionKey`` returns.

    Subclasses provide ``getEncryptionKey(kek) -> dek``. ``dataFormat``
    chooses what ``encrypt`` and ``encrypt_file`` write: 1, the legacy
    AES-256-CBC (key derived from the DEK and ``_bytesToKeySalt``), or 2, the
    authenticated v2 format. ``decrypt`` and ``decrypt_file`` read both;
    with ``acceptLegacy = False`` they refuse the legacy format.
    """

    # A fixed IV: existing ciphertexts depend on it (see SECURITY.md).
    initializationVector = b'0123456789ABCDEF'
    _bytesToKeySalt = b'12345678'

    dataFormat = LEGACY
    acceptLegacy = True

    def getEncryptionKey(self, key):
        raise NotImplementedError

    def _bytesToKey(self, data):
        """The 32-byte AES key for the DEK ``data``."""
        return _kmi.derive_key(data, self._bytesToKeySalt)

    def _cipherKey(self, key):
        return self._bytesToKey(self.getEncryptionKey(key))

    def _v2Key(self, key):
        """The v2 keys of ``key``'s DEK, derived once per DEK."""
        dek = self.getEncryptionKey(key)
        keys = self.__dict__.get('_v2_keys')
        if keys is None:
            keys = self.__dict__['_v2_keys'] = {}
        v2key = keys.get(dek)
        if v2key is None:
            if len(keys) >= 1000:
                keys.clear()
            v2key = keys[dek] = _kmi.V2Key(dek)
        return v2key

    def _checkEncrypting(self, key):
        """Refuse (``KeyStateError``) a key that may not encrypt any more."""

    def encrypt(self, key, data, associated_data=b''):
        """See interfaces.IEncryptionService"""
        if _check_format(self) == V2:
            sealer = self._v2Key(key)
            self._checkEncrypting(key)
            return sealer.seal(data, associated_data)
        _check_legacy(self, associated_data, reading=False)
        cipher = self._cipherKey(key)
        self._checkEncrypting(key)
        return _kmi.encrypt(cipher, self.initializationVector, data)

    def decrypt(self, key, data, associated_data=b''):
        """See interfaces.IEncryptionService; ValueError for anything but our ciphertext."""
        if data[:8] == V2_MAGIC:
            return self._v2Key(key).open(data, associated_data)
        _check_legacy(self, associated_data, reading=True)
        return _kmi.decrypt(self._cipherKey(key), self.initializationVector, data)

    def encrypt_file(self, key, fsrc, fdst, chunksize=DEFAULT_CHUNKSIZE,
                     associated_data=b''):
        """Encrypt the binary file ``fsrc`` into ``fdst`` at its current position.

        ``chunksize`` is how much is read at a time; it does not change the output.
        """
        if _check_format(self) == V2:
            sealer = self._v2Key(key)
            self._checkEncrypting(key)
            sealer.seal_file(fsrc, fdst, chunksize, associated_data)
            return
        _check_legacy(self, associated_data, reading=False)
        cipher = self._cipherKey(key)
        self._checkEncrypting(key)
        _kmi.encrypt_file(cipher, fsrc, fdst, chunksize)

    def decrypt_file(self, key, fsrc, fdst, chunksize=DEFAULT_CHUNKSIZE,
                     associated_data=b''):
        """Decrypt what ``encrypt_file`` wrote, in either format; ValueError
        if it is damaged. Then a seekable ``fdst`` is truncated back to where
        writing began, so that no unverified plaintext is left in it."""
        head, rewound = _peek_head(fsrc)
        consumed = None if rewound else head
        start = _position(fdst)
        try:
            if head == V2_MAGIC:
                self._v2Key(key).open_file(fsrc, fdst, chunksize, associated_data, consumed)
            else:
                _check_legacy(self, associated_data, reading=True)
                _kmi.decrypt_file(self._cipherKey(key), fsrc, fdst, chunksize, consumed)
        except ValueError:
            if start is not None:
                fdst.seek(start)
                fdst.truncate()
            raise

    def kid(self, key):
        """The 16-byte v2 kid of ``key``'s DEK: what v2 ciphertexts under it
        carry at bytes 10-26 (a key ring matches them by it). It survives a
        rewrap; a deactivated key still has one."""
        return self._v2Key(key).kid


class _DekCacheView(Mapping):
    """The master's DEK cache seen as ``{md5 name: (fetch time, DEK)}``."""

    def __init__(self, core):
        self._core = core

    def _entries(self):
        return {name: (fetched, dek) for name, fetched, dek in self._core.cached_deks()}

    def __getitem__(self, name):
        return self._entries()[name]

    def __iter__(self):
        return iter(self._entries())

    def __len__(self):
        return len(self._entries())

    def __delitem__(self, name):
        if not self._core.forget(name):
            raise KeyError(name)

    def clear(self):
        self._core.forget()

    def __repr__(self):
        return repr(self._entries())


@implementer(interfaces.IExtendedKeyManagementFacility)
class KeyManagementFacility(EncryptionService):
    """The master facility over the key store at ``storage_dir``: a
    directory, or a PostgreSQL URL (``keas.kmi.store``); ``store_options``
    go to the store (``keas.kmi.pgstore`` lists the database's).

    Wrapped DEKs are stored by the md5 hex digest of their KEK; the mapping
    API reaches them by that name. Unwrapped DEKs are cached for ``timeout``
    seconds, at most ``maxCachedKeys`` of them.

    Each key has a state (``keas.kmi.lifecycle``), read again from the store
    every ``stateRefresh`` seconds: a key suspended, compromised or destroyed
    through one server is refused by every server within that time. With
    ``deactivateAfter`` (seconds, a cryptoperiod) keys older than that are
    deactivated. With ``audit`` (or ``auditing = True``) every change of a
    key is written to the store's audit log before it is made.
    """

    timeout = 3600

    rsaKeyLength = 2048  # bits of each new KEK
    rsaKeyExponent = 65537
    rsaPassphrase = 'key management facility'

    keyLength = rsaKeyLength // 16  # bytes of each new DEK

    maxCachedKeys = 10000

    stateRefresh = 1.0
    deactivateAfter = None
    auditing = False
    # Only for re-encrypting the data of a compromised key (kmi reencrypt-*
    # --allow-compromised): its DEK decrypts again, never encrypts.
    allowCompromised = False

    # True while a class keeps our getEncryptionKey and _bytesToKey, so that
    # encrypt/decrypt may look the cipher up in Rust in one call.
    _native = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._native = (
            cls.getEncryptionKey is KeyManagementFacility.getEncryptionKey
            and cls._bytesToKey is EncryptionService._bytesToKey)

    def __init__(self, storage_dir, audit=None, **store_options):
        self.storage_dir = storage_dir
        self.store = open_store(storage_dir, **store_options)
        if audit is not None:
            self.auditing = bool(audit)
        self._core = _kmi.Facility(self.maxCachedKeys, self.stateRefresh)

    def _fetch(self, name):
        """The wrapped DEK for a DEK that is not cached, and its key's state
        (Rust calls this)."""
        wrapped, meta = self.store.fetch(name)
        if wrapped is None:
            if meta is not None:  # its metadata outlived it
                raise lifecycle.KeyStateError(name, lifecycle.DESTROYED, 'be used')
            raise KeyError(name)
        if not logged_by_server.get():
            logger.info('Encryption key requested: %s', name)
        return wrapped, self._state_of(name, meta)

    def _key_state(self, name):
        """The state of key ``name`` now (Rust asks again every ``stateRefresh``)."""
        return self._state_of(name, self.store.meta(name))

    def _state_of(self, name, meta):
        if meta is None:
            return lifecycle.DESTROYED  # deleted since it was cached
        state = lifecycle.effective_state(meta, self.deactivateAfter)
        if state == lifecycle.DESTROYED and meta['state'] != lifecycle.DESTROYED:
            self._expire(name, meta)  # a rewrap's grace period has ended
        return state

    def _refuse(self, name, state, encrypting):
        """The exception for a use of key ``name`` its ``state`` does not
        allow; None for the one exception: with ``allowCompromised``, a
        compromised key still decrypts (for re-encrypting what it holds)."""
        if (state == lifecycle.COMPROMISED and self.allowCompromised and not encrypting):
            logger.warning('key %s is compromised: used to decrypt, as allowCompromised '
                           'says', name)
            return None
        return lifecycle.KeyStateError(name, state, 'encrypt' if encrypting else 'be used')

    # The key lifecycle.

    def audit(self, event, name=None, outcome='ok', kid=None, sync=None):
        """Log a key event (when auditing) for the requester of the
        current request (``keas.kmi.audit.requester``)."""
        if self.auditing:
            self.store.audit(sync=sync, **self._audit_fields(event, name, outcome, kid))

    def _audit_fields(self, event, name, outcome='ok', kid=None):
        if not self.auditing:
            return None
        return dict(requester.get(), event=event, name=name, kid=kid, outcome=outcome)

    def metadata(self, name):
        """The metadata of key ``name`` with its state as it applies now
        (``KeyError`` if there is no such key)."""
        meta = self.store.meta(name)
        if meta is None:
            raise KeyError(name)
        meta = dict(meta)
        meta['stored_state'] = meta['state']
        meta['state'] = lifecycle.effective_state(meta, self.deactivateAfter)
        return meta

    def change_state(self, name, state, reason):
        """Move key ``name`` to ``state`` (deactivated, suspended, active from
        suspended, compromised, destroyed), recording the date and ``reason``.
        Destroying erases the wrapped DEK for good; the metadata stays."""
        meta = self.store.meta(name)
        if meta is None:
            raise KeyError(name)
        changed = lifecycle.transition(meta, state, reason)
        fields = self._audit_fields('state', name, 'ok: %s -> %s' % (meta['state'], state),
                                    meta.get('kid'))
        if state == lifecycle.DESTROYED:
            self.store.erase(name, changed, audit=fields)
        else:
            self.store.set_meta(name, changed, audit=fields)
        self._core.forget(name)  # this process obeys at once; others within stateRefresh
        logger.info('key %s: %s -> %s (%s)', name, meta['state'], state, reason)
        return changed

    def _expire(self, name, meta):
        """Destroy a key whose grace period ended (best effort: it is refused anyway)."""
        try:
            changed = lifecycle.transition(meta, lifecycle.DESTROYED, 'grace period ended')
            self.store.erase(name, changed, audit=self._audit_fields(
                'state', name, 'ok: %s -> destroyed' % meta['state'], meta.get('kid')))
        except (lifecycle.TransitionError, KeyError, OSError) as error:
            logger.warning('key %s: could not erase it after its grace period: %s',
                           name, error)
        self._core.forget(name)

    def rewrap(self, key, grace=None):
        """A new KEK for the DEK of ``key``, the old KEK. Data under the DEK,
        legacy and v2 alike, reads with the new KEK. The old entry is
        destroyed, so that a leaked old KEK unlocks nothing; with ``grace``
        (seconds) it is deactivated instead and destroyed after that time."""
        old_name = _kmi.kek_name(key)
        old_meta = self.store.meta(old_name)
        if old_meta is None:
            raise KeyError(old_name)
        name, kek, wrapped, kid, fingerprint = self._core.rewrap(self, key)
        state = old_meta['state']
        meta = lifecycle.new_metadata(
            name, kid, fingerprint, reason='rewrapped from %s' % old_name,
            state=state if state in (lifecycle.ACTIVE, lifecycle.DEACTIVATED)
            else lifecycle.ACTIVE, rewrapped_from=old_name)
        self.store.add(name, wrapped, meta, audit=self._audit_fields(
            'rewrap', name, 'ok: from %s' % old_name, kid.hex()))
        reason = 'rewrapped to %s' % name
        if grace:
            until = lifecycle.now_iso(time.time() + float(grace))
            changed = lifecycle.transition(old_meta, lifecycle.DEACTIVATED, reason) \
                if old_meta['state'] == lifecycle.ACTIVE else dict(old_meta)
            changed.update(destroy_after=until, rewrapped_to=name)
            self.store.set_meta(old_name, changed, audit=self._audit_fields(
                'state', old_name, 'ok: deactivated until %s' % until, kid.hex()))
        else:
            changed = lifecycle.transition(old_meta, lifecycle.DESTROYED, reason)
            changed['rewrapped_to'] = name
            self.store.erase(old_name, changed, audit=self._audit_fields(
                'state', old_name, 'ok: %s -> destroyed' % old_meta['state'], kid.hex()))
        self._core.forget(old_name)
        logger.info('key %s rewrapped as %s', old_name, name)
        return kek

    # Wrapped keys: GET and PUT /wrapped/<name> (keas.kmi.rest, docs/protocol.md).

    def wrapped(self, name):
        """``(wrapped DEK, state, kid)`` of key ``name`` as stored, for a client
        that unwraps it itself: ``KeyError`` for an unknown key,
        ``KeyStateError`` when its state refuses its DEK (as ``getEncryptionKey``)."""
        meta = self.store.meta(name)
        if meta is None:
            raise KeyError(name)
        state = lifecycle.effective_state(meta, self.deactivateAfter)
        if state == lifecycle.DESTROYED and meta['state'] != lifecycle.DESTROYED:
            self._expire(name, meta)  # a rewrap's grace period has ended
        if state not in lifecycle.SERVES:
            raise self._refuse(name, state, False)
        try:
            wrapped = self.store.get(name)
        except KeyError:  # erased since its metadata was read
            raise self._refuse(name, lifecycle.DESTROYED, False) from None
        if not logged_by_server.get():
            logger.info('Wrapped key requested: %s', name)
        return wrapped, state, meta.get('kid')

    def add_wrapped(self, name, wrapped, kid=None, fingerprint=None):
        """Store ``wrapped``, a DEK a client wrapped under a KEK of its own, as
        key ``name`` (the md5 hex of that KEK, which the facility never sees):
        ``(True, state)`` when stored now, ``(False, state)`` when these bytes
        were stored already (a client retrying). ``KeyExistsError`` for other
        bytes under ``name``; ``KeyStateError`` for the name of a destroyed
        key, which is never used again. ``kid`` and ``fingerprint`` (hex, as
        the client says) go into the metadata unchecked."""
        meta = self.store.meta(name)
        if meta is not None:
            # Checked before the store's own write-once test, which (in a
            # directory) would write new metadata over an existing key's.
            if lifecycle.effective_state(meta, self.deactivateAfter) == lifecycle.DESTROYED:
                raise self._refuse(name, lifecycle.DESTROYED, False)
            try:
                stored = self.store.get(name)
            except KeyError:
                raise self._refuse(name, lifecycle.DESTROYED, False) from None
            if stored != bytes(wrapped):
                raise _kmi.KeyExistsError(
                    'a different key is stored under the name %s already; keys are '
                    'written once' % name)
            return False, lifecycle.effective_state(meta, self.deactivateAfter)
        meta = lifecycle.new_metadata(name, kid, fingerprint, reason='stored by a client')
        self.store.add(name, bytes(wrapped), meta,
                       audit=self._audit_fields('put', name, kid=kid))
        if not logged_by_server.get():
            logger.info('New wrapped key added (hash): %s', name)
        return True, lifecycle.ACTIVE

    @property
    def __dek_cache(self):
        return _DekCacheView(self._core)

    # The mapping API over the key store.

    def keys(self):
        return self.store.names()

    def __iter__(self):
        return iter(self.keys())

    def __getitem__(self, name):
        return self.store.get(name)

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def values(self):
        return [value for name, value in self.items()]

    def items(self):
        return [(name, self[name]) for name in self.keys()]

    def __len__(self):
        return len(self.store)

    def __contains__(self, name):
        return name in self.store

    has_key = __contains__

    def __setitem__(self, name, key):
        """Store a wrapped DEK: once (``KeyExistsError`` for other bytes under ``name``)."""
        self.store.add(name, key)
        logger.info('New key added (hash): %s', name)

    def __delitem__(self, name):
        self.store.delete(name, audit=self._audit_fields('delete', name))
        self._core.forget(name)
        logger.info('Key removed (hash): %s', name)

    # Key generation and lookup.

    def generate(self):
        """See interfaces.IKeyGenerationService"""
        name, kek, wrapped, kid, fingerprint = self._core.generate(
            self.rsaKeyLength, self.rsaKeyExponent,
            _passphrase(self.rsaPassphrase), self.keyLength)
        self.store.add(name, wrapped, lifecycle.new_metadata(name, kid, fingerprint),
                       audit=self._audit_fields('generate', name, kid=kid.hex()))
        if not logged_by_server.get():
            logger.info('New key added (hash): %s', name)
        return kek

    def getEncryptionKey(self, key):
        """The DEK for the KEK ``key``: KeyError if unknown, ValueError if unusable."""
        return self._core.dek(self, key)

    def _v2Key(self, key):
        if not self._native:
            return super()._v2Key(key)
        return self._core.v2key(self, key)

    def _checkEncrypting(self, key):
        # A subclass may give DEKs the store does not hold: no state to obey.
        name = _kmi.kek_name(key)
        meta = self.store.meta(name)
        if meta is not None:
            state = lifecycle.effective_state(meta, self.deactivateAfter)
            if state not in lifecycle.ENCRYPTS:
                raise self._refuse(name, state, True)

    def encrypt(self, key, data, associated_data=b''):
        if not self._native:
            return super().encrypt(key, data, associated_data)
        return self._core.encrypt(self, key, data, associated_data)

    def decrypt(self, key, data, associated_data=b''):
        if not self._native:
            return super().decrypt(key, data, associated_data)
        return self._core.decrypt(self, key, data, associated_data)

    def __repr__(self):
        return '<%s (%i)>' % (self.__class__.__name__, len(self))


def _header(response, name):
    """A header of an ``http.client`` response (None from a stand-in without headers)."""
    getheader = getattr(response, 'getheader', None)
    return getheader(name) if getheader is not None else None


class KeyServiceError(OSError):
    """The master facility could not be reached or gave an unexpected answer."""


class WrappedKeysUnsupported(KeyServiceError):
    """The key server has no ``/wrapped/`` endpoint (keas.kmi before 4)."""


# The modes of a local facility: ``legacy`` sends the KEK to the server
# (POST /new, POST /key), as keas.kmi always did; ``wrapped`` keeps it here
# and has the server store and return wrapped DEKs only (docs/protocol.md).
KEY_MODES = ('legacy', 'wrapped')


@implementer(interfaces.IKeyManagementFacility)
class LocalKeyManagementFacility(EncryptionService):
    """A facility that gets its keys from the master at ``url``.

    DEKs are cached in memory for ``timeout`` seconds. HTTPS connections
    verify the server against the system CAs, or ``cafile`` / ``ssl_context``;
    ``certfile`` / ``keyfile`` present a client certificate (mutual TLS).
    ``connect_timeout`` and ``read_timeout`` bound each request, in seconds.

    ``keyMode='wrapped'`` keeps every KEK on this side: ``generate`` makes
    the KEK and its DEK here (``rsaKeyLength``, ``rsaKeyExponent``,
    ``rsaPassphrase``, ``keyLength``, as the master would) and has the server
    store only the wrapped DEK; ``getEncryptionKey`` fetches the wrapped DEK
    and unwraps it here. The default, ``'legacy'``, asks the server for both
    (``POST /new``, ``POST /key``), which any keas.kmi server understands.
    """

    timeout = 3600
    connect_timeout = 10.0
    read_timeout = 30.0
    httpConnFactory = http.client.HTTPConnection
    httpsConnFactory = http.client.HTTPSConnection

    keyMode = 'legacy'

    # What wrapped-mode generate() makes: the master's defaults.
    rsaKeyLength = KeyManagementFacility.rsaKeyLength
    rsaKeyExponent = KeyManagementFacility.rsaKeyExponent
    rsaPassphrase = KeyManagementFacility.rsaPassphrase
    keyLength = KeyManagementFacility.keyLength

    # How often wrapped-mode generate() sends its PUT when no answer comes
    # back: storing the same bytes again is success, so a retry is safe.
    putAttempts = 2

    def __init__(self, url, cafile=None, ssl_context=None, certfile=None,
                 keyfile=None, connect_timeout=None, read_timeout=None, keyMode=None):
        self.url = url
        self.__cache = {}
        self._cafile = cafile
        self._certfile = certfile
        self._keyfile = keyfile
        self._ssl_context = ssl_context
        if connect_timeout is not None:
            self.connect_timeout = connect_timeout
        if read_timeout is not None:
            self.read_timeout = read_timeout
        if keyMode is not None:
            self.keyMode = keyMode
        if self.keyMode not in KEY_MODES:
            raise ValueError("keyMode must be 'legacy' or 'wrapped', not %r" % (self.keyMode,))
        self._keygen = None

    def _context(self):
        if self._ssl_context is None:
            ctx = ssl.create_default_context(cafile=self._cafile)
            if self._certfile:
                ctx.load_cert_chain(self._certfile, self._keyfile)
            self._ssl_context = ctx
        return self._ssl_context

    def _connection(self):
        pieces = urlsplit(self.url)
        if pieces.scheme == 'https':
            return self.httpsConnFactory(
                pieces.netloc, timeout=self.connect_timeout,
                context=self._context())
        if pieces.scheme == 'http':
            return self.httpConnFactory(pieces.netloc, timeout=self.connect_timeout)
        raise ValueError('unsupported URL scheme in %r' % self.url)

    def _request(self, method, path, body, headers):
        """``(response, body)`` of one request; KeyServiceError when there is
        no answer."""
        conn = self._connection()
        try:
            conn.request(method, path, body, headers)
            sock = getattr(conn, 'sock', None)
            if sock is not None:
                sock.settimeout(self.read_timeout)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise KeyServiceError(
                'key service %s failed on %s: %s' % (self.url, path, e)) from e
        finally:
            close = getattr(conn, 'close', None)
            if close is not None:
                close()
        return response, data

    def _unexpected(self, response, path, data):
        text = data.decode('utf-8', 'replace').strip().splitlines()
        return KeyServiceError('key service %s answered %s %s on %s%s' % (
            self.url, getattr(response, 'status', 200), getattr(response, 'reason', ''),
            path, ': ' + text[0] if text else ''))

    def _post(self, path, body, headers):
        """The body of a 200 answer to a POST, and the key state it names."""
        response, data = self._request('POST', path, body, headers)
        status = getattr(response, 'status', 200)
        state = _header(response, lifecycle.KEY_STATE_HEADER)
        text = data.decode('utf-8', 'replace')
        if status in (403, 410) and state:
            raise lifecycle.KeyStateError(_kmi.kek_name(body) if body else path, state,
                                          'be used')
        if status == 404:
            raise KeyError(text or path)
        if status == 400:
            raise ValueError('key service %s refused the key: %s' % (self.url, text))
        if status != 200:
            raise KeyServiceError('key service %s answered %s %s on %s'
                                  % (self.url, status,
                                     getattr(response, 'reason', ''), path))
        return data, state

    # Wrapped mode: GET and PUT /wrapped/<name> (docs/protocol.md).

    def _wrapped_api(self, response):
        """Refuse the answer of a server without the /wrapped/ endpoint: it
        lacks the API header (a proxy's 5xx is reported as it is)."""
        from keas.kmi import rest
        if _header(response, rest.API_HEADER) is None \
                and getattr(response, 'status', 200) < 500:
            raise WrappedKeysUnsupported(
                'the key server at %s does not support wrapped keys (keas.kmi 4 needed)'
                % self.url)

    def _generateWrapped(self):
        from keas.kmi import rest
        if self._keygen is None:
            self._keygen = _kmi.Facility(1)
        name, kek, wrapped, kid, fingerprint = self._keygen.generate(
            self.rsaKeyLength, self.rsaKeyExponent, _passphrase(self.rsaPassphrase),
            self.keyLength)
        path = rest.WRAPPED_PATH + name
        headers = {'Content-Type': 'application/octet-stream',
                   rest.KID_HEADER: kid.hex(), rest.FINGERPRINT_HEADER: fingerprint.hex()}
        attempts = max(1, int(self.putAttempts))
        for attempt in range(attempts):
            try:
                response, data = self._request('PUT', path, wrapped, headers)
                break
            except KeyServiceError:
                if attempt + 1 == attempts:
                    raise
                time.sleep(0.1 * (attempt + 1))
        self._wrapped_api(response)
        if getattr(response, 'status', 200) in (200, 201):
            return kek  # only now: the server holds its wrapped DEK
        raise self._unexpected(response, 'PUT ' + path, data)

    def _fetchWrapped(self, key):
        """The wrapped DEK of ``key`` from the server, and its state."""
        from keas.kmi import rest
        name = _kmi.kek_name(key)
        path = rest.WRAPPED_PATH + name
        response, data = self._request('GET', path, None, {})
        self._wrapped_api(response)
        status = getattr(response, 'status', 200)
        state = _header(response, lifecycle.KEY_STATE_HEADER)
        if status == 200:
            return data, state
        if status in (403, 410) and state:
            raise lifecycle.KeyStateError(name, state, 'be used')
        if status == 404:
            raise KeyError(name)
        raise self._unexpected(response, 'GET ' + path, data)

    def generate(self):
        """See interfaces.IKeyGenerationService"""
        if self.keyMode == 'wrapped':
            return self._generateWrapped()
        return self._post('/new', b'', {})[0]

    def getEncryptionKey(self, key):
        """The DEK for ``key``, from the cache or the master facility."""
        cached = self.__cache.get(key)
        if cached is not None and cached[0] + self.timeout > time.time():
            return cached[1]
        if self.keyMode == 'wrapped':
            wrapped, state = self._fetchWrapped(key)
            # The padding and length are checked: a damaged wrapped DEK (or
            # one for another KEK) is a ValueError, never a wrong DEK.
            dek = _kmi.unwrap_dek(key, wrapped, _passphrase(self.rsaPassphrase),
                                  self.keyLength)
        else:
            dek, state = self._post('/key', key, {'content-type': 'text/plain'})
        self.__cache[key] = (time.time(), dek, state)
        return dek

    def keyState(self, key):
        """The state the server gave with ``key``'s DEK (``None`` from a server
        that does not say): fetched if it is not cached."""
        self.getEncryptionKey(key)
        return self.__cache[key][2]

    def _checkEncrypting(self, key):
        if self.keyState(key) not in (None, lifecycle.ACTIVE):
            raise lifecycle.KeyStateError(_kmi.kek_name(key), self.keyState(key), 'encrypt')

    def rewrap(self, key, grace=None):
        """A new KEK for the DEK of ``key``, from the master facility (see
        ``KeyManagementFacility.rewrap``); the old KEK is forgotten here.

        It sends the old KEK to the server (``POST /rewrap``): a facility in
        wrapped mode refuses it (ValueError), as it never sends a KEK."""
        if self.keyMode == 'wrapped':
            raise ValueError('rewrap sends the old KEK to the key server, which a facility '
                             "in wrapped mode never does; use keyMode='legacy' for it")
        path = '/rewrap' if grace is None else '/rewrap?grace=%s' % float(grace)
        new, _ = self._post(path, key, {'content-type': 'text/plain'})
        self.__cache.pop(key, None)
        return new

    def __repr__(self):
        return '<%s %r>' % (self.__class__.__name__, self.url)
