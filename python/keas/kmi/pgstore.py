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
import json
import os
import threading
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from keas.kmi.store import KeyExistsError, KeyStore, StoreUnavailable, one_line, redact

# The schema, version by version. Step n (counting from 1) brings the schema
# from version n - 1 to n; `{schema}` is the schema's quoted name (write any
# other brace twice) and `{audit_lock}` the advisory lock that serializes
# appends to its audit chain. Append a step to upgrade: never edit one that has
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
    # 2: key lifecycle (keas.kmi.lifecycle) and the audit log (keas.kmi.audit).
    # A destroyed key keeps its row, without its wrapped DEK. The audit
    # chain is extended only through audit_append, which runs as the owner
    # (SECURITY DEFINER): a server role may append entries, not change them.
    # Appends take turns under a transaction-level advisory lock and read
    # the chain's head from the last row: the table is only ever inserted
    # into (a head row updated on every append would make each append scan
    # the dead versions of that row until a vacuum).
    """
    ALTER TABLE {schema}.keys
        ALTER COLUMN wrapped DROP NOT NULL,
        ADD COLUMN state text NOT NULL DEFAULT 'active' CHECK (state IN
            ('active', 'deactivated', 'suspended', 'compromised', 'destroyed')),
        ADD COLUMN kid bytea,
        ADD COLUMN kek_fingerprint bytea,
        ADD COLUMN transitions jsonb NOT NULL DEFAULT '[]',
        ADD COLUMN details jsonb NOT NULL DEFAULT '{{}}',
        ADD CONSTRAINT destroyed_keys_hold_no_dek
            CHECK ((state = 'destroyed') = (wrapped IS NULL));
    CREATE TABLE {schema}.audit (
        seq bigint PRIMARY KEY,
        prev text NOT NULL,
        hash text NOT NULL,
        fields text NOT NULL
    );
    -- Appends the entries to the chain; the head (last seq, hash) after them.
    -- Only the two functions below, running as the owner, call it.
    CREATE FUNCTION {schema}.audit_extend(entries text[])
        RETURNS TABLE (seq bigint, hash text)
        LANGUAGE plpgsql SET search_path = pg_catalog AS $$
    DECLARE
        last_seq bigint;
        h text;
        prevs text[];
        hashes text[];
    BEGIN
        PERFORM pg_advisory_xact_lock({audit_lock});
        SELECT a.seq, a.hash INTO last_seq, h
            FROM {schema}.audit a ORDER BY a.seq DESC LIMIT 1;
        IF NOT FOUND THEN
            last_seq := 0;
            h := repeat('0', 64);
        END IF;
        prevs := array_fill(NULL::text, ARRAY[cardinality(entries)]);
        hashes := prevs;
        FOR i IN 1 .. cardinality(entries) LOOP
            prevs[i] := h;
            h := encode(sha256(convert_to(
                h || E'\n' || (last_seq + i)::text || E'\n' || entries[i], 'UTF8')), 'hex');
            hashes[i] := h;
        END LOOP;
        INSERT INTO {schema}.audit
            SELECT last_seq + u.n, u.p, u.x, u.f
            FROM unnest(prevs, hashes, entries) WITH ORDINALITY AS u (p, x, f, n);
        RETURN QUERY SELECT last_seq + cardinality(entries), h;
    END
    $$;
    REVOKE ALL ON FUNCTION {schema}.audit_extend(text[]) FROM PUBLIC;
    CREATE FUNCTION {schema}.audit_append(entry text, durable boolean)
        RETURNS TABLE (seq bigint, hash text)
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    BEGIN
        IF NOT durable THEN
            -- A fetch: committed without waiting for the WAL flush, which the
            -- WAL writer does within wal_writer_delay (200 ms by default).
            PERFORM set_config('synchronous_commit', 'off', true);
        END IF;
        RETURN QUERY SELECT * FROM {schema}.audit_extend(ARRAY[entry]);
    END
    $$;
    REVOKE ALL ON FUNCTION {schema}.audit_append(text, boolean) FROM PUBLIC;
    -- The fetch entries of a server's spool (keas.kmi.auditspool): the lines
    -- of one spool file appended in one go, unless that spool was shipped
    -- before; `done` names spools shipped and deleted since, to forget.
    CREATE TABLE {schema}.audit_spool (
        id text PRIMARY KEY,
        shipped timestamptz NOT NULL DEFAULT now()
    );
    CREATE FUNCTION {schema}.audit_ship(spool text, lines text, done text[])
        RETURNS bigint
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE
        entries text[];
    BEGIN
        -- Committed without waiting for the WAL flush (the WAL writer's, within
        -- wal_writer_delay): a slow disk must not hold fetches up.
        PERFORM set_config('synchronous_commit', 'off', true);
        DELETE FROM {schema}.audit_spool a WHERE a.id = ANY (done);
        INSERT INTO {schema}.audit_spool (id) VALUES (spool) ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RETURN 0;
        END IF;
        entries := string_to_array(rtrim(lines, E'\n'), E'\n');
        IF coalesce(cardinality(entries), 0) = 0 THEN
            RETURN 0;
        END IF;
        PERFORM {schema}.audit_extend(entries);
        RETURN cardinality(entries);
    END
    $$;
    REVOKE ALL ON FUNCTION {schema}.audit_ship(text, text, text[]) FROM PUBLIC;
    -- Keys are written once, whoever writes: a row may change its state and
    -- lose its wrapped DEK (destroyed), never get other bytes, another name,
    -- kid or KEK fingerprint, so that a server role may be granted UPDATE.
    CREATE FUNCTION {schema}.keys_written_once() RETURNS trigger
        LANGUAGE plpgsql SET search_path = pg_catalog AS $$
    BEGIN
        IF NEW.name IS DISTINCT FROM OLD.name
                OR NEW.created IS DISTINCT FROM OLD.created
                OR (NEW.wrapped IS NOT NULL AND NEW.wrapped IS DISTINCT FROM OLD.wrapped)
                OR (OLD.kid IS NOT NULL AND NEW.kid IS DISTINCT FROM OLD.kid)
                OR (OLD.kek_fingerprint IS NOT NULL
                    AND NEW.kek_fingerprint IS DISTINCT FROM OLD.kek_fingerprint) THEN
            RAISE EXCEPTION 'key % is written once: only its state may change', OLD.name
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
    END
    $$;
    CREATE TRIGGER keys_written_once BEFORE UPDATE ON {schema}.keys
        FOR EACH ROW EXECUTE FUNCTION {schema}.keys_written_once()
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

DEFAULTS = {
    'schema': 'kmi',
    'pool_min_size': 1,
    'pool_max_size': 10,
    'pool_timeout': 5.0,
    'statement_timeout': 5.0,
    'audit_spool': '',
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
        # Where fetch entries wait for the database (keas.kmi.auditspool);
        # None: each one is a round trip to it before its answer.
        spool = values['audit_spool']
        if not isinstance(spool, str):
            raise ValueError('keas.kmi: audit_spool must be a directory or "off", not %r'
                             % (spool,))
        from keas.kmi.auditspool import default_directory
        self.audit_spool = (None if spool.strip().lower() == 'off'
                            else os.path.abspath(spool) if spool.strip()
                            else default_directory())
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
                self.pool_max_size, self.pool_timeout, self.statement_timeout,
                self.audit_spool)


def _lock_id(schema, purpose='schema'):
    """The advisory lock that serializes migrations of one schema (or,
    with purpose 'audit', appends to its audit chain)."""
    digest = hashlib.sha256(('keas.kmi %s %s' % (purpose, schema)).encode('utf-8')).digest()
    return int.from_bytes(digest[:8], 'big', signed=True)


def _statements(schema):
    s = sql.Identifier(schema)
    q = {
        'get': 'SELECT wrapped FROM {s}.keys WHERE name = %s',
        'contains': 'SELECT 1 FROM {s}.keys WHERE name = %s AND wrapped IS NOT NULL',
        'names': 'SELECT name FROM {s}.keys WHERE wrapped IS NOT NULL ORDER BY name',
        'all_names': 'SELECT name FROM {s}.keys ORDER BY name',
        'count': 'SELECT count(*) FROM {s}.keys WHERE wrapped IS NOT NULL',
        'insert': 'INSERT INTO {s}.keys (name, wrapped, state, kid, kek_fingerprint, '
                  'transitions, details, created) VALUES (%s, %s, %s, %s, %s, %s, %s, '
                  'coalesce(%s::timestamptz, now())) ON CONFLICT (name) DO NOTHING',
        'delete': 'DELETE FROM {s}.keys WHERE name = %s',
        'meta': "SELECT state, to_char(created AT TIME ZONE 'UTC', "
                "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), kid, kek_fingerprint, transitions, "
                'details FROM {s}.keys WHERE name = %s',
        'set_meta': 'UPDATE {s}.keys SET state = %s, transitions = %s, details = %s, '
                    'kid = coalesce(kid, %s), kek_fingerprint = coalesce(kek_fingerprint, %s) '
                    'WHERE name = %s',
        'erase': 'UPDATE {s}.keys SET wrapped = NULL, state = %s, transitions = %s, '
                 'details = %s WHERE name = %s',
        'audit': 'SELECT seq, hash FROM {s}.audit_append(%s, %s)',
        'audit_ship': 'SELECT {s}.audit_ship(%s, %s, %s)',
        # The two a server runs per request, prepared on each pooled
        # connection (PREPARED) for _exec, with libpq's placeholders.
        'fetch_libpq': "SELECT wrapped, state, to_char(created AT TIME ZONE 'UTC', "
                       "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), kid, kek_fingerprint, "
                       'transitions, details FROM {s}.keys WHERE name = $1',
        'audit_libpq': 'SELECT seq, hash FROM {s}.audit_append($1, $2)',
        'audit_lines': 'SELECT seq, prev, hash, fields FROM {s}.audit WHERE seq > %s '
                       'ORDER BY seq LIMIT 10000',
    }
    return {k: sql.SQL(v).format(s=s) for k, v in q.items()}


# Prepared statement names (on each pooled connection) of _statements' keys.
PREPARED = {'fetch_libpq': b'kmi_fetch', 'audit_libpq': b'kmi_audit'}


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
                conn.execute(sql.SQL(MIGRATIONS[version - 1]).format(
                    schema=s, audit_lock=sql.Literal(_lock_id(schema, 'audit'))))
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
        self.pid = os.getpid()
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
        self._spool = None
        self._spool_lock = threading.Lock()
        if settings.audit_spool and self._orphans():
            self.spool()  # what servers that stopped left is shipped now

    # The audit spool (keas.kmi.auditspool), made on the first fetch entry.

    def _spool_tag(self):
        """The database and schema, in the names of their spool files (the
        connection string less our own settings; hashed: it may hold a password)."""
        text = '%s\0%s' % (self.settings.conninfo, self.settings.schema)
        return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]

    def _orphans(self):
        try:
            return any(name.startswith(self._spool_tag() + '.')
                       for name in os.listdir(self.settings.audit_spool))
        except OSError:
            return False

    def spool(self):
        if self._spool is None:
            from keas.kmi.auditspool import AuditSpool
            with self._spool_lock:
                if self._spool is None:
                    self._spool = AuditSpool(self.settings.audit_spool, self._spool_tag(),
                                             self._ship_spool)
        return self._spool

    def _ship_spool(self, spool_id, lines, done):
        self.run(lambda conn, q: conn.execute(q['audit_ship'], [spool_id, lines, done]))

    def flush_spool(self):
        """This process's fetch entries into the table (before a key change,
        whose entry is committed with it, and before the table is read)."""
        spool = self._spool
        if spool is not None and spool.pending():
            spool.ship()

    def _close(self):
        if self._spool is not None:
            self._spool.close()
        self.pool.close()

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
            configure=self._configure_pooled, open=False,
            # Bounds the pool's own reconnection backoff; see the class docstring.
            reconnect_timeout=max(10.0, 2 * s.pool_timeout),
            name='keas.kmi %s' % self.location)
        pool.open(wait=False)
        return pool

    def _configure_pooled(self, conn):
        self._configure(conn)
        for key, name in PREPARED.items():
            # A failure here shows in _exec, whose callers then use psycopg.
            conn.pgconn.prepare(name, self.statements[key].encode('utf-8'))

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
        self._close()

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
            db._close()


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


# The metadata fields that have columns; the rest is kept in `details`.
_META_COLUMNS = ('name', 'state', 'created', 'kid', 'kek_fingerprint', 'transitions')


def _meta_params(meta):
    from psycopg.types.json import Jsonb
    details = {k: v for k, v in meta.items() if k not in _META_COLUMNS}
    hexes = [bytes.fromhex(meta[k]) if meta.get(k) else None for k in ('kid', 'kek_fingerprint')]
    return meta['state'], Jsonb(meta.get('transitions', [])), Jsonb(details), hexes


def _exec(conn, name, params):
    """The rows (lists of str or None) of the statement prepared as ``name``
    on ``conn`` (see ``PREPARED``), run by libpq's blocking
    ``PQexecPrepared``; None when that did not succeed, and the caller then
    runs the statement through psycopg's ``execute``, which raises the
    error as psycopg does (or succeeds).

    For the statements of a key not cached and of an audit entry without
    a spool. Measured on loopback, one connection: the audit statement took
    128 us and 24 us of this process's CPU this way, 137 us and 45 us
    through ``conn.execute``; ``SELECT 1`` 63-67 against 72-87 us. libpq
    releases the GIL while it waits.
    """
    result = conn.pgconn.exec_prepared(name, params)
    if result.status != pq.ExecStatus.TUPLES_OK:
        return None
    return [[None if v is None else v.decode('utf-8')
             for v in (result.get_value(row, col) for col in range(result.nfields))]
            for row in range(result.ntuples)]


def _bytea(text):
    """A bytea in the text format (hex: ``\\x...``)."""
    return bytes.fromhex(text[2:])


def _meta_of(name, state, created, kid, fingerprint, transitions, details):
    meta = dict(details or {})
    meta.update(name=name, state=state, created=created,
                kid=bytes(kid).hex() if kid else None,
                kek_fingerprint=bytes(fingerprint).hex() if fingerprint else None,
                transitions=transitions or [])
    return meta


def _meta(conn, q, name):
    row = conn.execute(q['meta'], [name]).fetchone()
    return None if row is None else _meta_of(name, *row)


def _get(conn, q, name):
    row = conn.execute(q['get'], [name], binary=True).fetchone()
    # No row, or a destroyed key's row (its wrapped DEK erased).
    return None if row is None or row[0] is None else bytes(row[0])


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
        if self._db.pid != os.getpid():
            # A forked child (a server worker) inherited the pool: its
            # threads are gone and its sockets are the parent's. Leave them
            # be (closing would end the parent's sessions) and connect anew.
            self._db = _Database.acquire(self._settings)
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

    def add(self, name, wrapped, meta=None, audit=None):
        _check_name(name)
        if not isinstance(wrapped, (bytes, bytearray, memoryview)):
            raise TypeError('a wrapped DEK is bytes, not %s' % type(wrapped).__name__)
        data = bytes(wrapped)
        from keas.kmi.lifecycle import implicit_metadata
        state, transitions, details, (kid, fingerprint) = _meta_params(
            meta or implicit_metadata(name))
        created = (meta or {}).get('created')

        if audit is not None:
            self._db.flush_spool()

        def work(conn, q):
            # The INSERT and its audit entry are one transaction, committed
            # (synchronous_commit on) when it ends. Repeating it after a lost
            # answer finds the same bytes: success.
            for _ in range(3):
                with conn.transaction():
                    inserted = conn.execute(q['insert'], [
                        name, data, state, kid, fingerprint, transitions, details,
                        created]).rowcount == 1
                    if inserted and audit is not None:
                        self._append(conn, q, audit, True)
                if inserted:
                    return True
                stored = _get(conn, q, name)
                if stored is not None:
                    return stored == data
                # Deleted between the two statements: insert again.
            return False

        if not self._run(work):
            raise KeyExistsError('a different key is stored under the name %s already; '
                                 'keys are written once' % name)

    def delete(self, name, audit=None):
        _check_name(name)
        if audit is not None:
            self._db.flush_spool()

        def work(conn, q):
            with conn.transaction():
                deleted = conn.execute(q['delete'], [name]).rowcount
                if deleted and audit is not None:
                    self._append(conn, q, audit, True)
            return deleted
        if not self._run(work):
            raise KeyError(name)

    def meta(self, name):
        try:
            _check_name(name)
        except KeyError:
            return None
        return self._run(lambda conn, q: _meta(conn, q, name))

    def fetch(self, name):
        try:
            _check_name(name)
        except KeyError:
            return None, None

        def work(conn, q):
            rows = _exec(conn, PREPARED['fetch_libpq'], [name.encode('utf-8')])
            if rows is None:  # an error: psycopg's way raises it (or succeeds)
                return _get(conn, q, name), _meta(conn, q, name)
            if not rows:
                return None, None
            wrapped, state, created, kid, fingerprint, transitions, details = rows[0]
            return (None if wrapped is None else _bytea(wrapped), _meta_of(
                name, state, created, kid and _bytea(kid), fingerprint and _bytea(fingerprint),
                json.loads(transitions), json.loads(details)))
        return self._run(work)

    def _update(self, statement, params, name, audit):
        if audit is not None:
            self._db.flush_spool()

        def work(conn, q):
            with conn.transaction():
                changed = conn.execute(q[statement], params).rowcount
                if changed and audit is not None:
                    self._append(conn, q, audit, True)
            return changed
        if not self._run(work):
            raise KeyError(name)

    def set_meta(self, name, meta, audit=None):
        _check_name(name)
        state, transitions, details, (kid, fingerprint) = _meta_params(meta)
        self._update('set_meta', [state, transitions, details, kid, fingerprint, name],
                     name, audit)

    def erase(self, name, meta, audit=None):
        _check_name(name)
        state, transitions, details, _ = _meta_params(meta)
        self._update('erase', [state, transitions, details, name], name, audit)

    def meta_names(self):
        return self._run(lambda conn, q: [r[0] for r in conn.execute(q['all_names'])])

    @staticmethod
    def _append(conn, q, fields, durable):
        from keas.kmi.audit import entry_fields
        seq, digest = conn.execute(q['audit'], [entry_fields(fields), durable]).fetchone()
        return {'seq': seq, 'hash': digest}

    def audit(self, sync=None, **fields):
        from keas.kmi.audit import CHANGES, entry_fields
        durable = fields.get('event') in CHANGES if sync is None else sync
        text = entry_fields(fields)
        if self._closed:
            raise ValueError('the key store %s is closed' % self.location)
        if self._db.pid != os.getpid():
            self._db = _Database.acquire(self._settings)
        if not durable and self._settings.audit_spool:
            self._db.spool().append(text)
            return None
        self._db.flush_spool()

        def work(conn, q):
            rows = _exec(conn, PREPARED['audit_libpq'], [text.encode('utf-8'), b't' if durable else b'f'])
            if rows is None:  # an error: raised as psycopg raises it
                return self._append(conn, q, fields, durable)
            return {'seq': int(rows[0][0]), 'hash': rows[0][1]}
        return self._run(work)

    def flush_audit(self):
        self._db.flush_spool()

    def audit_log(self):
        self.flush_audit()
        return _DatabaseAuditLog(self)

    def close(self):
        if not self._closed:
            self._closed = True
            self._db.release()

    def version(self):
        """The schema version in the database."""
        return self._run(lambda conn, q: schema_version(conn, self.schema))


class _DatabaseAuditLog:
    """The audit table, read as the file log is (for verify and tail)."""

    def __init__(self, store):
        self.store = store
        self.path = '%s (table %s.audit)' % (store.location, store.schema)

    def entries(self):
        """(seq, entry dict or None, the hashed text) of every entry, in order."""
        import json
        after = 0
        while True:
            rows = self.store._run(
                lambda conn, q: conn.execute(q['audit_lines'], [after]).fetchall())
            if not rows:
                return
            for seq, prev, digest, fields in rows:
                try:
                    entry = json.loads(fields)
                except ValueError:
                    entry = None
                if isinstance(entry, dict):
                    entry.update(seq=seq, prev=prev, hash=digest)
                else:
                    entry = None
                yield seq, entry, fields
            after = rows[-1][0]

    def verify(self):
        from keas.kmi.audit import verify_entries
        return verify_entries(self.entries())

    def tail(self, count):
        entries = [e for _, e, _ in self.entries() if e is not None]
        return entries[-count:] if count else entries
