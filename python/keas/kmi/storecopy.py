"""``kmi store``: copy keys between key stores, bring a database schema up to date.

``kmi store copy SRC DST`` copies every wrapped DEK from one store to another
(a directory or a PostgreSQL URL, either way round). It never overwrites: a
key DST holds already with the same bytes counts as already there, one with
other bytes is a conflict, reported by name, and makes the exit status 1.
Every key written is read back and compared byte for byte, so a second run
copies nothing and a finished run means DST holds every key of SRC. A key's
lifecycle metadata (state, dates, kid) is copied with it.
"""
import os
import sys

from keas.kmi.cli import CommandError, progress
from keas.kmi.store import KeyExistsError, StoreUnavailable, is_database_url, open_store

EXIT_CONFLICTS = 1


def _open(location, role):
    """The store at ``location``; the source must exist already."""
    if not is_database_url(location) and role == 'source' and not os.path.isdir(location):
        raise CommandError('%s: no such key directory' % location)
    try:
        return open_store(location)
    except (OSError, ValueError, ImportError) as error:
        raise CommandError('%s: %s' % (role, _message(error))) from None


def _message(error):
    return ' '.join(str(error).split()) or error.__class__.__name__


class CopyResult:
    def __init__(self):
        self.copied = []
        self.present = []
        self.conflicts = []
        self.vanished = []  # listed by the source, gone when read

    def summary(self):
        return ('%d copied, %d already there, %d conflicts'
                % (len(self.copied), len(self.present), len(self.conflicts))
                + (', %d deleted from the source during the copy' % len(self.vanished)
                   if self.vanished else ''))


def copy_keys(src, dst, bar=None):
    """Copy every key of the store ``src`` into ``dst``; a ``CopyResult``.

    ``bar`` is called after each key (a progress bar's update)."""
    result = CopyResult()
    there = set(dst.names())
    for name in src.names():
        try:
            wrapped = src.get(name)
        except KeyError:
            result.vanished.append(name)
        else:
            if name in there:
                try:
                    same = dst.get(name) == wrapped
                except KeyError:  # deleted from dst meanwhile: copy it
                    same = None
            else:
                same = None
            if same is None:
                # Metadata recorded by the lifecycle (states, dates, kid) goes
                # along; a key stored without any stays so.
                meta = src.meta(name)
                if not (meta and meta.get('transitions')):
                    meta = None
                try:
                    dst.add(name, wrapped, meta)
                except KeyExistsError:
                    result.conflicts.append(name)
                else:
                    if dst.get(name) != wrapped:
                        raise CommandError('key %s reads back different from %s; '
                                           'stopped' % (name, dst.location))
                    result.copied.append(name)
            elif same:
                result.present.append(name)
            else:
                result.conflicts.append(name)
        if bar is not None:
            bar(1)
    return result


def run_copy(args):
    if args.src == args.dst:
        raise CommandError('the source and the destination are the same store')
    src = _open(args.src, 'source')
    try:
        dst = _open(args.dst, 'destination')
        try:
            try:
                total = len(src)
                with progress(total=total, what='keys') as bar:
                    result = copy_keys(src, dst, bar.update)
            except StoreUnavailable as error:
                raise CommandError(_message(error) + ' (run the copy again: it '
                                   'resumes where it stopped)') from None
            except (OSError, ValueError) as error:
                raise CommandError(_message(error)) from None
        finally:
            dst.close()
    finally:
        src.close()
    print('%s -> %s: %s' % (src.location, dst.location, result.summary()))
    if result.conflicts:
        print('kmi: %d keys of %s hold other bytes in %s and were not copied:'
              % (len(result.conflicts), src.location, dst.location), file=sys.stderr)
        for name in result.conflicts:
            print('  ' + name, file=sys.stderr)
        return EXIT_CONFLICTS
    return 0


def run_migrate(args):
    if not is_database_url(args.url):
        raise CommandError('%s is not a PostgreSQL URL (postgresql://...)' % args.url)
    try:
        import psycopg
        from keas.kmi import pgstore
    except ImportError as error:
        raise CommandError('needs psycopg (pip install \'keas.kmi[postgres]\'): %s'
                           % error) from None
    try:
        settings = pgstore.Settings(args.url, {})
        with psycopg.connect(settings.conninfo, autocommit=True) as conn:
            before, after = pgstore.migrate(conn, settings.schema, settings.location)
    except psycopg.Error as error:
        raise CommandError('%s: %s' % (pgstore.redact(args.url), _message(error))) from None
    except (OSError, ValueError) as error:
        raise CommandError(_message(error)) from None
    if before == after:
        print('%s: schema %s is at version %d, up to date' % (settings.location,
                                                               settings.schema, after))
    else:
        print('%s: schema %s upgraded from version %d to %d'
              % (settings.location, settings.schema, before, after))
    return 0


def register(commands):
    store = commands.add_parser(
        'store', help='copy keys between key stores; upgrade a key database',
        description='Key stores are directories of .dek files or PostgreSQL '
        'databases (postgresql://user@host:port/dbname?sslmode=verify-full).')
    sub = store.add_subparsers(dest='store_command', metavar='ACTION', required=True)
    copy = sub.add_parser(
        'copy', help='copy every key of SRC into DST (never overwrites)',
        description='Copy every wrapped DEK of SRC into DST, directory or database '
        'either way round. Keys DST holds already with the same bytes are left '
        'alone; keys it holds with other bytes are conflicts, listed at the end '
        '(exit status 1). Each copied key is read back and compared. Running the '
        'copy again copies nothing.')
    copy.add_argument('src', metavar='SRC', help='a key directory or a PostgreSQL URL')
    copy.add_argument('dst', metavar='DST', help='a key directory or a PostgreSQL URL')
    copy.set_defaults(run=run_copy)
    migrate = sub.add_parser(
        'migrate', help='create or upgrade the key schema of a database',
        description='Apply the schema steps a database lacks, in one transaction '
        '(what a server does on its first start). Run it as the role that owns '
        'the schema when the servers use a role that may only read and write keys.')
    migrate.add_argument('url', metavar='URL', help='postgresql://...')
    migrate.set_defaults(run=run_migrate)
