"""keas.kmi.worker.EventWorker under real gunicorn processes on 127.0.0.1.

The key server itself (plain HTTP and TLS, mutual TLS), and a small WSGI
application written here that shows what the worker hands to applications
(the environ, errors, streaming answers, slow requests). Protocol edge cases
are driven over raw sockets; curl where it is installed.
"""
import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The certificates, process and command helpers of the end-to-end tests.
from test_server import APP_INI
from test_server import CALL_TIMEOUT
from test_server import Server
from test_server import client_context
from test_server import free_port
from test_server import gunicorn
from test_server import pki  # noqa: F401 - a fixture
from test_server import need

from keas.kmi.facility import KeyManagementFacility
from keas.kmi.wsgi import KeyManagementApplication

WORKER = ('-k', 'keas.kmi.worker.EventWorker')
TIMEOUT = 5  # the servers' --timeout: how long an incomplete request may take
KEEPALIVE = 2

pytestmark = pytest.mark.skipif(
    shutil.which('openssl') is None, reason='needs the openssl command')

# A WSGI application that shows the worker from the application's side.
ENVAPP = r'''
import json
import sys
import time


def app(environ, start_response):
    path = environ['PATH_INFO']
    if path == '/':
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [b'ok']
    if path.startswith('/env'):
        body = environ['wsgi.input'].read()
        shown = {k: v for k, v in environ.items() if isinstance(v, (str, bool, int))}
        shown['wsgi.version'] = list(environ['wsgi.version'])
        shown['body'] = body.decode('latin-1')
        shown['has_errors'] = hasattr(environ['wsgi.errors'], 'write')
        data = json.dumps(shown).encode()
        start_response('200 OK', [('Content-Type', 'application/json'),
                                  ('Content-Length', str(len(data)))])
        return [data]
    if path == '/stream':  # no Content-Length, several pieces, close() to call
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return Stream()
    if path == '/closed':
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [str(Stream.closed).encode()]
    if path == '/error':
        raise RuntimeError('secret detail of the failure')
    if path == '/slow':
        time.sleep(float(environ.get('QUERY_STRING') or 2))
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [b'slow done']
    if path == '/webob':
        from webob import Request, Response
        request = Request(environ)
        return Response(body=request.body[::-1], content_type='text/plain')(
            environ, start_response)
    if path == '/pid':
        import os
        start_response('200 OK', [('Content-Type', 'text/plain')])
        return [str(os.getpid()).encode()]
    start_response('404 Not Found', [('Content-Type', 'text/plain')])
    return [b'not found']


class Stream:
    closed = 0

    def __iter__(self):
        yield b'one '
        yield b''
        yield b'two '
        yield b'three'

    def close(self):
        Stream.closed += 1
'''


class PlainServer(Server):
    """A Server spoken to over plain HTTP."""

    def __init__(self, command, folder, port):
        super().__init__(command, folder, port, None)
        self.url = 'http://127.0.0.1:%d' % port

    def request(self, method, path, body=None, context=None, timeout=CALL_TIMEOUT,
                headers=None):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body,
                         headers=headers or {'Content-Type': 'text/plain'})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def serve(folder, app='kmi', tls=None, extra=()):
    """gunicorn with the event worker: the key server (app='kmi', storage in
    folder/keys) or the application above (app='env'); TLS if ``tls`` is
    (certfile, keyfile, client context)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if app == 'kmi':
        ini = folder / 'kms.ini'
        ini.write_text(APP_INI.format(storage=folder / 'keys'))
        target = ['--paste', str(ini)]
    else:
        (folder / 'envapp.py').write_text(ENVAPP)
        target = ['--chdir', str(folder), 'envapp:app']
    command = [sys.executable, '-m', 'gunicorn', *target, '--bind', '127.0.0.1:%d' % port,
               '--timeout', str(TIMEOUT), '--keep-alive', str(KEEPALIVE), *WORKER, *extra]
    if tls is None:
        srv = PlainServer(command, folder, port)
    else:
        certfile, keyfile, context = tls
        command += ['--certfile', certfile, '--keyfile', keyfile]
        srv = Server(command, folder, port, context)
    srv.storage = folder / 'keys'
    return srv


@pytest.fixture(scope='module')
def kmi(tmp_path_factory):
    """The key server over plain HTTP, two workers."""
    srv = serve(tmp_path_factory.mktemp('kmi'), extra=['--workers', '2', '--threads', '4'])
    yield srv
    srv.stop()


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """The application above, one worker, with an access log."""
    srv = serve(tmp_path_factory.mktemp('env'), app='env',
                extra=['--threads', '4', '--access-logfile', '-'])
    yield srv
    srv.stop()


@pytest.fixture(scope='module')
def kek(kmi):
    return kmi.post('/new')


def connect(srv, timeout=10):
    return socket.create_connection(('127.0.0.1', srv.port), timeout=timeout)


def read_response(stream, head=False):
    """(status, headers dict lower-case, body) of one answer on a binary file
    (to a HEAD request if ``head``)."""
    line = stream.readline()
    if not line:
        raise ConnectionError('closed before an answer')
    version, status, *_ = line.decode('latin-1').split(' ', 2)
    assert version == 'HTTP/1.1', line
    headers = {}
    while True:
        line = stream.readline()
        if line in (b'\r\n', b''):
            break
        name, _, value = line.decode('latin-1').partition(':')
        headers[name.strip().lower()] = value.strip()
    body = b''
    if 'content-length' in headers and not head:
        body = stream.read(int(headers['content-length']))
    return int(status), headers, body


def exchange(srv, data, count=1, heads=(), wait_close=True):
    """Send raw bytes; the answers read back, and whether the server closed
    the connection then (None if not asked: ``wait_close`` false).
    ``heads``: the numbers of the answers to HEAD requests."""
    with connect(srv) as sock:
        sock.sendall(data)
        stream = sock.makefile('rb')
        answers = [read_response(stream, i in heads) for i in range(count)]
        closed = None
        if wait_close:
            try:
                closed = stream.read(1) == b''
            except (socket.timeout, ConnectionError):
                pass
    return answers, closed


def closed_within(sock, seconds):
    """Seconds until the server closes ``sock`` (reading and dropping), or None."""
    start = time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(65536) == b'':
                return time.monotonic() - start
        except socket.timeout:
            continue
        except ConnectionError:
            return time.monotonic() - start
    return None


def assert_healthy(srv):
    log = srv.log()
    assert 'Traceback' not in log, log
    assert 'WORKER TIMEOUT' not in log, log


# The inline fast path, in process --------------------------------------------------


def test_inline_request_only_for_cached_keys(storage_dir):
    facility = KeyManagementFacility(storage_dir)
    kek = facility.generate()
    app = KeyManagementApplication(facility)

    def environ(method='POST', path='/key', body=kek):
        return {'REQUEST_METHOD': method, 'PATH_INFO': path,
                'CONTENT_LENGTH': str(len(body)), 'wsgi.input': BytesIO(body),
                'REMOTE_ADDR': '127.0.0.1'}

    assert app.inline_request(environ()) is False  # not unwrapped yet
    answers = []
    assert app(environ(), lambda status, headers: answers.append(status)) == \
        [facility.getEncryptionKey(kek)]
    assert answers == ['200 OK']
    assert app.inline_request(environ()) is True
    assert app.inline_request(environ(method='GET')) is False
    assert app.inline_request(environ(path='/new')) is False
    assert app.inline_request(environ(body=kek + b'x')) is False
    assert app.inline_request(dict(environ(), **{'wsgi.input': object()})) is False
    app(environ(body=b'unknown'), lambda status, headers: answers.append(status))
    assert answers[-1].startswith('404')
    assert app.inline_request(environ(body=b'unknown')) is False


# The key server ---------------------------------------------------------------------


def test_key_server_round_trip(kmi, kek):
    assert kek.startswith(b'-----BEGIN RSA PRIVATE KEY-----')
    dek = kmi.post('/key', kek)
    assert dek == KeyManagementFacility(str(kmi.storage)).getEncryptionKey(kek)
    assert kmi.post('/key', kek) == dek  # now from the cache, on the loop
    assert kmi.request('GET', '/') == (200, b'KMS server holding 1 keys')
    assert kmi.request('POST', '/key', b'xxyz') == (404, b'Key not found')
    assert kmi.request('GET', '/key')[0] == 405
    assert kmi.request('GET', '/nothing')[0] == 404
    status, body = kmi.request('POST', '/key', b'-----BEGIN RSA PRIVATE KEY-----\nno\n')
    assert status in (400, 404)


def test_keep_alive_serves_several_requests_on_one_connection(kmi, kek):
    conn = http.client.HTTPConnection('127.0.0.1', kmi.port, timeout=10)
    try:
        conn.request('GET', '/')
        response = conn.getresponse()
        assert response.status == 200 and response.read().startswith(b'KMS server')
        sock = conn.sock
        for _ in range(5):
            conn.request('POST', '/key', kek, {'Content-Type': 'text/plain'})
            response = conn.getresponse()
            assert response.status == 200 and len(response.read()) == 128
            assert response.getheader('Connection') is None
        conn.request('HEAD', '/')
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b''
        conn.request('GET', '/')
        assert conn.getresponse().read().startswith(b'KMS server')
        assert conn.sock is sock, 'http.client had to reconnect'
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(kmi, kek):
    post = (b'POST /key HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n'
            b'Content-Length: %d\r\n\r\n%s' % (len(kek), kek))
    get = b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'
    new = b'POST /new HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n'
    head = b'HEAD / HTTP/1.1\r\nHost: x\r\n\r\n'
    last = b'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
    answers, closed = exchange(kmi, get + post + new + head + post + last, count=6,
                               heads=[3])
    statuses = [status for status, _, _ in answers]
    assert statuses == [200] * 6
    assert answers[0][2].startswith(b'KMS server holding')
    assert len(answers[1][2]) == 128 and answers[4][2] == answers[1][2]
    assert answers[2][2].startswith(b'-----BEGIN RSA PRIVATE KEY-----')
    assert answers[3][2] == b'' and int(answers[3][1]['content-length']) > 0
    assert answers[5][1]['connection'] == 'close'
    assert closed


def test_http_1_0(kmi):
    answers, closed = exchange(kmi, b'GET / HTTP/1.0\r\n\r\n')
    assert answers[0][0] == 200 and answers[0][1]['connection'] == 'close'
    assert closed
    answers, closed = exchange(
        kmi, b'GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n' * 2 +
        b'GET / HTTP/1.0\r\n\r\n', count=3)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert answers[0][1]['connection'] == 'keep-alive'
    assert closed


def test_chunked_request_bodies(kmi, kek):
    dek = kmi.post('/key', kek)
    pieces = [kek[i:i + 500] for i in range(0, len(kek), 500)]
    chunked = b''.join(b'%x;ext=1\r\n%s\r\n' % (len(p), p) for p in pieces)
    request = (b'POST /key HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
               + chunked + b'0\r\nX-Trailer: yes\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n')
    answers, _ = exchange(kmi, request, count=2, wait_close=False)
    assert answers[0][0] == 200 and answers[0][2] == dek
    assert answers[1][0] == 200
    # http.client sends an iterable body chunked.
    conn = http.client.HTTPConnection('127.0.0.1', kmi.port, timeout=10)
    try:
        conn.request('POST', '/key', iter(pieces), {'Content-Type': 'text/plain'},
                     encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 200 and response.read() == dek
    finally:
        conn.close()


def test_urllib_and_curl(kmi, kek, tmp_path):
    dek = kmi.post('/key', kek)
    with urllib.request.urlopen(urllib.request.Request(
            kmi.url + '/key', data=kek, headers={'Content-Type': 'text/plain'}),
            timeout=10) as answer:
        assert answer.status == 200 and answer.read() == dek
    need('curl')
    (tmp_path / 'kek.dat').write_bytes(kek)
    for extra in ([], ['-H', 'Expect: 100-continue'], ['-H', 'Transfer-Encoding: chunked'],
                  ['-H', 'Expect: 100-continue', '-H', 'Transfer-Encoding: chunked'],
                  ['--http1.0']):
        result = subprocess.run(
            ['curl', '-sS', '-D', '-', '-o', 'dek.dat', '--max-time', '30',
             '-H', 'Content-Type: text/plain', *extra, '--data-binary', '@kek.dat',
             kmi.url + '/key'], cwd=tmp_path, capture_output=True, timeout=CALL_TIMEOUT)
        assert result.returncode == 0, result.stderr
        heads = result.stdout.decode('latin-1')
        assert re.search(r'HTTP/1\.[01] 200', heads), heads
        if 'Expect: 100-continue' in extra:
            assert 'HTTP/1.1 100 Continue' in heads, heads
        assert (tmp_path / 'dek.dat').read_bytes() == dek


def test_expect_100_continue(kmi, kek):
    with connect(kmi) as sock:
        sock.sendall(b'POST /key HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n'
                     b'Content-Length: %d\r\n\r\n' % len(kek))
        stream = sock.makefile('rb')
        assert stream.readline() == b'HTTP/1.1 100 Continue\r\n'
        assert stream.readline() == b'\r\n'
        sock.sendall(kek)
        status, _, body = read_response(stream)
        assert status == 200 and len(body) == 128
        # Too large: refused at once, without 100 Continue.
        sock.sendall(b'POST /key HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n'
                     b'Content-Length: 1000000\r\n\r\n')
        status, headers, _ = read_response(stream)
        assert status == 413 and headers['connection'] == 'close'
    answers, closed = exchange(kmi, b'POST /key HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n'
                                    b'Content-Length: 1\r\n\r\nx')
    assert answers[0][0] == 417 and closed


@pytest.mark.parametrize('request_bytes, status', [
    (b'GARBAGE\r\n\r\n', 400),
    (b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + b'\0' * 40 + b'\r\n\r\n', 400),
    (b'GET /\r\n\r\n', 400),
    (b'GET / HTTP/1.1 extra\r\n\r\n', 400),
    (b'GET / HTTP/2.0\r\n\r\n', 505),
    (b'GET / HTTP/1.1\r\nNo colon here\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nHost : x\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n', 400),
    (b'GET / HTTP/1.1\r\nX: a\0b\r\n\r\n', 400),
    (b'GET nowhere HTTP/1.1\r\n\r\n', 400),
    (b'POST /key HTTP/1.1\r\nContent-Length: -1\r\n\r\n', 400),
    (b'POST /key HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx', 400),
    (b'POST /key HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n', 400),
    (b'POST /key HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n', 400),
    (b'POST /key HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n', 501),
    (b'POST /key HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n', 400),
    (b'POST /key HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n', 400),
    (b'POST /key HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n', 400),
    (b'GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n', 400),
])
def test_malformed_requests_get_4xx_and_close(kmi, request_bytes, status):
    answers, closed = exchange(kmi, request_bytes)
    assert answers[0][0] == status
    assert answers[0][1]['connection'] == 'close'
    assert closed


def test_oversize_bodies_are_413(kmi, kek):
    big = os.urandom(100 * 1024)
    answers, closed = exchange(kmi, b'POST /key HTTP/1.1\r\nHost: x\r\n'
                                    b'Content-Length: %d\r\n\r\n%s' % (len(big), big))
    assert answers[0][0] == 413 and closed
    chunked = b''.join(b'1000\r\n%s\r\n' % big[i:i + 4096] for i in range(0, len(big), 4096))
    answers, closed = exchange(kmi, b'POST /key HTTP/1.1\r\nHost: x\r\n'
                                    b'Transfer-Encoding: chunked\r\n\r\n' + chunked)
    assert answers[0][0] == 413 and closed
    # The limit is the body, not the connection: 60 KiB is fine.
    assert kmi.request('POST', '/key', os.urandom(60 * 1024))[0] == 404
    assert kmi.post('/key', kek)


def test_limits_on_request_line_and_headers(kmi):
    answers, closed = exchange(kmi, b'GET /' + b'a' * 5000 + b' HTTP/1.1\r\n\r\n')
    assert answers[0][0] == 414 and closed
    # Not even a line end in sight.
    answers, closed = exchange(kmi, b'GET /' + b'a' * 10000)
    assert answers[0][0] == 414 and closed
    answers, closed = exchange(kmi, b'GET / HTTP/1.1\r\nX-Big: ' + b'b' * 9000 + b'\r\n\r\n')
    assert answers[0][0] == 431 and closed
    many = b''.join(b'X-%d: y\r\n' % i for i in range(101))
    answers, closed = exchange(kmi, b'GET / HTTP/1.1\r\n' + many + b'\r\n')
    assert answers[0][0] == 431 and closed
    fine = b''.join(b'X-%d: y\r\n' % i for i in range(99))
    answers, _ = exchange(kmi, b'GET / HTTP/1.1\r\n' + fine + b'Connection: close\r\n\r\n')
    assert answers[0][0] == 200


def test_bad_input_never_hurts_the_worker(kmi, kek):
    """Random bytes, truncated requests, clients that hang up mid-request or
    mid-answer: the server answers normally afterwards, no traceback."""
    import random
    rng = random.Random(7)
    post = (b'POST /key HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s'
            % (len(kek), kek))
    for i in range(60):
        with connect(kmi) as sock:
            if i % 3 == 0:
                sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
            elif i % 3 == 1:
                sock.sendall(post[:rng.randrange(len(post))])
            else:
                sock.sendall(post * 3)  # and hang up before reading
    time.sleep(0.5)
    assert kmi.post('/key', kek)
    assert kmi.request('GET', '/')[0] == 200
    assert_healthy(kmi)


# Slow and idle clients ------------------------------------------------------------------

SLOW_CLIENTS = 200


def test_slowloris_does_not_delay_normal_clients(kmi, kek):
    """200 connections that trickle their headers a byte at a time (more than
    gthread with 32 threads survives), and a dozen idle ones: normal requests
    are still answered at once; the slow ones are cut off after --timeout."""
    slow_request = b'POST /new HTTP/1.1\r\nHost: localhost\r\nX-Slow: ' + b'z' * 100
    sockets = []
    try:
        idle = [connect(kmi) for _ in range(12)]
        sockets += idle
        slow = [connect(kmi) for _ in range(SLOW_CLIENTS)]
        sockets += slow
        stop = threading.Event()
        sent = [0]
        cut_off = []  # seconds from a slow client's first byte to its end

        def trickle():
            alive = list(slow)
            first = time.monotonic()
            for index in range(len(slow_request)):
                for sock in list(alive):
                    try:
                        sock.send(slow_request[index:index + 1])
                    except OSError:
                        alive.remove(sock)
                        cut_off.append(time.monotonic() - first)
                sent[0] = index + 1
                if not alive or stop.wait(0.5):
                    return

        trickler = threading.Thread(target=trickle)
        trickler.start()
        latencies = []
        try:
            ends = time.monotonic() + 3
            while time.monotonic() < ends:
                for method, path, body in (('GET', '/', None), ('POST', '/key', kek)):
                    start = time.monotonic()
                    status, data = kmi.request(method, path, body, timeout=30)
                    latencies.append(time.monotonic() - start)
                    assert status == 200, data
                time.sleep(0.1)
            assert sent[0] >= 3, 'the slow clients did not get going'
            # Past --timeout (from their first byte), the server closes them.
            closed = [closed_within(sock, TIMEOUT + 15) for sock in slow[:5]]
        finally:
            stop.set()
            trickler.join(60)
        print('\n%d slow clients: %d normal requests, latency median %.3f s, max %.3f s'
              % (SLOW_CLIENTS, len(latencies), sorted(latencies)[len(latencies) // 2],
                 max(latencies)))
        assert len(latencies) >= 6
        # Generous for a loaded machine: gthread would not answer at all here.
        assert max(latencies) < 5.0, sorted(latencies)[-5:]
        assert all(seconds is not None for seconds in closed), closed
        # None of them before --timeout (their sends fail only after it).
        assert not cut_off or min(cut_off) > TIMEOUT * 0.8, min(cut_off)
        # The idle ones (no byte sent) went too.
        assert all(closed_within(sock, 5) is not None for sock in idle[:3])
    finally:
        for sock in sockets:
            sock.close()
    assert kmi.request('GET', '/')[0] == 200
    assert_healthy(kmi)


def test_idle_keep_alive_connection_is_closed_after_keepalive(kmi):
    with connect(kmi) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        stream = sock.makefile('rb')
        assert read_response(stream)[0] == 200
        seconds = closed_within(sock, KEEPALIVE + 10)
    assert seconds is not None, 'the idle connection stayed open'
    assert seconds > KEEPALIVE * 0.5


def test_slow_application_work_does_not_block_other_requests(env):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(env.request, 'GET', '/slow?2') for _ in range(2)]
        time.sleep(0.3)
        start = time.monotonic()
        for _ in range(5):
            assert env.request('GET', '/')[0] == 200
        quick = time.monotonic() - start
        assert [f.result() for f in slow] == [(200, b'slow done')] * 2
    assert quick < 1.8, 'requests waited for the slow ones'


# What applications see --------------------------------------------------------------------


def env_of(srv, method='GET', path='/env', body=None, headers=None):
    status, data = srv.request(method, path, body, headers=headers or {})
    assert status == 200, data
    return json.loads(data)


def test_wsgi_environ(env):
    seen = env_of(env, 'POST', '/env/a%20b%2Fc%C3%A9?x=1&y=%20',
                  body=b'payload', headers={'Content-Type': 'text/x-test',
                                            'X-Custom': 'v1', 'X_Sneaky': 'dropped'})
    assert seen['REQUEST_METHOD'] == 'POST'
    assert seen['SCRIPT_NAME'] == ''
    assert seen['PATH_INFO'] == '/env/a b/c\xc3\xa9'  # percent-decoded as latin-1
    assert seen['RAW_URI'] == '/env/a%20b%2Fc%C3%A9?x=1&y=%20'
    assert seen['QUERY_STRING'] == 'x=1&y=%20'
    assert seen['SERVER_NAME'] == '127.0.0.1' and seen['SERVER_PORT'] == str(env.port)
    assert seen['SERVER_PROTOCOL'] == 'HTTP/1.1'
    assert seen['REMOTE_ADDR'] == '127.0.0.1' and int(seen['REMOTE_PORT']) > 0
    assert seen['CONTENT_TYPE'] == 'text/x-test'
    assert seen['CONTENT_LENGTH'] == '7' and seen['body'] == 'payload'
    assert seen['HTTP_X_CUSTOM'] == 'v1'
    assert 'HTTP_X_SNEAKY' not in seen  # underscores: dropped, as gunicorn does
    assert seen['HTTP_HOST'] == '127.0.0.1:%d' % env.port
    assert 'HTTP_CONTENT_LENGTH' not in seen and 'HTTP_CONTENT_TYPE' not in seen
    assert seen['wsgi.version'] == [1, 0]
    assert seen['wsgi.url_scheme'] == 'http'
    assert seen['wsgi.multithread'] is True and seen['wsgi.run_once'] is False
    assert seen['wsgi.multiprocess'] is False  # one worker
    assert seen['wsgi.input_terminated'] is True and seen['has_errors']
    assert seen['SERVER_SOFTWARE'].startswith('gunicorn/')
    # gunicorn's secure_scheme_headers, from a peer in forwarded_allow_ips.
    assert env_of(env, headers={'X-Forwarded-Proto': 'https'})['wsgi.url_scheme'] == 'https'
    answers, _ = exchange(env, b'GET /env HTTP/1.1\r\nX-Forwarded-Proto: https\r\n'
                               b'X-Forwarded-Ssl: off\r\n\r\n')
    assert answers[0][0] == 400


def test_chunked_body_reaches_the_application_whole(env):
    answers, _ = exchange(env, b'POST /env HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked'
                               b'\r\nConnection: close\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n')
    seen = json.loads(answers[0][2])
    assert seen['body'] == 'abcdefg' and seen['CONTENT_LENGTH'] == '7'
    assert seen['wsgi.input_terminated'] is True


def test_webob_application(env):
    assert env.request('POST', '/webob', b'hello') == (200, b'olleh')


def test_streamed_answer_gets_a_length_and_close_is_called(env):
    answers, _ = exchange(env, b'GET /stream HTTP/1.1\r\nHost: x\r\n\r\n'
                               b'GET /closed HTTP/1.1\r\nHost: x\r\n\r\n', count=2,
                          wait_close=False)
    (status, headers, body), (_, _, closed) = answers
    assert status == 200 and body == b'one two three'
    assert headers['content-length'] == '13'
    assert int(closed) >= 1
    answers, _ = exchange(env, b'HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n'
                               b'GET / HTTP/1.1\r\nHost: x\r\n\r\n', count=2, heads=[0],
                          wait_close=False)
    assert answers[0][0] == 200 and answers[0][2] == b''
    assert answers[0][1]['content-length'] == '13'
    assert answers[1][2] == b'ok'


def test_application_errors_are_500_with_the_traceback_in_the_log(env):
    status, body = env.request('GET', '/error')
    assert status == 500
    assert b'secret' not in body and b'Traceback' not in body
    assert env.request('GET', '/')[0] == 200
    time.sleep(0.3)
    log = env.log()
    assert 'Traceback' in log and 'secret detail of the failure' in log


def test_access_log(env):
    env.request('GET', '/env?logged=1')
    deadline = time.monotonic() + 10
    while 'logged=1' not in env.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert re.search(r'"GET /env\?logged=1 HTTP/1\.1" 200 \d+', env.log()), env.log()


# TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tls_env(tmp_path_factory, pki):  # noqa: F811
    srv = serve(tmp_path_factory.mktemp('tls-env'), app='env',
                tls=(*pki.server, client_context(pki.ca)))
    yield srv
    srv.stop()


def test_tls(tls_env, pki):  # noqa: F811
    status, data = tls_env.request('GET', '/env')
    seen = json.loads(data)
    assert status == 200 and seen['wsgi.url_scheme'] == 'https'
    # keep-alive over TLS, and a chunked body
    conn = http.client.HTTPSConnection('localhost', tls_env.port, timeout=10,
                                       context=client_context(pki.ca))
    try:
        for i in range(3):
            conn.request('POST', '/webob', iter([b'ab', b'cd%d' % i]), encode_chunked=True)
            response = conn.getresponse()
            assert response.read() == b'%ddcba' % i
    finally:
        conn.close()


def test_tls_key_server_with_mutual_tls(tmp_path, pki):  # noqa: F811
    srv = gunicorn(tmp_path / 'mtls', pki, tmp_path / 'mtls' / 'keys',
                   extra=['--ca-certs', pki.ca, '--cert-reqs', '2', *WORKER])
    try:
        kek = srv.post('/new')
        dek = srv.post('/key', kek)
        assert srv.post('/key', kek) == dek
        for context in (client_context(pki.ca), client_context(pki.ca, pki.stranger)):
            with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
                srv.request('POST', '/new', context=context)
        # Plain HTTP on the TLS port gets nowhere either.
        with pytest.raises((OSError, http.client.HTTPException)):
            PlainServer.request(srv, 'GET', '/', timeout=10)
        assert len(os.listdir(srv.folder / 'keys')) == 1
        assert 'Using worker: keas.kmi.worker.EventWorker' in srv.log()
        assert_healthy(srv)
    finally:
        srv.stop()


# Process life ------------------------------------------------------------------------------


def worker_pids(srv):
    return re.findall(r'Booting worker with pid: (\d+)', srv.log())


def test_max_requests_restarts_a_worker_and_killed_workers_come_back(tmp_path):
    srv = serve(tmp_path / 'life', app='env', extra=['--max-requests', '20'])
    try:
        first = srv.request('GET', '/pid')[1]
        for _ in range(30):
            status, pid = srv.request('GET', '/pid')
            assert status == 200
        assert pid != first
        assert 'Autorestarting worker after current request.' in srv.log()

        env_pid = int(pid)
        os.kill(env_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status, pid = srv.request('GET', '/pid', timeout=5)
                if status == 200 and int(pid) != env_pid:
                    break
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        else:
            pytest.fail('no new worker after SIGKILL:\n' + srv.log())
        assert len(worker_pids(srv)) >= 3
    finally:
        srv.stop()


def test_sigterm_finishes_requests_in_flight(tmp_path):
    srv = serve(tmp_path / 'term', app='env', extra=['--threads', '2', '--graceful-timeout', '20'])
    try:
        idle = connect(srv)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(srv.request, 'GET', '/slow?2')
            time.sleep(0.5)  # the request is in the worker now
            srv.process.send_signal(signal.SIGTERM)
            assert slow.result() == (200, b'slow done')
        assert srv.process.wait(30) == 0
        assert closed_within(idle, 5) is not None
        idle.close()
        with pytest.raises(OSError):
            connect(srv, timeout=2).close()
        assert_healthy(srv)
    finally:
        srv.stop()


def test_sigquit_is_quick(tmp_path):
    srv = serve(tmp_path / 'quit', app='env')
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(srv.request, 'GET', '/slow?1')
            time.sleep(0.3)
            start = time.monotonic()
            srv.process.send_signal(signal.SIGQUIT)
            srv.process.wait(30)
        assert time.monotonic() - start < 10
    finally:
        srv.stop()


def process_gone(pid):
    try:
        with open('/proc/%d/stat' % pid) as stat:
            return stat.read().rpartition(')')[2].split()[0] in ('Z', 'X')
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.exists('/proc/self/stat'), reason='needs /proc')
def test_worker_leaves_when_its_master_dies(tmp_path):
    srv = serve(tmp_path / 'orphan', app='env')
    try:
        pid = int(srv.request('GET', '/pid')[1])
        srv.process.kill()  # the master, without a word to its worker
        srv.process.wait(10)
        deadline = time.monotonic() + 20
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process_gone(pid), 'the orphaned worker is still running'
    finally:
        srv.stop()


# Fuzzing the parser over real sockets ---------------------------------------------

VALID_REQUESTS = [
    b'GET / HTTP/1.1\r\nHost: x\r\n\r\n',
    b'POST /key HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello',
    b'POST /key HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\n\r\n',
    b'POST /new HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n',
    b'GET /?a=%zz HTTP/1.1\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.1\r\n\r\n',
]


@st.composite
def damaged_requests(draw):
    data = bytearray(draw(st.sampled_from(VALID_REQUESTS)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(['flip', 'insert', 'delete', 'repeat']))
        at = draw(st.integers(0, len(data)))
        if action == 'flip' and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif action == 'insert':
            data[at:at] = draw(st.sampled_from(
                [b'\r\n', b'\n', b'\r', b':', b' ', b'\x00', b'\xff', b'9' * 20,
                 b'Content-Length: 3\r\n', b'Transfer-Encoding: chunked\r\n',
                 b'Content-Length: -1\r\n', b'Host: a\r\nHost: b\r\n']))
        elif action == 'delete':
            del data[at:at + draw(st.integers(1, 8))]
        else:
            data += data[:at]
    return bytes(data)


def answers_to(srv, data):
    """What the server sends back for ``data`` followed by end of input."""
    with connect(srv, timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b''
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk


@settings(max_examples=int(os.environ.get('WORKER_FUZZ_EXAMPLES', 120)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(st.one_of(damaged_requests(), st.binary(max_size=300)))
def test_damaged_requests_get_http_answers_or_a_close(kmi, data):
    """Whatever arrives, the worker answers with HTTP/1.x status lines or just
    closes; it never crashes, hangs or writes a traceback."""
    got = answers_to(kmi, data)
    assert got == b'' or got.startswith(b'HTTP/1.1 '), got[:200]
    for line in re.findall(rb'(?m)^HTTP/1\.1 (\d{3}) ', got):
        assert 100 <= int(line) < 600


def test_the_worker_survives_the_fuzzing(kmi):
    assert kmi.request('GET', '/')[0] == 200
    assert_healthy(kmi)
