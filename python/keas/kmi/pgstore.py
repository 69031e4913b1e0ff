"""The key store on PostgreSQL: wrapped DEKs in a table of their own schema.

``PostgresStore(url)`` is what ``open_store`` returns for a
``postgresql://`` or ``postgres://`` URL. It connects through libpq
(psycopg 3), so everything libpq users know works unchanged: ``sslmode``,
``sslrootcert``, ``~/.pgpass``, the ``PG*`` environment variables, service
files, several hosts with ``target_session_attrs``. A few settings of our own
may be given in the URL's query or as keyword arguments (these win):

``schema`` (``kmi``), ``pool_min_size`` (1), ``pool_max_size`` (10),
``pool_timeout`` (seconds to wait for a free connection, 5),
``statement_timeout`` (seconds, 5), and libpq's ``connect_timeout`` (5)
and ``tcp_user_timeout`` (milliseconds, 10000) unless the URL or the
environment sets them.

The schema is created on first use and versioned: ``MIGRATIONS`` is an
ordered list of SQL steps, step *n* bringing the schema to version *n*; the
missing steps are applied in one transaction under an advisory lock, so
servers that start together over a new database are safe. Stores in one
process over the same database and settings share one connection pool.
"""
import atexit
import errno
import hashlib
import os
import threading
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from keas.kmi.store import KeyExistsError, KeyStore, StoreUnavailable, one_line, redact

# The schema, version by version. Step n (counting from 1) brings the schema
# from version n - 1 to n; `{schema}` is the schema's quoted name (write any
# other brace twice). Append a step to upgrade: never edit one that has
# shipped. Keep steps additive (new tables, new columns with defaults) where
# you can, and say in the README what a step needs of the operator.
MIGRATIONS = (
    # 1: the wrapped DEKs, by the md5 hex of their KEK (FORMATS.md, 2).
    """
    CREATE TABLE {schema}.keys (
        name text PRIMARY KEY,
        wrapped bytea NOT NULL,
        created timestamptz NOT NULL DEFAULT now()
    )
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

DEFAULTS = {
    'schema': 'kmi',
    'pool_min_size': 1,
    'pool_max_size': 10,
    'pool_timeout': 5.0,
    'statement_timeout': 5.0,
}
# libpq parameters we set when neither the URL nor the environment does.
LIBPQ_DEFAULTS = {
    'connect_timeout': ('PGCONNECT_TIMEOUT', '5'),
    # Drop a connection whose sent data goes unacknowledged this long (ms):
    # a primary that vanished without a word is noticed in seconds, not hours.
    'tcp_user_timeout': (None, '10000'),
    'application_name': ('PGAPPNAME', 'keas.kmi'),
}


class SchemaVersionError(ValueError):
    """The database's key schema is newer than this keas.kmi knows."""


def _positive(name, value, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0 or (kind is int and number != float(value)):
        raise ValueError('keas.kmi: %s must be a positive %s, not %r'
                         % (name, 'integer' if kind is int else 'number', value))
    return number


class Settings:
    """The libpq connection string and our own settings, from a URL and
    keyword arguments (which win over the URL)."""

    def __init__(self, url, options):
        if not isinstance(url, str):
            raise ValueError('keas.kmi: a PostgreSQL URL must be a str, not %r' % (url,))
        self.location = redact(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k in DEFAULTS}
        libpq_query = [(k, v) for k, v in query if k not in DEFAULTS]
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ValueError('keas.kmi: unknown PostgreSQL store settings: %s (known: %s)'
                             % (', '.join(sorted(unknown)), ', '.join(sorted(DEFAULTS))))
        ours.update({k: v for k, v in options.items() if v is not None})
        values = dict(DEFAULTS, **ours)
        self.schema = values['schema']
        if not isinstance(self.schema, str) or not self.schema or '\0' in self.schema:
            raise ValueError('keas.kmi: invalid schema name %r' % (self.schema,))
        self.pool_min_size = _positive('pool_min_size', values['pool_min_size'], int)
        self.pool_max_size = _positive('pool_max_size', values['pool_max_size'], int)
        if self.pool_max_size < self.pool_min_size:
            raise ValueError('keas.kmi: pool_max_size (%d) is smaller than pool_min_size (%d)'
                             % (self.pool_max_size, self.pool_min_size))
        self.pool_timeout = _positive('pool_timeout', values['pool_timeout'], float)
        self.statement_timeout = _positive(
            'statement_timeout', values['statement_timeout'], float)
        # The URL as given, less our settings (urlunsplit would turn
        # postgresql:///db, libpq's "local socket", into postgresql:/db).
        libpq_url = url.split('?', 1)[0]
        if libpq_query:
            libpq_url += '?' + urlencode(libpq_query)
        try:
            given = conninfo_to_dict(libpq_url)
        except psycopg.ProgrammingError as error:
            raise ValueError('keas.kmi: invalid PostgreSQL URL %s: %s'
                             % (self.location, one_line(error))) from None
        extra = {name: default for name, (env, default) in LIBPQ_DEFAULTS.items()
                 if name not in given and not (env and os.environ.get(env))}
        self.conninfo = make_conninfo(libpq_url, **extra)

    _parsed = {}

    @classmethod
    def of(cls, url, options):
        """``Settings(url, options)``, remembered: a facility made per
        request must not parse its URL each time (libpq's parser, twice)."""
        try:
            key = (url, tuple(sorted(options.items())),
                   tuple(os.environ.get(env) for env, _ in LIBPQ_DEFAULTS.values() if env))
            hash(key)
        except TypeError:
            return cls(url, options)
        settings = cls._parsed.get(key)
        if settings is None:
            settings = cls(url, options)
            if len(cls._parsed) > 64:
                cls._parsed.clear()
            cls._parsed[key] = settings
        return settings

    def key(self):
        """What makes two stores share a pool (in one process)."""
        return (os.getpid(), self.conninfo, self.schema, self.pool_min_size,
                self.pool_max_size, self.pool_timeout, self.statement_timeout)


def _lock_id(schema):
    """The advisory lock that serializes migrations of one schema."""
    digest = hashlib.sha256(('keas.kmi schema ' + schema).encode('utf-8')).digest()
    return int.from_bytes(digest[:8], 'big', signed=True)


def _statements(schema):
    s = sql.Identifier(schema)
    q = {
        'get': 'SELECT wrapped FROM {s}.keys WHERE name = %s',
        'contains': 'SELECT 1 FROM {s}.keys WHERE name = %s',
        'names': 'SELECT name FROM {s}.keys ORDER BY name',
        'count': 'SELECT count(*) FROM {s}.keys',
        'insert': 'INSERT INTO {s}.keys (name, wrapped) VALUES (%s, %s) '
                  'ON CONFLICT (name) DO NOTHING',
        'delete': 'DELETE FROM {s}.keys WHERE name = %s',
    }
    return {k: sql.SQL(v).format(s=s) for k, v in q.items()}


def schema_version(conn, schema):
    """The schema's version: 0 if it has no version table (yet)."""
    row = conn.execute('SELECT to_regclass(%s)',
                       [sql.Identifier(schema, 'schema_version').as_string(conn)]).fetchone()
    if row[0] is None:
        return 0
    row = conn.execute(sql.SQL('SELECT max(version) FROM {}.schema_version')
                       .format(sql.Identifier(schema))).fetchone()
    return row[0] or 0


def _software():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return 'keas.kmi ' + version('keas.kmi')
    except PackageNotFoundError:
        return 'keas.kmi'


def _too_new(schema, location, found):
    return SchemaVersionError(
        'the key schema %s in %s is at version %d, newer than this %s knows (%d): '
        'upgrade keas.kmi' % (schema, location, found, _software(), SCHEMA_VERSION))


def migrate(conn, schema, location=''):
    """Bring ``schema`` to ``SCHEMA_VERSION``; returns (before, after).

    ``conn`` is in autocommit mode. The steps run in one transaction under an
    advisory lock: a concurrent caller waits, then finds the work done. A role
    that may only use the tables (see the README) passes when the schema is
    up to date, and gets a ``PermissionError`` saying so when it is not.
    """
    before = None
    s = sql.Identifier(schema)
    try:
        before = schema_version(conn, schema)
        if before > SCHEMA_VERSION:
            raise _too_new(schema, location, before)
        if before == SCHEMA_VERSION:
            return before, before
        with conn.transaction():
            conn.execute('SELECT pg_advisory_xact_lock(%s)', [_lock_id(schema)])
            exists = conn.execute('SELECT 1 FROM pg_namespace WHERE nspname = %s',
                                  [schema]).fetchone()
            if not exists:
                conn.execute(sql.SQL('CREATE SCHEMA {}').format(s))
            conn.execute(sql.SQL(
                'CREATE TABLE IF NOT EXISTS {}.schema_version ('
                ' version integer PRIMARY KEY,'
                ' applied timestamptz NOT NULL DEFAULT now(),'
                ' applied_by text NOT NULL DEFAULT current_user,'
                ' software text NOT NULL)').format(s))
            current = schema_version(conn, schema)  # again, under the lock
            if current > SCHEMA_VERSION:
                raise _too_new(schema, location, current)
            for version in range(current + 1, SCHEMA_VERSION + 1):
                conn.execute(sql.SQL(MIGRATIONS[version - 1]).format(schema=s))
                conn.execute(sql.SQL('INSERT INTO {}.schema_version (version, software) '
                                     'VALUES (%s, %s)').format(s), [version, _software()])
    except pg_errors.InsufficientPrivilege as error:
        found = 'has no version' if before is None else 'is at version %d' % before
        raise PermissionError(
            errno.EACCES,
            'the key schema %s in %s %s and this keas.kmi needs %d, but this role may '
            'not bring it there (%s): run `kmi store migrate` as the owner of the schema'
            % (schema, location, found, SCHEMA_VERSION, one_line(error))) from None
    return before, SCHEMA_VERSION


def _configure(statement_timeout_ms):
    def configure(conn):
        # Each key is durable before generate() returns: synchronous_commit
        # is at least `on` (remote_apply, stronger, is kept).
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false),"
            " set_config('synchronous_commit', CASE"
            " WHEN current_setting('synchronous_commit') IN ('on', 'remote_apply')"
            " THEN current_setting('synchronous_commit') ELSE 'on' END, false)",
            [str(statement_timeout_ms)])
    return configure


def _broken(error):
    """Whether ``error`` means the connection (not the statement) failed."""
    return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)) \
        and not isinstance(error, pg_errors.QueryCanceled)


class _Database:
    """One pool over one database and schema, shared by the stores of a process.

    Recovery: a connection found broken (the database restarted, failed
    over, or a network path died) marks the pool suspect. While suspect,
    requests do not wait on the pool: a direct connection attempt (at most
    one every ``PROBE_INTERVAL`` seconds; the others fail at once) tells
    whether the database is back. Until it is, every call is a
    ``StoreUnavailable``; once it is, a fresh pool replaces the old one
    (whose connections all died together) and service resumes.
    """

    PROBE_INTERVAL = 0.5

    _registry = {}
    _registry_lock = threading.Lock()

    @classmethod
    def acquire(cls, settings):
        key = settings.key()
        with cls._registry_lock:
            db = cls._registry.get(key)
            if db is None:
                db = cls(settings)
                cls._registry[key] = db
            db.users += 1
            return db

    def __init__(self, settings):
        self.settings = settings
        self.location = settings.location
        self.users = 0
        self._configure = _configure(max(1, round(settings.statement_timeout * 1000)))
        self._recover_lock = threading.Lock()
        self._suspect = False
        self._probed_at = 0.0
        self._down_reason = ''
        # One direct connection first: libpq's own words when the database
        # cannot be reached, and the schema brought up to date.
        conn = self._connect()
        try:
            self._configure(conn)
            migrate(conn, settings.schema, self.location)
            self.statements = {k: v.as_string(conn)
                               for k, v in _statements(settings.schema).items()}
        except psycopg.Error as error:
            if _broken(error):
                raise StoreUnavailable('the key database %s failed: %s'
                                       % (self.location, one_line(error))) from None
            raise
        finally:
            conn.close()
        self.pool = self._new_pool()

    def _connect(self):
        try:
            return psycopg.connect(self.settings.conninfo, autocommit=True)
        except psycopg.Error as error:
            raise StoreUnavailable('cannot connect to the key database %s: %s'
                                   % (self.location, one_line(error))) from None

    def _new_pool(self):
        s = self.settings
        pool = ConnectionPool(
            s.conninfo, min_size=s.pool_min_size, max_size=s.pool_max_size,
            timeout=s.pool_timeout, kwargs={'autocommit': True},
            configure=self._configure, open=False,
            # Bounds the pool's own reconnection backoff; see the class docstring.
            reconnect_timeout=max(10.0, 2 * s.pool_timeout),
            name='keas.kmi %s' % self.location)
        pool.open(wait=False)
        return pool

    def _pool(self):
        """The pool to use; when suspect, only once the database answers again."""
        if not self._suspect:
            return self.pool
        with self._recover_lock:
            if not self._suspect:
                return self.pool
            now = time.monotonic()
            if now - self._probed_at < self.PROBE_INTERVAL:
                raise StoreUnavailable(self._down_reason)
            self._probed_at = now
            try:
                self._connect().close()
            except StoreUnavailable as error:
                self._down_reason = str(error)
                raise
            old, self.pool = self.pool, self._new_pool()
            self._suspect = False
        # Closing waits for the old pool's threads: not on this request's time.
        threading.Thread(target=old.close, name='keas.kmi old pool', daemon=True).start()
        return self.pool

    def _lost(self, pool, error):
        """``pool`` (if still ours) lost its connection to the database."""
        with self._recover_lock:
            if pool is self.pool and not self._suspect:
                self._suspect = True
                self._probed_at = 0.0
                self._down_reason = 'the key database %s failed: %s' % (
                    self.location, one_line(error))

    def release(self):
        with self._registry_lock:
            self.users -= 1
            if self.users > 0:
                return
            if self._registry.get(self.settings.key()) is self:
                del self._registry[self.settings.key()]
        self.pool.close()

    def run(self, work):
        """``work(connection, statements)`` on a pooled connection. When the
        connection turns out broken, it is tried once more, after recovery;
        what still fails is a ``StoreUnavailable``. ``work`` must be safe to
        repeat."""
        for attempt in (1, 2):
            pool = self._pool()
            try:
                # getconn/putconn rather than `with pool.connection()`, whose
                # `with conn` also commits: nothing to commit in autocommit.
                conn = pool.getconn()
                try:
                    return work(conn, self.statements)
                finally:
                    pool.putconn(conn)
            except PoolTimeout as error:
                # Every connection busy, or none could be made: which one?
                try:
                    self._connect().close()
                except StoreUnavailable as down:
                    self._lost(pool, error)
                    raise down from None
                raise StoreUnavailable('no free connection to the key database %s within '
                                       '%gs (pool_max_size %d)'
                                       % (self.location, self.settings.pool_timeout,
                                          self.settings.pool_max_size)) from None
            except pg_errors.InsufficientPrivilege as error:
                raise PermissionError(errno.EACCES, 'key database %s: %s'
                                      % (self.location, one_line(error))) from None
            except pg_errors.ReadOnlySqlTransaction as error:
                # A standby answered (a failover is under way): reconnect.
                self._lost(pool, error)
                if attempt == 1:
                    continue
                raise StoreUnavailable('the key database %s is read-only: %s'
                                       % (self.location, one_line(error))) from None
            except (psycopg.OperationalError, psycopg.InterfaceError) as error:
                if _broken(error):
                    self._lost(pool, error)
                    if attempt == 1:
                        continue
                raise StoreUnavailable('the key database %s failed: %s'
                                       % (self.location, one_line(error))) from None

    @classmethod
    def close_all(cls):
        with cls._registry_lock:
            dbs = [db for key, db in cls._registry.items() if key[0] == os.getpid()]
            cls._registry.clear()
        for db in dbs:
            db.pool.close()


atexit.register(_Database.close_all)


def _check_name(name):
    """A name both stores can hold (the directory's rule); KeyError otherwise."""
    if (not isinstance(name, str) or not name or name.startswith('.') or '..' in name
            or any(c in name for c in '/\\\0')):
        raise KeyError('invalid key name %r' % (name,))
    try:
        name.encode('utf-8')
    except UnicodeEncodeError:
        raise KeyError('invalid key name %r' % (name,)) from None


def _get(conn, q, name):
    row = conn.execute(q['get'], [name], binary=True).fetchone()
    return None if row is None else bytes(row[0])


class PostgresStore(KeyStore):
    """Wrapped DEKs in ``<schema>.keys`` (name text primary key, wrapped
    bytea, created timestamptz) of the database at ``url``."""

    def __init__(self, url, **options):
        self._settings = Settings.of(url, options)
        self.location = self._settings.location
        self.schema = self._settings.schema
        self._db = _Database.acquire(self._settings)
        self._closed = False

    def _run(self, work):
        if self._closed:
            raise ValueError('the key store %s is closed' % self.location)
        return self._db.run(work)

    def names(self):
        return self._run(lambda conn, q: [r[0] for r in conn.execute(q['names'])])

    def __len__(self):
        return self._run(lambda conn, q: conn.execute(q['count']).fetchone()[0])

    def __contains__(self, name):
        try:
            _check_name(name)
        except KeyError:
            return False
        return self._run(
            lambda conn, q: conn.execute(q['contains'], [name]).fetchone() is not None)

    def get(self, name):
        _check_name(name)
        wrapped = self._run(lambda conn, q: _get(conn, q, name))
        if wrapped is None:
            raise KeyError(name)
        return wrapped

    def add(self, name, wrapped):
        _check_name(name)
        if not isinstance(wrapped, (bytes, bytearray, memoryview)):
            raise TypeError('a wrapped DEK is bytes, not %s' % type(wrapped).__name__)
        data = bytes(wrapped)

        def work(conn, q):
            # In autocommit, the INSERT is its own transaction: committed
            # (synchronous_commit on) when execute returns. Repeating it
            # after a lost answer finds the same bytes: success.
            for _ in range(3):
                if conn.execute(q['insert'], [name, data]).rowcount == 1:
                    return True
                stored = _get(conn, q, name)
                if stored is not None:
                    return stored == data
                # Deleted between the two statements: insert again.
            return False

        if not self._run(work):
            raise KeyExistsError('a different key is stored under the name %s already; '
                                 'keys are written once' % name)

    def delete(self, name):
        _check_name(name)
        if not self._run(lambda conn, q: conn.execute(q['delete'], [name]).rowcount):
            raise KeyError(name)

    def close(self):
        if not self._closed:
            self._closed = True
            self._db.release()

    def version(self):
        """The schema version in the database."""
        return self._run(lambda conn, q: schema_version(conn, self.schema))
