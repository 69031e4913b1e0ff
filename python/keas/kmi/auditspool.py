"""The audit spool of a database store: the entries of DEK fetches, written
to a local file before their request is answered and moved into the
database's audit table in batches.

Every ``POST /key`` is a fetch to log. An entry appended to the table per
request is a database round trip per request, on the path of an answer the
DEK cache would otherwise give at once; a line in a local file costs what
the directory store's log costs. The spool keeps the audit log's rules
(``keas.kmi.audit``):

- An entry is written (reaches the operating system) before its request is
  answered. A crash of the server loses none: the next server process over
  the same spool directory and database moves what it left into the table.
- The spool is shipped, in order, every ``INTERVAL`` seconds; each
  shipment is committed without waiting for the WAL flush, which the
  database's WAL writer makes within ``wal_writer_delay`` (200 ms): a power
  loss can lose up to the last second of fetches, as the directory store's
  fsync policy allows.
- Fail closed: when the spool cannot be written, or an entry has waited
  ``MAX_LAG`` seconds without reaching the table (the database is down or
  does not answer), fetches are refused until it does.
- Each spool file is shipped in one transaction, which also records its id:
  a file shipped before (a crash between the commit and its deletion) is
  not appended again.

Entries of events that change keys are not spooled: they are committed with
the change, after this process's spool is shipped, so that the chain keeps
each process's order. Between processes the chain's order is the order of
arrival in the table; each entry carries its own time.

One spool per process and database: the files are named
``<tag>.<pid>.<id>.jsonl``, ``tag`` naming the database and schema, and
each is held under an exclusive ``flock`` by the process writing it, so
that a file whose lock can be taken belongs to a process that is gone.
"""
import fcntl
import logging
import os
import threading
import time
import uuid
import weakref

from keas.kmi.audit import AuditError, at_process_exit
from keas.kmi.store import StoreUnavailable, one_line

log = logging.getLogger('kmi')

SUFFIX = '.jsonl'


def default_directory():
    """``$XDG_STATE_HOME/keas.kmi/audit-spool`` (``~/.local/state/...``)."""
    state = os.environ.get('XDG_STATE_HOME') or os.path.expanduser('~/.local/state')
    return os.path.join(state, 'keas.kmi', 'audit-spool')


class AuditSpool:
    """Fetch entries of one database, spooled in ``directory`` and shipped
    by ``ship(spool_id, lines, done)``: append the lines (newline-ended JSON
    entries) of spool ``spool_id`` to the audit table unless it was shipped
    before, and forget the ids in ``done`` (spools shipped and deleted)."""

    INTERVAL = 0.2  # seconds between shipments
    MAX_LAG = 1.0  # an entry that waited this long refuses fetches
    ADOPT_EVERY = 5.0  # seconds between looks for spools of dead processes
    BATCH = 5000  # entries that wake the shipper before its interval

    def __init__(self, directory, tag, ship):
        self.directory = directory
        self.tag = tag
        self._ship = ship
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the file being written
        self._ship_lock = threading.Lock()  # one shipment at a time
        self._wake = threading.Event()
        self._closed = False
        self._written = []  # (id, path, fd, first entry's time): to ship, in order
        self._done = []  # ids of spools shipped and deleted, for the database to forget
        self._failure = None  # why the last shipment failed
        self._adopted_at = None
        self._fd = None
        _make_directory(directory)
        self._open()
        self._adopt()
        self._thread = threading.Thread(target=_ship_loop, args=(weakref.ref(self),),
                                        name='kmi-audit-spool', daemon=True)
        self._thread.start()
        _SPOOLS.add(self)
        at_process_exit(_close_all)

    def _open(self):
        """A new file to write, locked before it gets its name."""
        spool_id = uuid.uuid4().hex
        name = '%s.%d.%s' % (self.tag, self._pid, spool_id)
        temporary = os.path.join(self.directory, name + '.new')
        path = os.path.join(self.directory, name + SUFFIX)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                     | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(temporary, path)
        except OSError:
            os.close(fd)
            _remove(temporary)
            raise
        self._id, self._path, self._fd = spool_id, path, fd
        self._size, self._count, self._first_at = 0, 0, None

    def append(self, entry):
        """Write one entry (its JSON text) before the request is answered."""
        line = (entry + '\n').encode('utf-8')
        now = time.monotonic()
        with self._lock:
            oldest = self._oldest()
            if oldest is not None and now - oldest > self.MAX_LAG:
                raise StoreUnavailable(
                    'audit entries have waited %.1f s to reach the database%s'
                    % (now - oldest, ': ' + self._failure if self._failure else ''))
            try:
                if self._fd is None:
                    self._open()
                written = os.write(self._fd, line)
                if written != len(line):  # the disk filled up within the line
                    os.ftruncate(self._fd, self._size)
                    raise OSError(28, 'No space left on device')
            except OSError as error:
                raise AuditError('cannot write the audit spool %s: %s'
                                 % (self.directory, error)) from error
            self._size += written
            self._count += 1
            if self._first_at is None:
                self._first_at = now
            if self._count >= self.BATCH:
                self._wake.set()

    def _oldest(self):
        times = [first for *_, first in self._written]
        if self._first_at is not None:
            times.append(self._first_at)
        return min(times) if times else None

    def pending(self):
        """Whether some entry has not reached the table yet."""
        with self._lock:
            return bool(self._written) or self._count > 0

    def ship(self):
        """Move every entry written so far into the table. False (and the
        entries kept, for the next try) when the database refused."""
        with self._ship_lock:
            with self._lock:
                if self._count:
                    self._written.append((self._id, self._path, self._fd, self._first_at))
                    self._fd, self._count, self._first_at = None, 0, None
                    try:
                        self._open()
                    except OSError:
                        pass  # the next append tries again, and fails closed
            while self._written:
                spool_id, path, fd, _ = self._written[0]
                try:
                    lines = _complete_lines(path)
                    if lines:
                        self._ship(spool_id, lines, list(self._done))
                        self._done = []  # forgotten by the database
                    # Until the file is gone its id must stay remembered: a
                    # second shipment of it then appends nothing.
                    _remove(path)
                except Exception as error:  # the database's, or the disk's
                    self._failure = one_line(error)
                    return False
                if lines:
                    self._done = [spool_id]
                os.close(fd)  # and with it the lock, once the file is gone
                with self._lock:
                    self._written.pop(0)
            self._failure = None
            return True

    def _adopt(self):
        """Take on the spools of processes that are gone (their lock is free)."""
        with self._ship_lock:
            self._adopt_unlocked()

    def _adopt_unlocked(self):
        self._adopted_at = time.monotonic()
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return
        with self._lock:
            ours = {self._path} | {path for _, path, *_ in self._written}
        found = []
        for name in names:
            path = os.path.join(self.directory, name)
            parts = name[:-len(SUFFIX)].split('.')
            if (not name.endswith(SUFFIX) or len(parts) != 3 or parts[0] != self.tag
                    or path in ours):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Its writer may have shipped and deleted it just before.
                if os.fstat(fd).st_nlink == 0:
                    raise OSError('shipped by its writer')
            except OSError:
                os.close(fd)
                continue
            found.append((os.fstat(fd).st_mtime, parts[2], path, fd))
        if found:
            log.warning('audit spool %s: shipping %d file(s) left by servers that stopped',
                        self.directory, len(found))
        with self._lock:
            self._written[:0] = [(spool_id, path, fd, time.monotonic())
                                 for _, spool_id, path, fd in sorted(found)]

    def close(self):
        """Ship what is left and stop; what cannot be shipped stays in the
        directory for the next server process."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._pid == os.getpid():
            if not self.ship():
                log.warning('audit spool %s: entries not yet in the database (%s); the '
                            'next server over this database ships them', self.directory,
                            self._failure)
            with self._lock:
                if self._fd is not None and self._count == 0:
                    _remove(self._path)  # the empty file that was next
        self._let_go()

    def _let_go(self):
        """Close the files (and so give up their locks). In a forked child,
        all there is to do: the parent's files are not ours to write, nor
        their locks ours to hold."""
        self._closed = True
        for fd in [fd for _, _, fd, _ in self._written] + [self._fd]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._written, self._fd = [], None


def _ship_loop(ref):
    while True:
        spool = ref()
        if spool is None or spool._closed:
            return
        wake, interval = spool._wake, spool.INTERVAL
        try:
            if time.monotonic() - spool._adopted_at > spool.ADOPT_EVERY:
                spool._adopt()
            spool.ship()
        except Exception:  # never the end of shipping: the next round tries again
            log.exception('audit spool %s: shipping failed', spool.directory)
        del spool
        wake.wait(interval)
        wake.clear()


def _make_directory(directory):
    try:
        os.makedirs(directory, 0o700, exist_ok=True)
        st = os.stat(directory)
    except OSError as error:
        raise AuditError('cannot make the audit spool directory %s: %s'
                         % (directory, error)) from error
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise AuditError('the audit spool directory %s must belong to this user and be '
                         'closed to others (mode 0700)' % directory)


def _complete_lines(path):
    """The file's whole lines: a line cut off by a crash of the machine
    (never by one of the process: each entry is one write) is left out."""
    with open(path, 'rb') as f:
        data = f.read()
    end = data.rfind(b'\n') + 1
    if end != len(data):
        log.warning('audit spool %s: leaving out a partial last entry (%d bytes)',
                    path, len(data) - end)
    return data[:end].decode('utf-8', 'replace')


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_SPOOLS = weakref.WeakSet()


def _close_all():
    """At the end of a process: ship what its spools hold."""
    for spool in list(_SPOOLS):
        spool.close()


def _after_fork_in_child():
    for spool in list(_SPOOLS):
        spool._let_go()


os.register_at_fork(after_in_child=_after_fork_in_child)
