"""Key servers over one PostgreSQL database (issue 12), as real processes.

Each server is `python -m keas.kmi.wsgi server.ini` (what `make serve` runs)
on its own loopback port, with its own ini naming the same database: as
separate machines would be. The database is a real PostgreSQL server
(tests/pgcluster.py), stopped and started under load.
"""
import concurrent.futures
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keas.kmi.facility import KeyManagementFacility
from keas.kmi.store import open_store
from support import free_port
from support import LOGGING_INI
from support import md5hex

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60
PEM = re.compile(rb'^-----BEGIN RSA PRIVATE KEY-----\n.*-----END RSA PRIVATE KEY-----$', re.S)
UNAVAILABLE = b'Key storage unavailable'

# The server a test starts: the application over `storage`, gunicorn's
# threaded workers, plain HTTP on loopback, the `kmi` log on stderr.
SERVER_INI = """\
[app:main]
use = egg:keas.kmi
storage-dir = {storage}
pool-max-size = 8

[server:main]
use = egg:keas.kmi#granian
host = 127.0.0.1
port = {port}
workers = {workers}
blocking_threads = 16

""" + LOGGING_INI


class KMS:
    """One `python -m keas.kmi.wsgi` process tree, in a session of its own."""

    def __init__(self, folder, storage, wait=True, workers=2):
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ini = folder / 'kms.ini'
        self.ini.write_text(SERVER_INI.format(storage=storage.replace('%', '%%'),
                                              port=self.port, workers=workers))
        self.log_path = folder / 'server.log'
        env = dict(os.environ)
        for name in ('GUNICORN_CMD_ARGS', 'WEB_CONCURRENCY', 'PORT'):
            env.pop(name, None)
        runtime = folder / 'run'
        runtime.mkdir(exist_ok=True)
        env['XDG_RUNTIME_DIR'] = str(runtime)
        with open(self.log_path, 'wb') as log:
            self.process = subprocess.Popen(
                [sys.executable, '-m', 'keas.kmi.wsgi', str(self.ini)], cwd=REPO, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise

    def log(self):
        return self.log_path.read_text(errors='replace')

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail('the server exited with %s:\n%s'
                            % (self.process.returncode, self.log()))
            try:
                if self.request('GET', '/', timeout=5)[0] == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                pytest.fail('the server did not answer within %ds:\n%s'
                            % (START_TIMEOUT, self.log()))
            time.sleep(0.2)

    def request(self, method, path, body=None, timeout=60):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={'Content-Type': 'text/plain'})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post(self, path, body=b''):
        status, data = self.request('POST', path, body)
        assert status == 200, (status, data)
        return data

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(20)


@pytest.fixture
def servers(tmp_path, pg_url):
    """start(n): n servers over the test's database, stopped afterwards."""
    started = []

    def start(n):
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            new = list(pool.map(lambda i: KMS(tmp_path / ('kms%d' % (len(started) + i)),
                                              pg_url), range(n)))
        started.extend(new)
        return new

    yield start
    for srv in started:
        srv.stop()
    for srv in started:
        assert 'Traceback' not in srv.log(), srv.log()


def test_a_key_made_through_any_server_is_read_through_every_other(servers, pg_url):
    kms = servers(3)
    keks = [kms[i % 3].post('/new') for i in range(9)]
    assert all(PEM.match(kek) for kek in keks) and len(set(keks)) == 9
    for kek in keks:
        deks = {srv.post('/key', kek) for srv in kms}
        assert len(deks) == 1 and len(deks.pop()) == 128
    for srv in kms:
        assert srv.request('GET', '/') == (200, b'KMS server holding 9 keys')
    assert sorted(open_store(pg_url).names()) == sorted(md5hex(k) for k in keks)


def test_four_servers_generating_concurrently_lose_no_key(servers, pg_url):
    kms = servers(4)
    per_client, clients = 6, 8

    def client(c):
        return [kms[(c + i) % 4].post('/new') for i in range(per_client)]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        keks = [kek for batch in pool.map(client, range(clients)) for kek in batch]
    assert len(set(keks)) == per_client * clients
    direct = KeyManagementFacility(pg_url)
    assert sorted(direct.keys()) == sorted(md5hex(k) for k in keks)
    for i, kek in enumerate(keks):
        assert kms[(i + 1) % 4].post('/key', kek) == direct.getEncryptionKey(kek)


GENERATE = """
import sys, time
from keas.kmi.facility import KeyManagementFacility
url, start, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
kmf = KeyManagementFacility(url)
while time.time() < start:
    time.sleep(0.001)
for _ in range(count):
    print(kmf.generate().hex(), flush=True)
"""


def test_four_processes_generating_concurrently_lose_no_key(pg_url):
    start, count = time.time() + 3, 10
    procs = [subprocess.Popen([sys.executable, '-c', GENERATE, pg_url, str(start), str(count)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    keks = [bytes.fromhex(line) for out, _ in outs for line in out.split()]
    assert len(keks) == 4 * count and len(set(keks)) == 4 * count
    kmf = KeyManagementFacility(pg_url)
    assert sorted(kmf.keys()) == sorted(md5hex(k) for k in keks)
    assert len({kmf.getEncryptionKey(k) for k in keks}) == 4 * count


def test_database_restarted_under_load(servers, pg_cluster, pg_url):
    """While the database is down, answers are correct or 503, never a 500,
    a partial or a wrong key; then service comes back by itself."""
    kms = servers(2)
    direct = KeyManagementFacility(pg_url)
    # Keys the servers have served (cached, in the worker that served them),
    # and keys made behind their backs that they have never read.
    cached = [kms[0].post('/new') for _ in range(4)]
    for kek in cached:
        for srv in kms:
            srv.post('/key', kek)
    uncached = [direct.generate() for _ in range(8)]
    expected = {kek: direct.getEncryptionKey(kek) for kek in cached + uncached}
    lock = threading.Lock()
    answers = []  # (time, server, kind, status)
    problems = []
    made = []  # KEKs a 200 /new answered
    stop = threading.Event()

    def one(srv, kind, i):
        if kind == 'new':
            status, body = srv.request('POST', '/new')
            good = PEM.match(body) is not None
        elif kind == 'status':
            status, body = srv.request('GET', '/')
            good = re.fullmatch(rb'KMS server holding \d+ keys', body) is not None
        else:
            kek = (cached if kind == 'cached' else uncached)[i % 4 if kind == 'cached' else i % 8]
            status, body = srv.request('POST', '/key', kek)
            good = body == expected[kek]
        with lock:
            answers.append((time.monotonic(), kms.index(srv), kind, status))
            if status == 200 and kind == 'new' and good:
                made.append(body)
            if status == 200 and not good:
                problems.append('%s: 200 with a wrong body %r' % (kind, body[:60]))
            elif status == 503 and body != UNAVAILABLE:
                problems.append('%s: 503 with body %r' % (kind, body[:60]))
            elif status not in (200, 503):
                problems.append('%s: %s %r' % (kind, status, body[:60]))

    def client(c):
        i = 0
        kinds = ('new', 'status', 'cached', 'uncached')
        while not stop.is_set() and i < 2000:
            try:
                one(kms[(c + i) % 2], kinds[(c + i // 2) % 4], i + c)
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    problems.append('connection error: %r' % error)
            i += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        down_at = time.monotonic()
        pg_cluster.stop('fast')
        time.sleep(4)
        up_at = time.monotonic()
        pg_cluster.start()
        # Service comes back by itself: /new answers on both servers.
        back = {}
        deadline = up_at + 60
        while len(back) < 2 and time.monotonic() < deadline:
            with lock:
                for t, s, kind, status in answers:
                    if t > up_at and kind == 'new' and status == 200:
                        back.setdefault(s, t - up_at)
            time.sleep(0.1)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        if not pg_cluster.running():
            pg_cluster.start()
    assert problems == []
    assert len(back) == 2, 'service did not come back on both servers: %r' % back
    during = [a for a in answers if down_at + 0.5 < a[0] < up_at]
    assert during and any(status == 503 for _, _, kind, status in during if kind == 'new')
    assert all(status == 503 for _, _, kind, status in during if kind in ('new', 'status'))
    after = [a for a in answers if a[0] > up_at + max(back.values()) + 0.5]
    assert after and all(status == 200 for *_, status in after)
    # Nothing lost: every KEK handed out is in the database and unwraps.
    fresh = KeyManagementFacility(pg_url)
    for kek in made + uncached:
        assert len(fresh.getEncryptionKey(kek)) == 128
    for srv in kms:
        for kek in uncached:
            assert srv.post('/key', kek) == expected[kek]
    print('503s during the outage: %d of %d answers; back after %s s'
          % (sum(1 for a in during if a[3] == 503), len(during),
             ', '.join('%.2f' % v for v in sorted(back.values()))))


def test_unreachable_database_at_start_is_one_line(tmp_path):
    # One worker: with two, gunicorn 27's arbiter raises HaltServer a second
    # time while stopping (the other worker exits 4 as well) and the launcher
    # prints that traceback; the launcher's, not the application's, to catch.
    url = 'postgresql://kmi:secret@127.0.0.1:%d/kmi' % free_port()
    srv = KMS(tmp_path / 'kms', url, wait=False, workers=1)
    try:
        srv.process.wait(START_TIMEOUT)
    finally:
        srv.stop()
    log = srv.log()
    assert srv.process.returncode == 4, log
    assert 'Traceback' not in log and 'secret' not in log
    lines = [line for line in log.splitlines() if 'cannot open the key storage' in line]
    assert len(lines) == 1, log
    assert 'cannot connect to the key database postgresql://kmi:***@127.0.0.1' in lines[0]


# The application in process: settings and 503 answers --------------------------


def call(app, method, path, body=b''):
    import io
    environ = {'REQUEST_METHOD': method, 'PATH_INFO': path, 'SERVER_NAME': 'kms',
               'SERVER_PORT': '80', 'wsgi.url_scheme': 'http', 'REMOTE_ADDR': '127.0.0.1',
               'wsgi.input': io.BytesIO(body), 'CONTENT_LENGTH': str(len(body)),
               'CONTENT_TYPE': 'text/plain'}
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer['status'], answer['headers'] = status, dict(headers)
    data = b''.join(app(environ, start_response))
    return int(answer['status'].split()[0]), answer['headers'], data


def test_application_settings_for_a_database(pg_url):
    from keas.kmi import wsgi
    app = wsgi.application_factory({}, **{'storage-dir': pg_url, 'pool-max-size': '3',
                                          'statement-timeout': '2.5', 'pool-timeout': ''})
    settings = app.facility.store._settings
    assert (settings.pool_max_size, settings.statement_timeout, settings.pool_timeout) == (
        3, 2.5, 5.0)
    assert call(app, 'GET', '/')[2] == b'KMS server holding 0 keys'
    with pytest.raises(SystemExit) as info:
        wsgi.application_factory({}, **{'storage-dir': pg_url, 'pool-max-size': 'many'})
    assert info.value.code == wsgi.EXIT_STORE_FAILED


def fetches_logged(pg_url, name):
    log = KeyManagementFacility(pg_url).store.audit_log()
    return [e for e in log.tail(0) if e['event'] == 'fetch' and e['name'] == name
            and e['outcome'] == 'ok']


def test_application_answers_503_while_the_database_is_down(pg_cluster, pg_url, tmp_path):
    from keas.kmi import wsgi
    from keas.kmi.auditspool import AuditSpool
    app = wsgi.application_factory({}, **{'storage-dir': pg_url,
                                          'audit-spool': str(tmp_path / 'spool')})
    unaudited = wsgi.application_factory({}, **{'storage-dir': pg_url, 'audit': 'off'})
    status, _, kek = call(app, 'POST', '/new')
    assert status == 200
    cached_dek = call(app, 'POST', '/key', kek)[2]
    assert call(unaudited, 'POST', '/key', kek)[2] == cached_dek
    other = KeyManagementFacility(pg_url).generate()  # never read through `app`
    pg_cluster.stop('fast')
    stopped = time.monotonic()
    served = 0
    try:
        # Without the audit log, the cache answers (until it would read the
        # key's state again, stateRefresh after it last did).
        assert call(unaudited, 'POST', '/key', kek)[:3:2] == (200, cached_dek)
        for method, path, body in (('GET', '/', b''), ('POST', '/new', b''),
                                   ('POST', '/key', other)):
            status, headers, data = call(app, method, path, body)
            assert (status, data) == (503, UNAVAILABLE), (method, path)
            assert headers['Retry-After'] == wsgi.RETRY_AFTER
        # Fail closed: a cached DEK is sent while its fetch's entry waits in
        # the spool, and refused once entries have waited MAX_LAG seconds
        # for the database (or the key's state is due to be read again).
        while True:
            status, headers, data = call(app, 'POST', '/key', kek)
            if status != 200:
                break
            assert data == cached_dek
            served += 1
            assert time.monotonic() - stopped < AuditSpool.MAX_LAG + 2
            time.sleep(0.02)
        assert (status, data) == (503, UNAVAILABLE)
        assert headers['Retry-After'] == wsgi.RETRY_AFTER
    finally:
        pg_cluster.start()
    deadline = time.monotonic() + 30
    while call(app, 'POST', '/key', other)[0] == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    status, _, dek = call(app, 'POST', '/key', other)
    assert status == 200 and dek == KeyManagementFacility(pg_url).getEncryptionKey(other)
    # Nothing the server sent went unlogged: the fetches it answered during
    # the outage reached the table once the database was back.
    app.facility.store.flush_audit()
    assert served >= 1 and len(fetches_logged(pg_url, md5hex(kek))) == 1 + served
