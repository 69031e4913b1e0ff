"""Where the wrapped DEKs live: a key store.

A location names one: a directory path (the embedded default, one
``<name>.dek`` file per key) or a PostgreSQL URL (``postgresql://...``,
for more than one machine; see ``keas.kmi.pgstore``). Both behave the
same: keys are written once and durably, an unknown name is a ``KeyError``,
a name that holds other bytes already is a ``KeyExistsError``, and a store
that cannot be reached just now is a ``StoreUnavailable``.
"""
import errno
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from keas.kmi import _kmi

KeyExistsError = _kmi.KeyExistsError


class StoreUnavailable(OSError):
    """The key store cannot be reached just now (the database is down or
    restarting, a connection or statement timed out, a network file system
    stopped answering). Nothing was read or written wrongly; the same call
    may succeed later. The server answers 503."""


# OSError numbers that mean "the storage is not there just now" rather than
# "this key" or "this configuration" (a network file system, a failing disk).
UNAVAILABLE_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        'EIO', 'ESTALE', 'ENOTCONN', 'ETIMEDOUT', 'EHOSTDOWN', 'EHOSTUNREACH',
        'ECONNREFUSED', 'ECONNRESET', 'ENETDOWN', 'ENETUNREACH')
    if hasattr(errno, name))


def unavailable(error, location):
    """``error`` as a ``StoreUnavailable`` when its errno says the storage is
    away; otherwise ``error`` itself."""
    if isinstance(error, OSError) and not isinstance(error, StoreUnavailable) \
            and error.errno in UNAVAILABLE_ERRNOS:
        wrapped = StoreUnavailable(
            error.errno, 'key storage %s is unavailable: %s' % (location, error.strerror))
        wrapped.__cause__ = error
        return wrapped
    return error

POSTGRES_SCHEMES = ('postgresql://', 'postgres://')


def is_database_url(location):
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


def open_store(location, **options):
    """The key store at ``location``: a directory path or a PostgreSQL URL."""
    if is_database_url(location):
        try:
            from keas.kmi.pgstore import PostgresStore
        except ImportError as error:
            raise ImportError('keas.kmi: a PostgreSQL key store needs psycopg 3 and '
                              "psycopg_pool (pip install 'keas.kmi[postgres]'): %s"
                              % error) from None
        return PostgresStore(location, **options)
    return DirectoryStore(location, **options)


def redact(url):
    """``url`` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return '<unparsable URL>'
    netloc = parts.netloc
    if '@' in netloc:
        userinfo, _, hosts = netloc.rpartition('@')
        if ':' in userinfo:
            userinfo = userinfo.split(':', 1)[0] + ':***'
        netloc = userinfo + '@' + hosts
    query = [(k, '***' if k == 'password' else v)
             for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe='*'), ''))


def one_line(error):
    """An exception's message on one line (libpq's span several)."""
    text = ' '.join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or error.__class__.__name__


class KeyStore:
    """What every key store offers, by wrapped-DEK name (md5 hex of the KEK)."""

    location = None

    def names(self):
        """The names of the stored DEKs."""
        raise NotImplementedError

    def __contains__(self, name):
        raise NotImplementedError

    def get(self, name):
        """The wrapped DEK stored under ``name``; ``KeyError`` if there is none."""
        raise NotImplementedError

    def add(self, name, wrapped):
        """Store ``wrapped`` under ``name`` durably before returning.

        Keys are written once: the same bytes again are success, other
        bytes under an existing name are ``KeyExistsError``.
        """
        raise NotImplementedError

    def delete(self, name):
        """Delete the key ``name``; ``KeyError`` if there is none."""
        raise NotImplementedError

    def close(self):
        """Release connections; the store is not used afterwards."""

    def __len__(self):
        return len(self.names())

    def __repr__(self):
        return '<%s %s>' % (self.__class__.__name__, self.location)


def _plain_name(name):
    """A str that can be a file name at all (the Rust store checks the rest)."""
    if not isinstance(name, str):
        return False
    try:
        name.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


class DirectoryStore(KeyStore):
    """A directory of ``<name>.dek`` files (created mode 0700 if missing).

    Each file is written to a temporary name, fsync'd, linked into place
    (which fails rather than overwrite) and the directory fsync'd.
    """

    def __init__(self, location):
        self.location = location
        try:
            self._dir = _kmi.DekStore(location)
        except OSError as error:
            raise unavailable(error, location)

    def names(self):
        try:
            return self._dir.names()
        except OSError as error:
            raise unavailable(error, self.location)

    def __contains__(self, name):
        return _plain_name(name) and self._dir.contains(name)

    def get(self, name):
        if not _plain_name(name):
            raise KeyError(name)
        try:
            return self._dir.get(name)
        except OSError as error:
            raise unavailable(error, self.location)

    def add(self, name, wrapped):
        if not _plain_name(name):
            raise KeyError('invalid key name %r' % (name,))
        if isinstance(wrapped, (bytearray, memoryview)):
            wrapped = bytes(wrapped)
        try:
            self._dir.put(name, wrapped)
        except OSError as error:
            raise unavailable(error, self.location)

    def delete(self, name):
        if not _plain_name(name):
            raise KeyError(name)
        try:
            self._dir.remove(name)
        except OSError as error:
            raise unavailable(error, self.location)
