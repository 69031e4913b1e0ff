"""Moving encrypted data to the v2 format: ``kmi reencrypt-zodb`` and
``kmi reencrypt-file``.

``reencrypt-zodb`` walks every object reachable from a ZODB database's root
and rewrites each ``EncryptedPersistent`` whose state is still in the legacy
format, in batched transactions. It decides per object from the stored
bytes, so a run that was killed (at any moment: ZODB commits are atomic) is
finished by running it again. It ends by loading every object once more.

``reencrypt-file`` streams a legacy file through the decryption and into a
v2 file next to its destination, which is fsync'd, verified against the
plaintext's SHA-256 and only then renamed into place.
"""
import hashlib
import os
import tempfile
import threading

from keas.kmi.cli import CommandError, progress
from keas.kmi.facility import V2_MAGIC

DEFAULT_BATCH = 500


def add_key_options(parser):
    """Where a command gets its DEK: a KEK file and the facility that knows it."""
    parser.add_argument('--kek', required=True, metavar='FILE',
                        help='the key encrypting key (PEM) the data is encrypted under')
    parser.add_argument('--keys', required=True, metavar='LOCATION',
                        help='the master facility: its storage directory or PostgreSQL '
                        'URL, or the https:// URL of a key server')
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
    service.dataFormat = 2
    return service


def check_key(service, kek, what):
    """Fail early, in one line, if the facility cannot give this KEK's DEK."""
    try:
        service.getEncryptionKey(kek)
    except KeyError:
        raise CommandError('the key store does not know the %s' % what)
    except ValueError as error:
        raise CommandError('the %s cannot be used: %s' % (what, error))
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
        except KeyError:  # a dangling reference: nothing to migrate there
            continue
        for ref in referencesf(data):
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)


def stored_format(conn, oid):
    """For an EncryptedPersistent record: 1 (legacy) or 2 (v2); else None."""
    from keas.kmi.persistent import EncryptedPersistent

    from ZODB.utils import get_pickle_metadata

    data, _ = conn._storage.load(oid)
    module, name = get_pickle_metadata(data)
    try:
        klass = conn._db.classFactory(conn, module, name)
    except Exception:  # not importable here: not ours to migrate
        return None
    if not (isinstance(klass, type) and issubclass(klass, EncryptedPersistent)):
        return None
    state = conn._reader.getState(data)
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], bytes):
        return 2 if state[0][:8] == V2_MAGIC else 1
    return 1


def reencrypt_zodb(args):
    import transaction
    from zope.component import provideUtility
    from ZODB.POSException import ConflictError

    from keas.kmi.interfaces import IEncryptionService, IKeyHolder
    from keas.kmi.keyholder import KeyHolder

    kek = read_kek(args.kek)
    service = open_service(args)
    check_key(service, kek, 'KEK in %s' % args.kek)
    provideUtility(KeyHolder(args.kek), IKeyHolder)
    provideUtility(service, IEncryptionService)

    db = open_database(args.database)
    counts = {'objects': 0, 'encrypted': 0, 'rewritten': 0, 'v2 already': 0}
    try:
        storage = db.storage
        total = len(storage) if hasattr(storage, '__len__') else None
        conn = db.open()
        pending = []

        def commit():
            # A conflict means the application changed these objects meanwhile
            # (writing them in its own format): retry the batch from the store.
            for attempt in range(5):
                try:
                    for oid in pending:
                        obj = conn.get(oid)
                        obj._p_activate()
                        obj._p_changed = True
                    transaction.commit()
                    counts['rewritten'] += len(pending)
                    pending.clear()
                    return
                except ConflictError:
                    transaction.abort()
                    pending[:] = [o for o in pending if stored_format(conn, o) == 1]
            raise CommandError('gave up after 5 write conflicts in a row')

        with progress(total=total, what='objects') as bar:
            for oid in reachable_oids(storage):
                counts['objects'] += 1
                bar.update(1)
                fmt = stored_format(conn, oid)
                if fmt is None:
                    continue
                counts['encrypted'] += 1
                if fmt == 2:
                    counts['v2 already'] += 1
                    continue
                pending.append(oid)
                if len(pending) >= args.batch:
                    commit()
                    conn.cacheMinimize()
            if pending:
                commit()
        transaction.abort()
        conn.close()
        verified, legacy = verify_zodb(db, counts['objects'])
    except (ValueError, KeyError) as error:
        transaction.abort()
        raise CommandError('cannot re-encrypt: %s' % (error,))
    finally:
        db.close()
    print('%(objects)d objects, %(encrypted)d encrypted: %(rewritten)d re-encrypted '
          'to v2, %(v2 already)d were v2 already' % counts)
    print('verified: %d objects load, %d encrypted states still legacy' % (verified, legacy))
    if legacy:
        raise CommandError('%d states are still legacy' % legacy)
    return 0


def verify_zodb(db, total=None):
    """Load every reachable object in a fresh connection; (loaded, legacy)."""
    import transaction

    conn = db.open()
    loaded = legacy = 0
    try:
        with progress(total=total, what='verified') as bar:
            for oid in reachable_oids(db.storage):
                obj = conn.get(oid)
                try:
                    obj._p_activate()
                except Exception as error:
                    raise CommandError('object %s does not load: %s'
                                       % (oid.hex(), error))
                if stored_format(conn, oid) == 1:
                    legacy += 1
                loaded += 1
                bar.update(1)
                if loaded % 1000 == 0:
                    conn.cacheMinimize()
    finally:
        transaction.abort()
        conn.close()
    return loaded, legacy


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
        'ZODB database from the legacy format to v2',
        description='Rewrite every EncryptedPersistent object whose state is in '
        'the legacy format in the v2 format, in batched transactions; safe to '
        'kill and run again. Ends by loading every object.')
    zodb.add_argument('database', help='a FileStorage file (Data.fs) or a ZConfig '
                      'file naming the storage (ZEO, RelStorage, ...)')
    add_key_options(zodb)
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
