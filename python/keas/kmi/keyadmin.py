"""``kmi keys`` and ``kmi audit``: key states and the audit log, for operators.

    kmi keys list --store LOCATION
    kmi keys show NAME --store LOCATION
    kmi keys deactivate|suspend|reactivate|compromise|destroy NAME --reason TEXT
    kmi audit verify --store LOCATION
    kmi audit tail --store LOCATION [-n 20] [--follow]

LOCATION is a key directory or a PostgreSQL URL (``KMI_STORE`` in the
environment saves typing it). Every state change is written to the store's
audit log, as the server writes its own. A destroyed key cannot come back:
``destroy`` wants ``--yes-destroy``.
"""
import json
import os
import sys
import time

from keas.kmi import lifecycle
from keas.kmi.cli import CommandError

# kmi keys ACTION -> the state it moves a key to.
ACTIONS = {
    'deactivate': lifecycle.DEACTIVATED,
    'suspend': lifecycle.SUSPENDED,
    'reactivate': lifecycle.ACTIVE,
    'compromise': lifecycle.COMPROMISED,
    'destroy': lifecycle.DESTROYED,
}


def _facility(args):
    """The master facility over ``--store``, auditing as a server does."""
    from keas.kmi.audit import requester
    from keas.kmi.facility import KeyManagementFacility
    from keas.kmi.store import is_database_url

    location = args.store or os.environ.get('KMI_STORE')
    if not location:
        raise CommandError('which key store? give --store LOCATION (a directory or a '
                           'postgresql:// URL) or set KMI_STORE')
    options = {}
    if getattr(args, 'audit_log', None):
        if is_database_url(location):
            raise CommandError('--audit-log is for a directory store; a database keeps '
                               'its audit log in a table')
        options['audit_log'] = args.audit_log
    if not is_database_url(location) and not os.path.isdir(location):
        raise CommandError('%s: no such key directory' % location)
    try:
        facility = KeyManagementFacility(location, audit=True, **options)
    except (OSError, ValueError, ImportError) as error:
        raise CommandError('cannot open the key store %s: %s' % (location, _line(error)))
    facility.deactivateAfter = lifecycle.parse_period(getattr(args, 'deactivate_after', None))
    # Entries of the command name the operator rather than a client address.
    requester.set({'client': 'kmi %s@%s' % (args.command, _user()), 'subject': None})
    return facility


def _user():
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def _line(error):
    return ' '.join(str(error).split()) or type(error).__name__


def _guarded(work):
    """Run ``work``, turning the errors an operator can meet into one line."""
    from keas.kmi.audit import AuditError
    from keas.kmi.store import StoreUnavailable
    try:
        return work()
    except KeyError as error:
        raise CommandError('no such key: %s' % (error.args[0] if error.args else error))
    except (lifecycle.TransitionError, AuditError, StoreUnavailable) as error:
        raise CommandError(_line(error))
    except (OSError, ValueError) as error:
        raise CommandError(_line(error))


def _short(date):
    return (date or '-').replace('T', ' ')[:19]


def keys_list(args):
    facility = _facility(args)

    def work():
        rows = []
        for name in facility.store.meta_names():
            meta = facility.metadata(name)
            changed = meta['transitions'][-1]['date'] if meta['transitions'] else None
            rows.append((name, meta['state'], _short(meta.get('created')), _short(changed)))
        return rows
    rows = _guarded(work)
    print('%-32s  %-11s  %-19s  %s' % ('name', 'state', 'created', 'last change'))
    for row in rows:
        print('%-32s  %-11s  %-19s  %s' % row)
    print('%d keys' % len(rows), file=sys.stderr)
    return 0


def keys_show(args):
    facility = _facility(args)
    meta = _guarded(lambda: facility.metadata(args.name))
    meta['stored'] = args.name in facility.store
    print(json.dumps(meta, indent=2, sort_keys=True))
    return 0


def keys_change(args):
    facility = _facility(args)
    state = ACTIONS[args.action]
    if state == lifecycle.DESTROYED and not args.yes_destroy:
        raise CommandError('destroying erases the wrapped DEK of %s for good: data under '
                           'it can never be decrypted again. Add --yes-destroy to do it'
                           % args.name)
    before = _guarded(lambda: facility.metadata(args.name))
    meta = _guarded(lambda: facility.change_state(args.name, state, args.reason))
    print('%s: %s -> %s (%s)' % (args.name, before['stored_state'], meta['state'],
                                 args.reason))
    return 0


def audit_verify(args):
    facility = _facility(args)
    log = facility.store.audit_log()
    count, head, broken = _guarded(log.verify)
    if broken:
        where, seq, what = broken
        raise CommandError('%s: entry %s (line/seq %s) is broken: %s; the %d entries '
                           'before it verify' % (log.path, seq if seq is not None else '?',
                                                 where, what, count))
    print('%s: %d entries, the chain verifies; head %s' % (log.path, count, head))
    return 0


def _format_entry(entry):
    parts = ['%6s' % entry.get('seq'), _short(entry.get('time')), '%-8s' % entry.get('event')]
    for field in ('name', 'kid', 'client', 'subject'):
        if entry.get(field):
            parts.append('%s=%s' % (field, entry[field]))
    parts.append(entry.get('outcome') or '')
    return '  '.join(str(p) for p in parts)


def audit_tail(args):
    facility = _facility(args)
    log = facility.store.audit_log()
    entries = _guarded(lambda: log.tail(args.n))
    for entry in entries:
        print(_format_entry(entry), flush=True)
    last = entries[-1]['seq'] if entries else 0
    while args.follow:
        time.sleep(0.5)
        newer = [e for e in _guarded(lambda: log.tail(0)) if e['seq'] > last]
        for entry in newer:
            print(_format_entry(entry), flush=True)
            last = entry['seq']
    return 0


def _store_options(parser):
    parser.add_argument('--store', metavar='LOCATION',
                        help='a key directory or a postgresql:// URL (default: $KMI_STORE)')
    parser.add_argument('--audit-log', metavar='FILE',
                        help="a directory store's audit log, where the server's "
                        'audit-log setting put it (default: LOCATION/audit.jsonl)')


def register(commands):
    keys = commands.add_parser('keys', help='list keys and change their states',
                               description=__doc__.split('\n\n')[0])
    actions = keys.add_subparsers(dest='keys_command', metavar='ACTION', required=True)
    listing = actions.add_parser('list', help='every key with its state and dates')
    _store_options(listing)
    listing.add_argument('--deactivate-after', metavar='PERIOD',
                         help="the server's cryptoperiod (e.g. 365d), to show the state "
                         'it applies')
    listing.set_defaults(run=keys_list)
    show = actions.add_parser('show', help="one key's metadata (JSON)")
    show.add_argument('name', metavar='NAME', help="the key's name: the md5 hex of its KEK")
    _store_options(show)
    show.add_argument('--deactivate-after', metavar='PERIOD')
    show.set_defaults(run=keys_show)
    for action, state in ACTIONS.items():
        change = actions.add_parser(action, help='move a key to the %s state' % state)
        change.add_argument('name', metavar='NAME')
        change.add_argument('--reason', required=True, metavar='TEXT',
                            help='why: recorded with the date in the key and the audit log')
        if state == lifecycle.DESTROYED:
            change.add_argument('--yes-destroy', action='store_true',
                                help='confirm: the wrapped DEK is erased for good')
        else:
            change.set_defaults(yes_destroy=False)
        _store_options(change)
        change.set_defaults(run=keys_change, action=action)

    audit = commands.add_parser('audit', help='check or read the audit log')
    actions = audit.add_subparsers(dest='audit_command', metavar='ACTION', required=True)
    verify = actions.add_parser('verify', help='check the hash chain; name the first '
                                'broken entry')
    _store_options(verify)
    verify.set_defaults(run=audit_verify)
    tail = actions.add_parser('tail', help='the last entries')
    _store_options(tail)
    tail.add_argument('-n', type=int, default=20, metavar='N',
                      help='how many (default: %(default)s; 0: all)')
    tail.add_argument('-f', '--follow', action='store_true', help='keep printing new ones')
    tail.set_defaults(run=audit_tail)
