"""The audit log's hash chain in a file: appends from threads and processes
extend one chain, every kind of tampering is found, a full disk is refused
and leaves no partial entry."""
import json
import multiprocessing
import os
import subprocess
import threading

import pytest

from keas.kmi.audit import GENESIS, AuditError, FileAuditLog, verify_lines


def entries(log):
    return [json.loads(text) for _, text in log.lines()]


def test_entries_form_a_chain(tmp_path):
    log = FileAuditLog(str(tmp_path / 'audit.jsonl'))
    first = log.append(event='generate', name='a' * 32, kid='00' * 16, client='10.0.0.1',
                       outcome='ok')
    second = log.append(event='fetch', name='a' * 32, client='10.0.0.2', outcome='ok')
    assert first['seq'] == 1 and first['prev'] == GENESIS
    assert second['seq'] == 2 and second['prev'] == first['hash']
    assert log.verify() == (2, second['hash'], None)
    assert oct(os.stat(log.path).st_mode & 0o777) == '0o600'
    assert set(entries(log)[0]) == {'seq', 'time', 'event', 'name', 'kid', 'client',
                                    'subject', 'outcome', 'prev', 'hash'}
    log.close()
    # A new writer (a restarted server) continues the chain.
    again = FileAuditLog(log.path)
    third = again.append(event='state', name='a' * 32, outcome='ok')
    assert third['seq'] == 3 and third['prev'] == second['hash']
    assert again.verify()[2] is None


def tamper(tmp_path, edit):
    folder = tmp_path / os.urandom(4).hex()
    folder.mkdir()
    log = FileAuditLog(str(folder / 'audit.jsonl'))
    for i in range(6):
        log.append(event='fetch', name='%032x' % i, client='10.0.0.%d' % i, outcome='ok')
    log.close()
    lines = open(log.path).read().splitlines()
    lines = edit(lines)
    with open(log.path, 'w') as f:
        f.write(''.join(line + '\n' for line in lines))
    return log.verify()


def test_each_kind_of_tampering_names_the_first_broken_entry(tmp_path):
    def edit_field(lines):
        entry = json.loads(lines[2])
        entry['client'] = '6.6.6.6'
        lines[2] = json.dumps(entry, sort_keys=True, separators=(',', ':'))
        return lines

    def edit_and_rehash(lines):
        from keas.kmi.audit import canonical, chain_hash
        entry = json.loads(lines[2])
        entry['outcome'] = 'not found'
        body = {k: v for k, v in entry.items() if k not in ('seq', 'prev', 'hash')}
        entry['hash'] = chain_hash(entry['prev'], entry['seq'], canonical(body))
        lines[2] = json.dumps(entry, sort_keys=True, separators=(',', ':'))
        return lines

    cases = {
        'edited': (edit_field, 3, 'edited'),
        'edited and re-hashed': (edit_and_rehash, 4, 'does not follow'),
        'deleted': (lambda lines: lines[:2] + lines[3:], 3, 'does not follow'),
        'inserted': (lambda lines: lines[:3] + [lines[1]] + lines[3:], 4, 'does not follow'),
        'reordered': (lambda lines: lines[:1] + [lines[2], lines[1]] + lines[3:], 2,
                      'does not follow'),
        'garbled': (lambda lines: lines[:4] + ['{"seq": 5'] + lines[5:], 5, 'not a JSON'),
        'last edited': (lambda lines: lines[:5] + [lines[5].replace('ok', 'no')], 6, 'edited'),
    }
    for what, (edit, line, reason) in cases.items():
        count, _, broken = tamper(tmp_path, edit)
        assert broken is not None, what
        assert broken[0] == line and reason in broken[2], (what, broken)
        assert count == line - 1
    assert tamper(tmp_path, lambda lines: lines)[2] is None


def _append_many(path, tag, n):
    log = FileAuditLog(path)
    for i in range(n):
        log.append(event='fetch', name='%s%d' % (tag, i), outcome='ok')
    log.close()


def test_threads_and_processes_extend_one_chain(tmp_path):
    path = str(tmp_path / 'audit.jsonl')
    ctx = multiprocessing.get_context('spawn')
    procs = [ctx.Process(target=_append_many, args=(path, 'p%d-' % i, 200)) for i in range(3)]
    for p in procs:
        p.start()
    log = FileAuditLog(path)
    threads = [threading.Thread(target=lambda: [log.append(event='fetch', name='t', outcome='ok')
                                                for _ in range(200)]) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    count, _, broken = log.verify()
    assert broken is None and count == 1200
    assert [e['seq'] for e in entries(log)] == list(range(1, 1201))


def test_a_partial_last_line_from_a_crash_is_cut_off(tmp_path):
    log = FileAuditLog(str(tmp_path / 'audit.jsonl'))
    log.append(event='fetch', name='a', outcome='ok')
    log.close()
    with open(log.path, 'ab') as f:
        f.write(b'{"seq":2,"ev')  # a write the crash interrupted: never acknowledged
    again = FileAuditLog(log.path)
    assert again.append(event='fetch', name='b', outcome='ok')['seq'] == 2
    assert again.verify()[2] is None


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 1 MiB tmpfs, filled up (needs root to mount)."""
    mount = tmp_path / 'full'
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip('mounting a tmpfs needs root')
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)], check=False)


def fill(folder):
    with open(os.path.join(folder, 'filler'), 'wb', buffering=0) as f:
        try:
            while True:
                f.write(b'\0' * 65536)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_is_refused_and_leaves_no_partial_entry(full_tmpfs):
    log = FileAuditLog(str(full_tmpfs / 'audit.jsonl'))
    log.append(event='generate', name='a', outcome='ok')
    fill(full_tmpfs)
    for _ in range(3):
        with pytest.raises(AuditError, match='cannot write the audit log'):
            log.append(event='fetch', name='b' * 300, client='x' * 4000, outcome='ok')
    os.remove(full_tmpfs / 'filler')
    assert log.append(event='fetch', name='c', outcome='ok')['seq'] == 2
    count, _, broken = log.verify()
    assert broken is None and count == 2


def test_verify_of_an_empty_log():
    assert verify_lines([]) == (0, GENESIS, None)


def test_forked_workers_that_inherit_an_open_log_keep_one_chain(tmp_path):
    # As granian's workers do: the log is opened in the parent, then forked.
    log = FileAuditLog(str(tmp_path / 'audit.jsonl'))
    log.append(event='generate', name='parent', outcome='ok')
    children = []
    for tag in ('a', 'b', 'c'):
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(300):
                    log.append(event='fetch', name='%s%d' % (tag, i), outcome='ok')
                log.close()
            finally:
                os._exit(0)
        children.append(pid)
    for i in range(300):
        log.append(event='fetch', name='p%d' % i, outcome='ok')
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    count, _, broken = log.verify()
    assert broken is None and count == 1201
