"""The key server under load and faults, served by granian on 127.0.0.1.

Every server here is started the way `make serve` starts it (`python -m
keas.kmi.wsgi`), with the granian settings of the repository's server.ini
(workers, threads, header read timeout, keep-alive, backlog), so the
documented configuration is the one tested; only the address, the
certificates and the key directory are the test's own.

- many concurrent clients: no error, no lost key;
- a full key disk: 503, a clear log line, nothing partial left, recovery;
- slow and idle clients (slowloris): normal clients are still served, and
  the slow ones are closed after the header read timeout.
"""
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# The certificate, process and request helpers of the end-to-end tests.
from test_server import APP_INI
from test_server import Server
from test_server import client_context
from test_server import free_port
from test_server import self_signed
from test_server import signed_by_ca

from keas.kmi import server as launcher
from keas.kmi.facility import KeyManagementFacility
from support import md5hex

REPO = Path(__file__).resolve().parent.parent
PEM_START = b'-----BEGIN RSA PRIVATE KEY-----'
DEK_SIZE = 128

pytestmark = [
    pytest.mark.skipif(shutil.which('openssl') is None, reason='needs the openssl command'),
]


def ini_settings():
    """The granian settings of the repository's server.ini."""
    return launcher.server_settings(str(REPO / 'server.ini'))


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    """A CA and a server certificate for localhost and 127.0.0.1 it signs."""
    folder = tmp_path_factory.mktemp('pki')
    ca, _ = self_signed(folder, 'ca', '/CN=keas.kmi faults CA',
                        '-addext', 'keyUsage=critical,keyCertSign,cRLSign')
    server = signed_by_ca(folder, 'server', '/CN=localhost', 'serverAuth',
                          'subjectAltName = DNS:localhost,IP:127.0.0.1', serial=2)
    return ca, server


def launch(folder, pki, storage, app_settings=None):
    """`python -m keas.kmi.wsgi` on a free loopback port with server.ini's
    granian settings (and ``app_settings`` in [app:main]); its standard output
    and error go to folder/server.log."""
    ca, (certfile, keyfile) = pki
    folder.mkdir(parents=True, exist_ok=True)
    settings = ini_settings()
    for own in ('host', 'port', 'ssl_certificate', 'ssl_keyfile', 'ssl_ca',
                'ssl_client_verify'):
        settings.pop(own, None)
    port = free_port()
    lines = ['[server:main]', 'use = egg:keas.kmi#granian', 'host = 127.0.0.1',
             'port = %d' % port, 'ssl_certificate = %s' % certfile,
             'ssl_keyfile = %s' % keyfile]
    lines += ['%s = %s' % (name, value.replace('%', '%%'))
              for name, value in settings.items()]
    ini = folder / 'kms.ini'
    app = APP_INI.format(storage=storage)
    if app_settings:
        extra = ''.join('%s = %s\n' % item for item in app_settings.items())
        app = app.replace('[loggers]', extra + '\n[loggers]', 1)
    ini.write_text(app + '\n' + '\n'.join(lines) + '\n')
    command = [sys.executable, '-m', 'keas.kmi.wsgi', str(ini)]
    srv = Server(command, folder, port, client_context(ca), cwd=REPO)
    srv.storage = Path(storage)
    srv.settings = settings
    return srv


def wait_for_log(srv, pattern, seconds=10):
    """The server log once it matches ``pattern`` (written by other processes)."""
    deadline = time.monotonic() + seconds
    while True:
        log = srv.log()
        if re.search(pattern, log) or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


def assert_healthy_log(log):
    assert 'Traceback' not in log, log
    assert 'WORKER TIMEOUT' not in log, log
    assert 'Unexpected exit from worker' not in log, log
    assert 'PRIVATE KEY' not in log


def test_server_ini_runs_granian():
    settings = ini_settings()
    assert settings['workers'] == '2'
    # The threads for application work (POST /new); slow clients hold none.
    assert int(settings['blocking_threads']) >= 2
    assert 1000 <= int(settings['http1_header_read_timeout']) <= 30000


# 1. Many concurrent clients -------------------------------------------------------

CLIENTS = 16
LOAD_SECONDS = 10  # clients start no request after this
MAX_REQUESTS_PER_CLIENT = 300
NEW_SHARE = 0.3  # the share of POST /new among the requests


@pytest.fixture
def load_server(tmp_path, pki):
    srv = launch(tmp_path / 'load', pki, tmp_path / 'load' / 'keys')
    yield srv
    srv.stop()


def test_concurrent_clients_get_no_errors_and_lose_no_keys(load_server):
    srv = load_server
    assert srv.settings['workers'] == '2'
    lock = threading.Lock()
    keks = []  # every KEK a POST /new answered, in order
    deks = {}  # KEK -> the first DEK POST /key answered for it
    errors = []
    counts = {'new': 0, 'key': 0, 'own': 0, 'other': 0}
    latencies = []
    deadline = time.monotonic() + LOAD_SECONDS

    def timed(path, body):
        start = time.monotonic()
        status, data = srv.request('POST', path, body, timeout=30)
        with lock:
            latencies.append(time.monotonic() - start)
        return status, data

    def client(number):
        rng = random.Random(number)
        mine = []
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() > deadline:
                return
            try:
                if not mine or rng.random() < NEW_SHARE:
                    status, kek = timed('/new', b'')
                    if status != 200 or not kek.startswith(PEM_START):
                        errors.append(('new', status, kek[:80]))
                        continue
                    mine.append(kek)
                    with lock:
                        keks.append(kek)
                        counts['new'] += 1
                    continue
                with lock:
                    own = rng.random() < 0.5 or len(keks) == len(mine)
                    kek = rng.choice(mine if own else keks)
                status, dek = timed('/key', kek)
                if status != 200 or len(dek) != DEK_SIZE:
                    errors.append(('key', status, dek[:80]))
                    continue
                with lock:
                    counts['key'] += 1
                    counts['own' if kek in mine else 'other'] += 1
                    first = deks.setdefault(kek, dek)
                if first != dek:
                    errors.append(('key', 'a second fetch gave another DEK', md5hex(kek)))
            except Exception as error:  # noqa: BLE001 - every failure is counted
                errors.append(('exception', repr(error)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_SECONDS + 60)
    elapsed = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads), 'a client hung'
    latencies.sort()
    print('\n%d clients, %.1f s: %d POST /new, %d POST /key (%d for others\' keys), '
          '%d errors; latency median %.3f s, max %.3f s'
          % (CLIENTS, elapsed, counts['new'], counts['key'], counts['other'], len(errors),
             latencies[len(latencies) // 2], latencies[-1]))

    assert errors == []
    assert counts['new'] >= CLIENTS and counts['key'] >= CLIENTS
    assert counts['other'] > 0, 'no client read a key another one created'
    assert len(set(keks)) == len(keks)

    # No lost key: one complete .dek per created KEK, and nothing else.
    files = sorted(f for f in os.listdir(srv.storage) if f != 'audit.jsonl')
    assert files == sorted(md5hex(kek) + suffix for kek in keks for suffix in ('.dek', '.meta'))
    master = KeyManagementFacility(str(srv.storage))
    for kek in keks:
        dek = master.getEncryptionKey(kek)
        assert len(dek) == DEK_SIZE
        assert deks.get(kek, dek) == dek
    assert srv.request('GET', '/') == (200, b'KMS server holding %d keys' % len(keks))
    assert_healthy_log(srv.log())


# 2. A full key disk -----------------------------------------------------------------

DISK_SIZE = '64k'
NO_SPACE_LINE = r'ERROR \[kmi\] cannot create a key for 127\.0\.0\.1: no space left'


def mount_tmpfs(mountpoint):
    if not sys.platform.startswith('linux') or shutil.which('mount') is None:
        pytest.skip('needs Linux and the mount command to make a small tmpfs')
    mountpoint.mkdir()
    result = subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=%s,mode=0700' % DISK_SIZE, 'tmpfs',
         str(mountpoint)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip('mounting a %s tmpfs is not permitted here (needs root or '
                    'CAP_SYS_ADMIN): %s' % (DISK_SIZE, result.stderr.strip()))


def unmount(mountpoint):
    for command in (['umount', str(mountpoint)], ['umount', '-l', str(mountpoint)]):
        if subprocess.run(command, capture_output=True, timeout=30).returncode == 0:
            return


def fill(folder):
    """Write folder/filler until the file system is full; its size."""
    chunk = b'\0' * 4096
    with open(folder / 'filler', 'wb', buffering=0) as filler:
        for _ in range(10_000):  # 40 MB at most, far beyond the 64 KiB disk
            try:
                filler.write(chunk)
            except OSError as error:
                assert error.errno == 28, error  # ENOSPC
                break
        else:
            pytest.fail('the small disk never filled up')
        # Whatever is left is smaller than a page: bytes, one at a time.
        for _ in range(4096):
            try:
                filler.write(b'\0')
            except OSError:
                break
    return (folder / 'filler').stat().st_size


@pytest.fixture
def full_disk_server(tmp_path, pki):
    """Keys on a small tmpfs; the audit log elsewhere."""
    disk = tmp_path / 'disk'
    mount_tmpfs(disk)
    srv = None
    try:
        srv = launch(tmp_path / 'server', pki, disk / 'keys',
                     {'audit-log': tmp_path / 'audit.jsonl'})
        srv.disk = disk
        yield srv
    finally:
        if srv is not None:
            srv.stop()
        unmount(disk)


def test_full_disk_answers_503_and_leaves_nothing_behind(full_disk_server):
    srv = full_disk_server
    before = [srv.post('/new') for _ in range(2)]
    sizes = {md5hex(kek) + suffix: (srv.storage / (md5hex(kek) + suffix)).stat().st_size
             for kek in before for suffix in ('.dek', '.meta')}
    assert sorted(os.listdir(srv.storage)) == sorted(sizes)
    assert all(size > 0 for size in sizes.values())

    fill(srv.disk)
    # The precondition: not even a small file fits into the key directory now.
    probe = srv.storage / 'probe'
    with pytest.raises(OSError) as full:
        probe.write_bytes(b'\0' * 300)
    assert full.value.errno == 28
    probe.unlink(missing_ok=True)

    for _ in range(4):  # several, so that both workers are likely to meet it
        assert srv.request('POST', '/new', b'') == (503, b'Key storage is full')
    log = wait_for_log(srv, NO_SPACE_LINE)
    assert re.search(NO_SPACE_LINE + r' on the key storage \(.*No space left on device',
                     log), log
    assert_healthy_log(log)

    # Nothing partial: only the two complete keys (each a wrapped DEK and its
    # metadata), no temporaries, no empty files.
    assert sorted(os.listdir(srv.storage)) == sorted(sizes)
    for name, size in sizes.items():
        assert (srv.storage / name).stat().st_size == size
    master = KeyManagementFacility(str(srv.storage))
    assert all(len(master.getEncryptionKey(kek)) == DEK_SIZE for kek in before)
    assert srv.request('GET', '/') == (200, b'KMS server holding 2 keys')
    assert all(srv.post('/key', kek) == master.getEncryptionKey(kek) for kek in before)

    # Space again: keys can be created again.
    (srv.disk / 'filler').unlink()
    after = srv.post('/new')
    assert after.startswith(PEM_START)
    assert sorted(os.listdir(srv.storage)) == sorted(
        [*sizes, md5hex(after) + '.dek', md5hex(after) + '.meta'])
    assert srv.post('/key', after) == KeyManagementFacility(
        str(srv.storage)).getEncryptionKey(after)
    assert srv.request('GET', '/') == (200, b'KMS server holding 3 keys')


@pytest.fixture
def full_audit_server(tmp_path, pki):
    """Keys on the ordinary disk; the audit log on a small tmpfs."""
    disk = tmp_path / 'disk'
    mount_tmpfs(disk)
    srv = None
    try:
        srv = launch(tmp_path / 'server', pki, tmp_path / 'keys',
                     {'audit-log': disk / 'audit.jsonl'})
        srv.disk = disk
        srv.audit_log = disk / 'audit.jsonl'
        yield srv
    finally:
        if srv is not None:
            srv.stop()
        unmount(disk)


def test_a_full_audit_log_fails_closed_and_loses_nothing(full_audit_server):
    from keas.kmi.audit import FileAuditLog
    srv = full_audit_server
    before = [srv.post('/new') for _ in range(2)]
    deks = [srv.post('/key', kek) for kek in before]
    fill(srv.disk)
    # The log's last page (tmpfs allocates pages) may take a few entries more.
    for _ in range(40):
        if srv.request('POST', '/key', before[0])[0] == 503:
            break
    for _ in range(4):  # both workers
        assert srv.request('POST', '/key', before[0]) == (503, b'Audit log unavailable')
        status, body = srv.request('POST', '/new', b'')
        assert status == 503 and not body.startswith(PEM_START)
    master = KeyManagementFacility(str(srv.storage))
    assert sorted(master.keys()) == sorted(md5hex(k) for k in before)
    (srv.disk / 'filler').unlink()
    assert [srv.post('/key', kek) for kek in before] == deks
    assert srv.post('/new').startswith(PEM_START)
    count, _, broken = FileAuditLog(str(srv.audit_log)).verify()
    assert broken is None and count >= 7  # 3 generates and 4 fetches at least


# 3. Slow and idle clients ------------------------------------------------------------

SLOW_CLIENTS = 300  # TLS done, then the request line and headers a byte every half second
SLOW_BODIES = 100  # headers at once, then the body of POST /key a byte every half second
IDLE_TLS = 20  # TLS done, then nothing at all
IDLE_TCP = 20  # connected, not even a TLS handshake
TRICKLE_INTERVAL = 0.5
LATENCY_BOUND = 5.0  # seconds for one normal request while the slow ones hang; generous
SLOW_REQUEST = (b'POST /new HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n'
                b'X-Slow: ' + b'z' * 200)


@pytest.fixture
def slow_server(tmp_path, pki):
    srv = launch(tmp_path / 'slow', pki, tmp_path / 'slow' / 'keys')
    yield srv
    srv.stop()


def closed_by_server(sock, seconds):
    """Seconds until the server closes ``sock`` (None: still open after ``seconds``)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except (socket.timeout, TimeoutError):
        return None
    except OSError:
        pass
    return time.monotonic() - start


def test_slow_and_idle_clients_do_not_delay_normal_ones(slow_server, pki):
    srv = slow_server
    header_timeout = int(srv.settings['http1_header_read_timeout']) / 1000
    context = client_context(pki[0])
    sockets = []
    try:
        idle_tcp = [socket.create_connection(('127.0.0.1', srv.port), timeout=10)
                    for _ in range(IDLE_TCP)]
        sockets += idle_tcp
        idle_tls, slow, bodies = [], [], []
        for group, count in ((idle_tls, IDLE_TLS), (slow, SLOW_CLIENTS),
                             (bodies, SLOW_BODIES)):
            for _ in range(count):
                raw = socket.create_connection(('127.0.0.1', srv.port), timeout=10)
                sockets.append(raw)
                group.append(context.wrap_socket(raw, server_hostname='localhost'))
                sockets.append(group[-1])
        for tls in bodies:
            tls.sendall(b'POST /key HTTP/1.1\r\nHost: localhost\r\n'
                        b'Content-Length: 60000\r\n\r\n')
        opened = time.monotonic()

        stop = threading.Event()
        cut_off = []  # seconds from a slow client's connection to the server's close
        sent = [0]

        def trickle():
            alive = list(slow)
            for index in range(len(SLOW_REQUEST)):
                for tls in list(alive):
                    try:
                        tls.sendall(SLOW_REQUEST[index:index + 1])
                    except OSError:
                        alive.remove(tls)
                        cut_off.append(time.monotonic() - opened)
                for tls in bodies:
                    # granian sets no time limit on a body: these stay open.
                    try:
                        tls.sendall(b'x')
                    except OSError:
                        pass
                sent[0] = index + 1
                if not alive or stop.wait(TRICKLE_INTERVAL):
                    return

        trickler = threading.Thread(target=trickle)
        trickler.start()
        latencies = []
        errors = []
        kek = b''
        try:
            # Normal clients while the slow ones trickle, until the server
            # could have closed them.
            ends = opened + header_timeout * 0.9
            while time.monotonic() < ends:
                for method, path in (('GET', '/'), ('POST', '/new'), ('POST', '/key')):
                    start = time.monotonic()
                    try:
                        status, data = srv.request(method, path, kek if path == '/key' else
                                                   (b'' if method == 'POST' else None),
                                                   timeout=30)
                    except Exception as error:  # noqa: BLE001 - every failure is counted
                        status, data = None, repr(error).encode()
                    latencies.append(time.monotonic() - start)
                    if status != 200:
                        errors.append((method, path, status, data[:80]))
                    elif path == '/new':
                        kek = data
                time.sleep(0.1)
            trickled = sent[0]
            # Past the header read timeout the server closes the slow and idle ones.
            idle_closed = [closed_by_server(sock, header_timeout + 15)
                           for sock in idle_tls[:5] + idle_tcp[:5]]
            trickler.join(header_timeout + 30)
        finally:
            stop.set()
            trickler.join(30)
        print('\n%d trickling headers, %d trickling bodies, %d idle TLS and %d idle TCP '
              'connections: %d normal requests, %d errors; latency median %.3f s, max %.3f s; '
              'the trickling headers closed after %.1f-%.1f s (header read timeout %.0f s)'
              % (SLOW_CLIENTS, SLOW_BODIES, IDLE_TLS, IDLE_TCP, len(latencies), len(errors),
                 sorted(latencies)[len(latencies) // 2], max(latencies),
                 min(cut_off or [0]), max(cut_off or [0]), header_timeout))
        assert errors == []
        assert len(latencies) >= 15, 'too few normal requests were made'
        assert max(latencies) < LATENCY_BOUND, sorted(latencies)[-5:]
        # The slow clients really were connected and sending all along ...
        assert trickled >= header_timeout * 0.8 / TRICKLE_INTERVAL
        # ... and were closed, not before the header read timeout.
        assert len(cut_off) == SLOW_CLIENTS, 'some slow clients were never closed'
        assert min(cut_off) > header_timeout * 0.8, min(cut_off)
        assert all(seconds is not None for seconds in idle_closed), idle_closed
    finally:
        for sock in sockets:
            sock.close()
    # Once they are gone, the server is fine.
    assert srv.request('GET', '/', timeout=15)[0] == 200
    assert_healthy_log(srv.log())
