"""The audit log: one entry per key event, in a SHA-256 hash chain.

Each entry is one JSON object (sorted keys, no spaces) with

    seq, time          its number in the chain (from 1) and when
    event              generate, fetch, rewrap, put, state, ...
    name, kid          the key's md5 name and v2 kid (when known)
    client, subject    the client's address, and the certificate subject a
                       trusted TLS-terminating proxy passed on
    outcome            ok, or why the request was refused
    prev               the hash of the entry before (64 zeros for the first)
    hash               SHA-256 of ``prev``, a newline, ``seq``, a newline and
                       the JSON of the other fields (sorted keys, no spaces)

and never key material or a request or response body. Editing, inserting,
deleting or reordering entries breaks the chain, which ``verify`` checks.
A chain proves nothing against someone who can rewrite the whole log: ship
the entries (or at least the head hash) off the machine.

For a directory store the log is a file of JSON lines, appended under an
exclusive ``flock`` so that several server processes extend one chain.
Every entry is written (reaches the operating system) before the request
it records is answered; entries of events that change keys are fsync'd
before that, fetches in groups at least once a second and at shutdown.
When the log cannot be written the request is refused (``AuditError``).
"""
import atexit
import contextvars
import hashlib
import json
import os
import threading
import weakref

from keas.kmi import _kmi
from keas.kmi.lifecycle import now_iso

GENESIS = '0' * 64
FIELDS = ('event', 'name', 'kid', 'client', 'subject', 'outcome')
# Events that change keys: fsync'd before their request is answered.
CHANGES = frozenset(['generate', 'rewrap', 'put', 'state', 'destroy', 'copy'])


# Who is asking, for the entries of the current request: the server sets
# {'client': address, 'subject': certificate subject} for each request.
requester = contextvars.ContextVar('keas.kmi audit requester', default={})


class AuditError(OSError):
    """The audit log could not be written: the request must be refused."""


CHAIN = ('seq', 'prev', 'hash')


def canonical(entry):
    return json.dumps(entry, sort_keys=True, separators=(',', ':'), ensure_ascii=True)


def entry_fields(fields, when=None):
    """The JSON text of an event's fields, as the chain hashes it: what
    ``canonical`` makes of them (sorted keys, no spaces, ASCII), written out
    directly, as every key request pays for it."""
    values = dict(fields, time=when or now_iso())
    return '{%s}' % ','.join(
        '"%s":%s' % (key, 'null' if values.get(key) is None
                     else _quote(str(values[key])))
        for key in _BODY_KEYS)


_BODY_KEYS = tuple(sorted(FIELDS + ('time',)))
_quote = json.encoder.encode_basestring_ascii


def chain_hash(prev, seq, fields_text):
    """What links an entry to the one before (a database computes the same)."""
    return hashlib.sha256(('%s\n%d\n%s' % (prev, seq, fields_text)).encode()).hexdigest()


def check_entry(entry, prev, body_text=None):
    """Why ``entry`` (a dict) does not belong after ``prev``, or None.
    ``body_text``: the hashed JSON as stored, when the store keeps it apart."""
    seq = entry.get('seq')
    if body_text is None:
        body_text = canonical({k: v for k, v in entry.items() if k not in CHAIN})
    if not isinstance(seq, int) or chain_hash(entry.get('prev'), seq, body_text) \
            != entry.get('hash'):
        return 'its hash does not match its contents (edited)'
    if entry.get('prev') != prev:
        return ('it does not follow the entry before it '
                '(an entry was deleted, inserted or moved)')
    return None


def verify_entries(items):
    """Check a chain of ``(where, entry dict or None, body text or None)``:
    ``where`` names the entry in a report (a line number), None for an
    entry that does not parse.

    Returns ``(entries, head hash, None)``, or at the first broken entry
    ``(entries before it, their head, (where, seq or None, what is wrong))``.
    """
    prev, expected_seq, count = GENESIS, None, 0
    for where, entry, body_text in items:
        if entry is None:
            return count, prev, (where, None, 'not a JSON entry (damaged or cut off)')
        seq = entry.get('seq')
        wrong = check_entry(entry, prev, body_text)
        if wrong:
            return count, prev, (where, seq, wrong)
        if expected_seq is not None and seq != expected_seq:
            return count, prev, (where, seq, 'sequence number %r where %d was due'
                                 % (seq, expected_seq))
        prev, expected_seq, count = entry['hash'], seq + 1, count + 1
    return count, prev, None


def verify_lines(lines):
    """``verify_entries`` over (line number, JSON text) pairs of a file."""
    def parsed():
        for number, text in lines:
            try:
                entry = json.loads(text)
            except ValueError:
                entry = None
            yield number, entry if isinstance(entry, dict) else None, None
    return verify_entries(parsed())


class FileAuditLog:
    """An audit log in a file of JSON lines (created 0600). The appends are
    made by ``keas.kmi._kmi.AuditFile`` (src/audit.rs), which holds the lock."""

    def __init__(self, path, sync_interval=1.0):
        self.path = path
        self.sync_interval = sync_interval
        self._file = _kmi.AuditFile(path)
        self._flusher = None
        _OPEN_LOGS.add(self)
        at_process_exit(_flush_all)

    def append(self, sync=None, **fields):
        """Write one entry; fsync it now if ``sync`` (default: for key changes)."""
        if sync is None:
            sync = fields.get('event') in CHANGES
        try:
            seq, prev, digest = self._file.append(entry_fields(fields), sync)
        except OSError as error:
            raise AuditError('cannot write the audit log %s: %s' % (self.path, error)) from error
        if not sync and self._flusher is None:
            self._start_flusher()
        return {'seq': seq, 'prev': prev, 'hash': digest}

    def _start_flusher(self):
        self._flusher = threading.Thread(target=_flush_loop, args=(weakref.ref(self),),
                                         name='kmi-audit-fsync', daemon=True)
        self._flusher.start()

    def flush(self):
        """fsync what was written and not yet synced."""
        self._file.flush()

    def lines(self):
        """(line number, text) of every entry, for verify and tail."""
        try:
            f = open(self.path, 'rb')
        except FileNotFoundError:
            return
        with f:
            for number, raw in enumerate(f, 1):
                yield number, raw.rstrip(b'\n').decode('utf-8', 'replace')

    def verify(self):
        return verify_lines(self.lines())

    def tail(self, count):
        lines = list(self.lines())[-count:] if count else list(self.lines())
        return [json.loads(text) for _, text in lines if text.strip()]

    def close(self):
        self._file.close()


_OPEN_LOGS = weakref.WeakSet()


_exit_hooks = set()  # (pid, function) registered with multiprocessing


def at_process_exit(function):
    """Run ``function`` when this process ends, also where ``atexit`` does
    not: a worker process that ``multiprocessing`` forked (granian's server
    workers) leaves through ``os._exit``, after multiprocessing's own exit
    finalizers, which forget the parent's at the fork."""
    key = (os.getpid(), function)
    if key not in _exit_hooks:
        _exit_hooks.add(key)
        import multiprocessing.util
        multiprocessing.util.Finalize(None, function, exitpriority=100)


def _flush_loop(ref):
    """fsync a log's appended entries at least once a second, for as long
    as the log is alive."""
    while True:
        log = ref()
        if log is None:
            return
        interval = log.sync_interval
        try:
            log.flush()
        except OSError:
            pass  # reported by the next append, which fails closed
        del log
        threading.Event().wait(interval)


def _after_fork_in_child():
    """A forked child (a server worker) gets a file of its own: an inherited
    descriptor shares the parent's open file, and so its flock, which would
    then exclude nobody. (The inherited writer, whose lock another thread may
    have held at the fork, is dropped with its descriptor.) The flusher
    thread is the child's too."""
    for log in list(_OPEN_LOGS):
        log._file = _kmi.AuditFile(log.path)
        log._flusher = None
        at_process_exit(_flush_all)


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _flush_all():
    for log in list(_OPEN_LOGS):
        try:
            log.flush()
        except OSError:
            pass
