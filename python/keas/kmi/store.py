"""Where the wrapped DEKs live: a key store.

A location names one: a directory path (the embedded default, one
``<name>.dek`` file per key) or a PostgreSQL URL (``postgresql://...``,
for more than one machine; see ``keas.kmi.pgstore``). Both behave the
same: keys are written once and durably, an unknown name is a ``KeyError``,
a name that holds other bytes already is a ``KeyExistsError``, and a store
that cannot be reached just now is a ``StoreUnavailable``.
"""
import errno
import json
import os
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

    def fetch(self, name):
        """``(wrapped DEK or None, metadata or None)`` of key ``name``: what
        a server needs for a key it has not cached, in one read where the
        store can."""
        try:
            wrapped = self.get(name)
        except KeyError:
            wrapped = None
        return wrapped, self.meta(name)

    def add(self, name, wrapped, meta=None, audit=None):
        """Store ``wrapped`` (and its ``meta``) under ``name`` durably before returning.

        Keys are written once: the same bytes again are success, other
        bytes under an existing name are ``KeyExistsError``.
        """
        raise NotImplementedError

    def delete(self, name, audit=None):
        """Delete the key ``name`` and its metadata; ``KeyError`` if there is none."""
        raise NotImplementedError

    # Key metadata (keas.kmi.lifecycle) and the audit log (keas.kmi.audit).
    # ``audit``: the fields of an audit entry that records the change; the
    # store writes it before the change (in the same transaction where it
    # can), so that no change is made that the log does not show.

    def meta(self, name):
        """The metadata of key ``name``; implicit (active) for a key stored
        without; ``None`` when there is no such key."""
        raise NotImplementedError

    def set_meta(self, name, meta, audit=None):
        """Replace the metadata of an existing key."""
        raise NotImplementedError

    def erase(self, name, meta, audit=None):
        """Destroy key ``name``: erase its wrapped DEK, keep ``meta``."""
        raise NotImplementedError

    def meta_names(self):
        """Every key with a wrapped DEK or metadata (destroyed ones too)."""
        raise NotImplementedError

    def audit(self, sync=None, **fields):
        """Append an entry to the audit log (``AuditError`` if it cannot)."""
        raise NotImplementedError

    def flush_audit(self):
        """Put this process's audit entries where the log is read (a
        database store spools fetches for a moment; a file has them at once)."""

    def audit_log(self):
        """The log, for ``verify()`` and ``tail(n)``."""
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
    """A directory of ``<name>.dek`` files (created mode 0700 if missing),
    with ``<name>.meta`` metadata (JSON) beside them and the audit log in
    ``audit.jsonl`` (or ``audit_log``, a path).

    Each ``.dek`` file is written to a temporary name, fsync'd, linked into
    place (which fails rather than overwrite) and the directory fsync'd;
    ``.meta`` files the same way, but renamed (replacing the old one).
    """

    def __init__(self, location, audit_log=None):
        self.location = location
        try:
            self._dir = _kmi.DekStore(location)
        except OSError as error:
            raise unavailable(error, location)
        from keas.kmi.audit import FileAuditLog
        self._audit = FileAuditLog(audit_log or os.path.join(location, 'audit.jsonl'))

    def _io(self, call, *args):
        try:
            return call(*args)
        except OSError as error:
            raise unavailable(error, self.location)

    def names(self):
        return self._io(self._dir.names)

    def __contains__(self, name):
        return _plain_name(name) and self._dir.contains(name)

    def get(self, name):
        if not _plain_name(name):
            raise KeyError(name)
        return self._io(self._dir.get, name)

    def _audited(self, audit, change):
        """Log ``audit`` (fsync'd), then make ``change``; if that fails, log
        the failure too (best effort: the first entry was the promise)."""
        if audit is None:
            return change()
        self.audit(**audit)
        try:
            return change()
        except Exception as error:
            try:
                self.audit(**dict(audit, outcome='failed: %s' % one_line(error)))
            except OSError:
                pass
            raise

    def add(self, name, wrapped, meta=None, audit=None):
        if not _plain_name(name):
            raise KeyError('invalid key name %r' % (name,))
        if isinstance(wrapped, (bytearray, memoryview)):
            wrapped = bytes(wrapped)

        def change():
            existed = self._dir.contains(name)
            self._io(self._dir.put, name, wrapped)
            if meta is None:
                return
            try:
                self._io(self._dir.put_meta, name, _dump_meta(meta))
            except OSError:
                # A key without its metadata is half made: take it back
                # (unless it was there before), so nothing partial is left.
                if not existed:
                    try:
                        self._dir.remove(name, True)
                    except (OSError, KeyError):
                        pass
                raise
        self._audited(audit, change)

    def delete(self, name, audit=None):
        if not _plain_name(name):
            raise KeyError(name)
        self._audited(audit, lambda: self._io(self._dir.remove, name, True))

    def meta(self, name):
        if not _plain_name(name):
            return None
        data = self._io(self._dir.get_meta, name)
        if data is not None:
            return _load_meta(name, data)
        if not self._dir.contains(name):
            return None
        from keas.kmi.lifecycle import implicit_metadata, now_iso
        created = os.stat(os.path.join(self.location, name + '.dek')).st_mtime
        return implicit_metadata(name, now_iso(created))

    def set_meta(self, name, meta, audit=None):
        if self.meta(name) is None:
            raise KeyError(name)
        self._audited(audit, lambda: self._io(self._dir.put_meta, name, _dump_meta(meta)))

    def erase(self, name, meta, audit=None):
        if self.meta(name) is None:
            raise KeyError(name)

        def change():
            # The metadata says "destroyed" first: a crash in between leaves
            # a key that is refused, never one that is served.
            self._io(self._dir.put_meta, name, _dump_meta(meta))
            try:
                self._io(self._dir.remove, name, False)
            except KeyError:
                pass  # erased already
        self._audited(audit, change)

    def meta_names(self):
        return sorted(set(self.names()) | set(self._io(self._dir.meta_names)))

    def audit(self, sync=None, **fields):
        return self._audit.append(sync=sync, **fields)

    def audit_log(self):
        return self._audit

    def close(self):
        self._audit.close()


def _dump_meta(meta):
    return json.dumps(meta, sort_keys=True, indent=1).encode('utf-8')


def _load_meta(name, data):
    try:
        meta = json.loads(data)
        if not isinstance(meta, dict) or 'state' not in meta:
            raise ValueError('no state')
    except ValueError as error:
        raise ValueError('key %s: its metadata cannot be read (%s)' % (name, error)) from None
    meta.setdefault('name', name)
    return meta
