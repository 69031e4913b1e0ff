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
import fcntl
import hashlib
import json
import os
import re
import threading
import weakref

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
# How every line this module writes ends (see _line).
_CHAIN_END = re.compile(rb'"seq":(\d+),"hash":"([0-9a-f]{64})"\}\n\Z')


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


def seal_entry(fields, seq, prev, when=None):
    """The entry for ``fields`` after the entry ``(seq - 1, prev)``, and its line."""
    line = _line(entry_fields(fields, when), seq, prev)
    return json.loads(line), line


def _line(body, seq, prev):
    """The JSON line of an entry: its fields, then the chain. (The order of
    keys in the line does not matter: the hash covers ``body`` as
    ``entry_fields`` writes it, which ``check_entry`` rebuilds.)"""
    return '%s,"prev":"%s","seq":%d,"hash":"%s"}' % (
        body[:-1], prev, seq, chain_hash(prev, seq, body))


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
    """An audit log in a file of JSON lines (created 0600)."""

    def __init__(self, path, sync_interval=1.0):
        self.path = path
        self.sync_interval = sync_interval
        self._lock = threading.Lock()
        self._fd = None
        self._end = None  # file size after our last append (or read of the head)
        self._head = (0, GENESIS)
        self._unsynced = False
        self._flusher = None

    def _open(self):
        if self._fd is None:
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, mode=0o700, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
            _OPEN_LOGS.add(self)
        return self._fd

    def _read_head(self, fd, size):
        """(seq, hash) of the last entry; a partial last line (a crash in the
        middle of a write, never acknowledged) is cut off first."""
        if size == 0:
            return (0, GENESIS), 0
        # The chain ends every line: read only that, when it is whole.
        suffix = os.pread(fd, min(size, 200), max(0, size - 200))
        match = _CHAIN_END.search(suffix)
        if match:
            return (int(match.group(1)), match.group(2).decode()), size
        for span in (4096, 65536, size):
            tail = os.pread(fd, min(size, span), max(0, size - span))
            if tail.count(b'\n') >= 2 or span >= size:
                break
        if not tail.endswith(b'\n'):
            cut = tail.rfind(b'\n')
            size = size - len(tail) + cut + 1
            os.ftruncate(fd, size)
            tail = tail[:cut + 1]
            if not tail:
                return (0, GENESIS), size
        last = tail[:-1].rsplit(b'\n', 1)[-1]
        try:
            entry = json.loads(last)
            return (int(entry['seq']), entry['hash']), size
        except (ValueError, KeyError, TypeError):
            raise AuditError('the audit log %s ends in a damaged entry: run kmi audit verify'
                             % self.path)

    def append(self, sync=None, **fields):
        """Write one entry; fsync it now if ``sync`` (default: for key changes)."""
        if sync is None:
            sync = fields.get('event') in CHANGES
        body = entry_fields(fields)
        with self._lock:
            try:
                fd = self._open()
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as error:
                raise AuditError('cannot open the audit log %s: %s' % (self.path, error)) from error
            try:
                size = os.fstat(fd).st_size
                if size != self._end:  # another process wrote since
                    self._head, size = self._read_head(fd, size)
                seq = self._head[0] + 1
                data = (_line(body, seq, self._head[1]) + '\n').encode()
                try:
                    written = os.write(fd, data)
                    while written < len(data):
                        written += os.write(fd, data[written:])
                    if sync:
                        os.fsync(fd)
                except OSError as error:
                    # Leave no partial entry behind: the chain stays whole.
                    try:
                        os.ftruncate(fd, size)
                    except OSError:
                        pass
                    self._end = None
                    raise AuditError('cannot write the audit log %s: %s'
                                     % (self.path, error)) from error
                self._end = size + len(data)
                digest = data[-67:-3].decode()  # the hash, last in the line
                prev = self._head[1]
                self._head = (seq, digest)
                if not sync:
                    self._unsynced = True
                    self._start_flusher()
                return {'seq': seq, 'prev': prev, 'hash': digest}
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _start_flusher(self):
        if self._flusher is None:
            self._flusher = threading.Thread(target=_flush_loop, args=(weakref.ref(self),),
                                             name='kmi-audit-fsync', daemon=True)
            self._flusher.start()

    def flush(self):
        """fsync what was written and not yet synced (appends go on meanwhile:
        an fsync takes milliseconds here, and a lock would stall them)."""
        fd = self._fd
        if self._unsynced and fd is not None:
            self._unsynced = False
            try:
                os.fsync(fd)
            except OSError:
                self._unsynced = True
                raise

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
        with self._lock:
            if self._fd is not None:
                self.flush()
                os.close(self._fd)
                self._fd = None
                _OPEN_LOGS.discard(self)


_OPEN_LOGS = weakref.WeakSet()


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
    """A forked child (a server worker) gets its own descriptor: an inherited
    one shares the parent's open file, and so its flock, which would then
    exclude nobody. The lock and the flusher thread are the child's too."""
    for log in list(_OPEN_LOGS):
        log._lock = threading.Lock()
        log._flusher = None
        log._end = None
        if log._fd is not None:
            try:
                os.close(log._fd)
            except OSError:
                pass
            log._fd = None


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _flush_all():
    for log in list(_OPEN_LOGS):
        try:
            log.flush()
        except OSError:
            pass
