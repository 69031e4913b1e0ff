"""Where the wrapped DEKs live: a key store.

A location names one: a directory path (the embedded default, one
``<name>.dek`` file per key) or a PostgreSQL URL (``postgresql://...``,
for more than one machine; see ``keas.kmi.pgstore``). Both behave the
same: keys are written once and durably, an unknown name is a ``KeyError``,
and a name that holds other bytes already is a ``KeyExistsError``.
"""
from keas.kmi import _kmi

KeyExistsError = _kmi.KeyExistsError

POSTGRES_SCHEMES = ('postgresql://', 'postgres://')


def is_database_url(location):
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


def open_store(location, **options):
    """The key store at ``location``: a directory path or a PostgreSQL URL."""
    if is_database_url(location):
        from keas.kmi.pgstore import PostgresStore
        return PostgresStore(location, **options)
    return DirectoryStore(location, **options)


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


class DirectoryStore(KeyStore):
    """A directory of ``<name>.dek`` files (created mode 0700 if missing).

    Each file is written to a temporary name, fsync'd, linked into place
    (which fails rather than overwrite) and the directory fsync'd.
    """

    def __init__(self, location):
        self.location = location
        self._dir = _kmi.DekStore(location)

    def names(self):
        return self._dir.names()

    def __contains__(self, name):
        return isinstance(name, str) and self._dir.contains(name)

    def get(self, name):
        if not isinstance(name, str):
            raise KeyError(name)
        return self._dir.get(name)

    def add(self, name, wrapped):
        self._dir.put(name, wrapped)

    def delete(self, name):
        if not isinstance(name, str):
            raise KeyError(name)
        self._dir.remove(name)
