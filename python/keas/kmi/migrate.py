"""Moving encrypted data to the v2 format and to a new key:
``kmi reencrypt-zodb`` and ``kmi reencrypt-file``.

``reencrypt-zodb`` walks every object reachable from a ZODB database's root
and rewrites each ``EncryptedPersistent`` whose state is still in the legacy
format, or (``--to NEW_KEK``) whose state names another DEK than the new
key's, in batched transactions. It decides per object from the stored
bytes, so a run that was killed (at any moment: ZODB commits are atomic) is
finished by running it again, and other clients may go on writing meanwhile:
a batch that conflicts with them is retried. It ends by loading every object
once more.

``reencrypt-file`` streams a legacy file through the decryption and into a
v2 file next to its destination, which is fsync'd, verified against the
plaintext's SHA-256 and only then renamed into place.
"""
import collections
import hashlib
import os
import random
import tempfile
import threading
import time

from keas.kmi.cli import CommandError, progress
from keas.kmi.facility import V2_MAGIC

DEFAULT_BATCH = 500
# A batch that conflicts with other clients' commits is tried again, after a
# growing pause; after SPLIT_AFTER conflicts in a row it is committed in
# halves, so that a busy application cannot starve it.
CONFLICT_RETRIES = 12
SPLIT_AFTER = 3


def add_key_options(parser, several=False):
    """Where a command gets its DEK: a KEK file and the facility that knows it."""
    if several:
        parser.add_argument('--kek', required=True, metavar='FILE', action='append',
                            help='the key encrypting key (PEM) the data is encrypted '
                            'under; legacy states are read with the first. Repeat it '
                            'for more old keys')
    else:
        parser.add_argument('--kek', required=True, metavar='FILE',
                            help='the key encrypting key (PEM) the data is encrypted under')
    parser.add_argument('--keys', required=True, metavar='LOCATION',
                        help='the master facility: its storage directory or PostgreSQL '
                        'URL, or the https:// URL of a key server')
    parser.add_argument('--allow-compromised', action='store_true',
                        help='read data under a compromised key, to re-encrypt it '
                        '(needs --keys to be the key store itself, not a server)')
    tls = parser.add_argument_group('TLS to a key server (as testclient)')
    tls.add_argument('--ca-certificate', metavar='FILE',
                     help='trust the server certificates this CA file signs')
    tls.add_argument('--cert', metavar='FILE', help='client certificate')
    tls.add_argument('--key', metavar='FILE', help='private key of --cert')


def read_kek(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as error:
        raise CommandError('cannot read the KEK %s: %s' % (path, error.strerror or error))


def open_service(args):
    """The encryption service for ``--keys``, writing v2."""
    from keas.kmi.facility import KeyManagementFacility, LocalKeyManagementFacility

    location = args.keys
    if location.startswith(('https://', 'http://')):
        from keas.kmi.testclient import ClientError, make_ssl_context
        try:
            context = (make_ssl_context(args.ca_certificate, args.cert, args.key)
                       if location.startswith('https://') else None)
        except ClientError as error:
            raise CommandError(str(error))
        service = LocalKeyManagementFacility(location, ssl_context=context)
    else:
        if not location.startswith(('postgresql://', 'postgres://')) \
                and not os.path.isdir(location):
            raise CommandError('%s: no such key storage directory' % location)
        try:
            service = KeyManagementFacility(location)
        except OSError as error:
            raise CommandError('cannot open the key store %s: %s' % (location, error))
        # A compromised key is refused everywhere but here, when asked:
        # its data is what needs re-encrypting (it still never encrypts).
        service.allowCompromised = bool(getattr(args, 'allow_compromised', False))
    if getattr(args, 'allow_compromised', False) and not isinstance(
            service, KeyManagementFacility):
        raise CommandError('--allow-compromised needs --keys to name the key store '
                           '(a directory or a PostgreSQL URL): a server never serves '
                           'a compromised key')
    service.dataFormat = 2
    return service


def check_key(service, kek, what, encrypting=False):
    """Fail early, in one line, if the facility cannot give this KEK's DEK
    (or, ``encrypting``, will not encrypt under it: a deactivated key)."""
    try:
        service.getEncryptionKey(kek)
        if encrypting:
            service.encrypt(kek, b'')
    except KeyError:
        raise CommandError('the key store does not know the %s' % what)
    except ValueError as error:
        raise CommandError('the %s cannot be used%s: %s'
                           % (what, ' to encrypt' if encrypting else '', error))
    except OSError as error:
        raise CommandError('cannot get the data key of the %s: %s' % (what, error))


# -- ZODB ----------------------------------------------------------------------


def open_database(path):
    """A ZODB database from a FileStorage path or a ZConfig file."""
    import ZODB
    import ZODB.config
    import ZODB.FileStorage

    if not os.path.exists(path):
        raise CommandError('%s: no such database file' % path)
    with open(path, 'rb') as f:
        start = f.read(64).lstrip()
    try:
        if start.startswith(b'<') or start.startswith(b'%') or path.endswith(('.conf', '.xml')):
            return ZODB.config.databaseFromURL(os.path.abspath(path))
        return ZODB.DB(ZODB.FileStorage.FileStorage(path))
    except Exception as error:  # ZConfig, lock and storage errors: one line
        raise CommandError('cannot open the database %s: %s' % (path, error))


def _gone():
    from ZODB.POSException import ReadConflictError
    # What loading an object that is not there raises: POSKeyError (a
    # KeyError) from a storage, ReadConflictError from a connection's
    # snapshot (ZODB.mvccadapter), as when a pack has removed it.
    return (KeyError, ReadConflictError)


def reachable_oids(storage):
    """Every object id reachable from the root, read from the stored
    pickles without unpickling them, in breadth-first order."""
    from ZODB.serialize import referencesf
    from ZODB.utils import z64

    seen = {z64}
    todo = [z64]
    while todo:
        oid = todo.pop()
        yield oid
        try:
            data, _ = storage.load(oid)
        except _gone():  # a dangling reference: nothing to migrate there
            continue
        for ref in referencesf(data):
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)


def stored_header(conn, oid):
    """For an EncryptedPersistent record as ``conn`` sees it: ``(1, None)``
    (legacy) or ``(2, kid)`` (v2, the kid of its DEK); else None. The plain
    state is never unpickled."""
    from keas.kmi.persistent import EncryptedPersistent

    from ZODB.utils import get_pickle_metadata

    try:
        data, _ = conn._storage.load(oid)
    except _gone():  # packed away: nothing to migrate there
        return None
    module, name = get_pickle_metadata(data)
    try:
        klass = conn._db.classFactory(conn, module, name)
    except Exception:  # not importable here: not ours to migrate
        return None
    if not (isinstance(klass, type) and issubclass(klass, EncryptedPersistent)):
        return None
    state = conn._reader.getState(data)
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], bytes):
        if state[0][:8] == V2_MAGIC:
            return 2, bytes(state[0][10:26])
    return 1, None


def stored_format(conn, oid):
    """For an EncryptedPersistent record: 1 (legacy) or 2 (v2); else None."""
    header = stored_header(conn, oid)
    return None if header is None else header[0]


LEGACY_SOURCE = 'legacy'


def _source(header, target_kid):
    """Where a state has to move from, or None if it is under ``target_kid``."""
    if header is None:
        return None
    fmt, kid = header
    if fmt == 1:
        return LEGACY_SOURCE
    return None if kid == target_kid else kid.hex()


def reencrypt_zodb(args):
    import transaction
    from zope.component import provideUtility

    from keas.kmi.interfaces import IEncryptionService, IKeyHolder
    from keas.kmi.keyholder import KeyRing

    old = [(path, read_kek(path)) for path in args.kek]
    new = read_kek(args.to) if args.to else old[0][1]
    service = open_service(args)
    for path, kek in old:
        check_key(service, kek, 'KEK in %s' % path)
    if args.to:
        # The old keys may be deactivated already; the new one must encrypt.
        check_key(service, new, 'new KEK in %s' % args.to, encrypting=True)
    # Writes under the new key; reads v2 states under any of the keys by
    # their kid, and legacy states with the first --kek.
    ring = KeyRing(new, [kek for _, kek in old], legacy=old[0][1])
    try:
        target_kid = ring.kid(service)
    except (KeyError, ValueError, OSError) as error:
        raise CommandError('cannot get the data key of the new KEK: %s' % (error,))
    provideUtility(ring, IKeyHolder)
    provideUtility(service, IEncryptionService)

    db = open_database(args.database)
    counts = {'objects': 0, 'encrypted': 0, 'rewritten': 0, 'already': 0,
              'conflicts': 0, 'by others': 0, 'found later': 0}
    moved = collections.Counter()
    try:
        storage = db.storage
        total = len(storage) if hasattr(storage, '__len__') else None
        conn = db.open()
        migrator = _Migrator(conn, target_kid, counts, moved)
        with progress(total=total, what='objects') as bar:
            # Walk what this connection sees: the database as of its last
            # commit, consistent with the states it loads.
            for oid in reachable_oids(conn._storage):
                counts['objects'] += 1
                bar.update(1)
                header = stored_header(conn, oid)
                if header is None:
                    continue
                counts['encrypted'] += 1
                source = _source(header, target_kid)
                if source is None:
                    counts['already'] += 1
                    continue
                migrator.add(oid, source)
                if len(migrator.pending) >= args.batch:
                    migrator.flush()
            migrator.flush()
        transaction.abort()
        walked = counts['rewritten']
        # Objects the walk could not see (moved by another client from where
        # it had not been to where it had) show in the verification: move
        # them and verify again.
        for rounds in range(3):
            verified, legacy, others = verify_zodb(db, counts['objects'], target_kid)
            if not others or rounds == 2:
                break
            counts['found later'] += len(others)
            for oid, source in others.items():
                migrator.add(oid, source)
                if len(migrator.pending) >= args.batch:
                    migrator.flush()
            migrator.flush()
            transaction.abort()
        conn.close()
    except (ValueError, KeyError) as error:
        transaction.abort()
        raise CommandError('cannot re-encrypt: %s' % (_one_line(error),))
    finally:
        db.close()
    kid = target_kid.hex()
    print('%d objects, %d encrypted: %d re-encrypted to v2 under kid %s, %d were '
          'under it already' % (counts['objects'], counts['encrypted'],
                                walked, kid, counts['already']))
    if moved:
        print('moved: ' + ', '.join(
            '%d from %s' % (n, source if source == LEGACY_SOURCE else 'kid ' + source)
            for source, n in sorted(moved.items(), key=lambda item: (-item[1], item[0]))))
    if counts['found later']:
        print('the verification found %d more states not under the new key (written '
              'under another key since, or moved by another client): %d moved'
              % (counts['found later'], counts['rewritten'] - walked))
    if counts['conflicts']:
        print('%d write conflicts with other clients, retried; %d states they wrote '
              'under the new key meanwhile' % (counts['conflicts'], counts['by others']))
    other = sum(1 for source in others.values() if source != LEGACY_SOURCE)
    print('verified: %d objects load, %d encrypted states still legacy, %d under '
          'another kid than %s' % (verified, legacy, other, kid))
    if legacy or other:
        raise CommandError('%d states are not under the new key (%d legacy); run '
                           'the command again' % (legacy + other, legacy))
    return 0


def _one_line(error):
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.splitlines()[0] if text else type(error).__name__


class _Migrator:
    """Rewrites batches of objects through ``conn`` under the key holder's
    key, retrying a batch that conflicts with other clients' commits."""

    def __init__(self, conn, target_kid, counts, moved):
        self.conn = conn
        self.target_kid = target_kid
        self.counts = counts
        self.moved = moved
        self.pending = {}  # oid -> where its state moves from

    def add(self, oid, source):
        self.pending[oid] = source

    def flush(self):
        if self.pending:
            batch, self.pending = self.pending, {}
            self._commit(batch)
            self.conn.cacheMinimize()

    def _commit(self, batch):
        import transaction
        from ZODB.POSException import ConflictError

        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                for oid in batch:
                    obj = self.conn.get(oid)
                    obj._p_activate()
                    obj._p_changed = True
                transaction.commit()
            except ConflictError:
                # Another client changed some of these meanwhile (writing them
                # under its own key holder's key): start again from what is
                # stored now, leaving out what needs no move any more.
                transaction.abort()
                self.counts['conflicts'] += 1
                for oid in list(batch):
                    source = _source(stored_header(self.conn, oid), self.target_kid)
                    if source is None:  # the other client wrote it under our key
                        del batch[oid]
                        self.counts['by others'] += 1
                    else:
                        batch[oid] = source
                if not batch:
                    return
                if attempt >= SPLIT_AFTER and len(batch) > 1:
                    items = list(batch.items())
                    half = len(items) // 2
                    self._commit(dict(items[:half]))
                    self._commit(dict(items[half:]))
                    return
                time.sleep(min(0.02 * 2 ** attempt, 2.0) * random.uniform(0.5, 1.0))
                continue
            self.counts['rewritten'] += len(batch)
            self.moved.update(batch.values())
            return
        raise CommandError('gave up after %d write conflicts in a row' % CONFLICT_RETRIES)


def verify_zodb(db, total=None, target_kid=None):
    """Load every reachable object in a fresh connection. Returns (loaded,
    legacy, others): others maps the oid of each encrypted state not under
    ``target_kid`` (legacy ones included) to where it is, as _source says;
    without ``target_kid``, it holds only the legacy ones."""
    import transaction

    conn = db.open()
    loaded = legacy = 0
    others = {}
    try:
        with progress(total=total, what='verified') as bar:
            for oid in reachable_oids(conn._storage):
                obj = conn.get(oid)
                try:
                    obj._p_activate()
                except Exception as error:
                    raise CommandError('object %s does not load: %s'
                                       % (oid.hex(), _one_line(error)))
                header = stored_header(conn, oid)
                if header is not None:
                    if header[0] == 1:
                        legacy += 1
                    source = _source(header, target_kid) if target_kid else (
                        LEGACY_SOURCE if header[0] == 1 else None)
                    if source is not None:
                        others[oid] = source
                loaded += 1
                bar.update(1)
                if loaded % 1000 == 0:
                    conn.cacheMinimize()
    finally:
        transaction.abort()
        conn.close()
    return loaded, legacy, others


# -- files ---------------------------------------------------------------------


class _HashingWriter:
    """A write-only stream that hashes what passes and hands it on."""

    def __init__(self, sink, bar=None):
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0
        self.bar = bar

    def write(self, data):
        self.hash.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        if self.bar is not None:
            self.bar.update(len(data))
        return len(data)

    def flush(self):
        pass


def reencrypt_file(args):
    kek = read_kek(args.kek)
    service = open_service(args)
    check_key(service, kek, 'KEK in %s' % args.kek)
    try:
        size = os.path.getsize(args.source)
        with open(args.source, 'rb') as src:
            head = src.read(8)
    except OSError as error:
        raise CommandError('cannot read %s: %s' % (args.source, error.strerror or error))
    if head == V2_MAGIC:
        raise CommandError('%s is in the v2 format already' % args.source)
    folder = os.path.dirname(os.path.abspath(args.destination))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.kmi-reencrypt-')
    try:
        with os.fdopen(fd, 'wb') as out, progress(total=size, what='B') as bar:
            plain_hash = _stream_legacy_to_v2(service, kek, args.source, out, bar)
            out.flush()
            os.fsync(out.fileno())
        check = _HashingWriter(None)
        with open(tmp, 'rb') as sealed:
            service.decrypt_file(kek, sealed, check)
        if check.hash.digest() != plain_hash.digest():
            raise CommandError('verification failed: %s does not decrypt to the '
                               'plaintext of %s' % (tmp, args.source))
        os.replace(tmp, args.destination)
        dirfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except ValueError as error:
        raise CommandError('%s: %s' % (args.source, error))
    except OSError as error:
        raise CommandError('cannot write %s: %s' % (args.destination, error.strerror or error))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print('%s: %d bytes of plaintext re-encrypted to v2 in %s (%d bytes), verified'
          % (args.source, check.size, args.destination, os.path.getsize(args.destination)))
    return 0


def _stream_legacy_to_v2(service, kek, source, out, bar):
    """Decrypt ``source`` into a pipe and seal from the pipe into ``out``, so
    the plaintext never touches a disk. Returns the plaintext's hash."""
    read_end, write_end = os.pipe()
    failure = []

    def decrypt():
        try:
            with open(source, 'rb') as src, open(write_end, 'wb') as pipe:
                writer = _HashingWriter(pipe, bar)
                decrypt.hash = writer.hash
                service.decrypt_file(kek, src, writer)
        except BaseException as error:  # reported by the calling thread
            failure.append(error)

    thread = threading.Thread(target=decrypt, name='kmi-decrypt')
    thread.start()
    try:
        with open(read_end, 'rb') as pipe:
            service.encrypt_file(kek, pipe, out)
    finally:
        thread.join()
    if failure:
        raise failure[0]
    return decrypt.hash


def register(commands):
    zodb = commands.add_parser(
        'reencrypt-zodb', help='re-encrypt the EncryptedPersistent objects of a '
        'ZODB database from the legacy format to v2, or to a new key',
        description='Rewrite every EncryptedPersistent object whose state is in '
        'the legacy format (or, with --to, under another key than the new one) '
        'in the v2 format under the new key, in batched transactions; safe to '
        'kill and run again, and while applications write. Ends by loading every '
        'object and checking that each state is under the new key.')
    zodb.add_argument('database', help='a FileStorage file (Data.fs) or a ZConfig '
                      'file naming the storage (ZEO, RelStorage, ...)')
    add_key_options(zodb, several=True)
    zodb.add_argument('--to', metavar='NEW_KEK',
                      help='move every state to the key in this file (the old keys, '
                      '--kek, may be deactivated; this one must be active); without '
                      'it the data stays under the first --kek')
    zodb.add_argument('--batch', type=int, default=DEFAULT_BATCH, metavar='N',
                      help='objects per transaction (default: %(default)s)')
    zodb.set_defaults(run=reencrypt_zodb)

    files = commands.add_parser(
        'reencrypt-file', help='turn a legacy encrypted file into a v2 file',
        description='Decrypt a file written by encrypt_file in the legacy format '
        'and write it in the v2 format: to a temporary file beside DST, fsync\'d, '
        'verified, then renamed to DST (which may be SRC).')
    files.add_argument('source', metavar='SRC')
    files.add_argument('destination', metavar='DST')
    add_key_options(files)
    files.set_defaults(run=reencrypt_file)
