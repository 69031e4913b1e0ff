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

from keas.kmi import _kmi, interfaces

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


@implementer(interfaces.IEncryptionService)
class EncryptionService(object):
    """Data encryption under the DEK that ``getEncryptionKey`` returns.

    Subclasses provide ``getEncryptionKey(kek) -> dek``. The cipher is
    AES-256-CBC; its key is derived from the DEK and ``_bytesToKeySalt``.
    """

    # A fixed IV: existing ciphertexts depend on it (see SECURITY.md).
    initializationVector = b'0123456789ABCDEF'
    _bytesToKeySalt = b'12345678'

    def getEncryptionKey(self, key):
        raise NotImplementedError

    def _bytesToKey(self, data):
        """The 32-byte AES key for the DEK ``data``."""
        return _kmi.derive_key(data, self._bytesToKeySalt)

    def _cipherKey(self, key):
        return self._bytesToKey(self.getEncryptionKey(key))

    def encrypt(self, key, data):
        """See interfaces.IEncryptionService"""
        return _kmi.encrypt(self._cipherKey(key), self.initializationVector, data)

    def decrypt(self, key, data):
        """See interfaces.IEncryptionService; ValueError for anything but our ciphertext."""
        return _kmi.decrypt(self._cipherKey(key), self.initializationVector, data)

    def encrypt_file(self, key, fsrc, fdst, chunksize=DEFAULT_CHUNKSIZE):
        """Encrypt the binary file ``fsrc`` into ``fdst`` at its current position.

        ``chunksize`` is how much is read at a time; it does not change the output.
        """
        _kmi.encrypt_file(self._cipherKey(key), fsrc, fdst, chunksize)

    def decrypt_file(self, key, fsrc, fdst, chunksize=DEFAULT_CHUNKSIZE):
        """Decrypt what ``encrypt_file`` wrote; ValueError if it is damaged."""
        _kmi.decrypt_file(self._cipherKey(key), fsrc, fdst, chunksize)


def _log_fetch(name):
    if not logged_by_server.get():
        logger.info('Encryption key requested: %s', name)


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
    """The master facility over the directory ``storage_dir``.

    Wrapped DEKs are files named ``<md5 hex of the KEK>.dek``; the mapping
    API reaches them by that name. Unwrapped DEKs are cached for ``timeout``
    seconds, at most ``maxCachedKeys`` of them.
    """

    timeout = 3600

    rsaKeyLength = 2048  # bits of each new KEK
    rsaKeyExponent = 65537
    rsaPassphrase = 'key management facility'

    keyLength = rsaKeyLength // 16  # bytes of each new DEK

    maxCachedKeys = 10000

    # True while a class keeps our getEncryptionKey and _bytesToKey, so that
    # encrypt/decrypt may look the cipher up in Rust in one call.
    _native = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._native = (
            cls.getEncryptionKey is KeyManagementFacility.getEncryptionKey
            and cls._bytesToKey is EncryptionService._bytesToKey)

    def __init__(self, storage_dir):
        self.storage_dir = storage_dir
        self._core = _kmi.Facility(storage_dir, self.maxCachedKeys, _log_fetch)

    @property
    def __dek_cache(self):
        return _DekCacheView(self._core)

    # The mapping API over the storage directory.

    def keys(self):
        return self._core.names()

    def __iter__(self):
        return iter(self.keys())

    def __getitem__(self, name):
        if not isinstance(name, str):
            raise KeyError(name)
        return self._core.read(name)

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
        return len(self.keys())

    def __contains__(self, name):
        return isinstance(name, str) and self._core.contains(name)

    has_key = __contains__

    def __setitem__(self, name, key):
        self._core.write(name, key)
        logger.info('New key added (hash): %s', name)

    def __delitem__(self, name):
        if not isinstance(name, str):
            raise KeyError(name)
        self._core.remove(name)
        logger.info('Key removed (hash): %s', name)

    # Key generation and lookup.

    def generate(self):
        """See interfaces.IKeyGenerationService"""
        name, kek = self._core.generate(
            self.rsaKeyLength, self.rsaKeyExponent,
            _passphrase(self.rsaPassphrase), self.keyLength)
        if not logged_by_server.get():
            logger.info('New key added (hash): %s', name)
        return kek

    def getEncryptionKey(self, key):
        """The DEK for the KEK ``key``: KeyError if unknown, ValueError if unusable."""
        return self._core.dek(
            key, self.timeout, _passphrase(self.rsaPassphrase), self.keyLength)

    def encrypt(self, key, data):
        if not self._native:
            return super().encrypt(key, data)
        return self._core.encrypt(
            key, data, self.timeout, _passphrase(self.rsaPassphrase),
            self.keyLength, self._bytesToKeySalt, self.initializationVector)

    def decrypt(self, key, data):
        if not self._native:
            return super().decrypt(key, data)
        return self._core.decrypt(
            key, data, self.timeout, _passphrase(self.rsaPassphrase),
            self.keyLength, self._bytesToKeySalt, self.initializationVector)

    def __repr__(self):
        return '<%s (%i)>' % (self.__class__.__name__, len(self))


class KeyServiceError(OSError):
    """The master facility could not be reached or gave an unexpected answer."""


@implementer(interfaces.IKeyManagementFacility)
class LocalKeyManagementFacility(EncryptionService):
    """A facility that gets its keys from the master at ``url``.

    DEKs are cached in memory for ``timeout`` seconds. HTTPS connections
    verify the server against the system CAs, or ``cafile`` / ``ssl_context``;
    ``certfile`` / ``keyfile`` present a client certificate (mutual TLS).
    ``connect_timeout`` and ``read_timeout`` bound each request, in seconds.
    """

    timeout = 3600
    connect_timeout = 10.0
    read_timeout = 30.0
    httpConnFactory = http.client.HTTPConnection
    httpsConnFactory = http.client.HTTPSConnection

    def __init__(self, url, cafile=None, ssl_context=None, certfile=None,
                 keyfile=None, connect_timeout=None, read_timeout=None):
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

    def _post(self, path, body, headers):
        conn = self._connection()
        try:
            conn.request('POST', path, body, headers)
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
        status = getattr(response, 'status', 200)
        if status == 404:
            raise KeyError(data.decode('utf-8', 'replace') or path)
        if status == 400:
            raise ValueError('key service %s refused the key: %s'
                             % (self.url, data.decode('utf-8', 'replace')))
        if status != 200:
            raise KeyServiceError('key service %s answered %s %s on %s'
                                  % (self.url, status,
                                     getattr(response, 'reason', ''), path))
        return data

    def generate(self):
        """See interfaces.IKeyGenerationService"""
        return self._post('/new', b'', {})

    def getEncryptionKey(self, key):
        """The DEK for ``key``, from the cache or the master facility."""
        cached = self.__cache.get(key)
        if cached is not None and cached[0] + self.timeout > time.time():
            return cached[1]
        dek = self._post('/key', key, {'content-type': 'text/plain'})
        self.__cache[key] = (time.time(), dek)
        return dek

    def __repr__(self):
        return '<%s %r>' % (self.__class__.__name__, self.url)
