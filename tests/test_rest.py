"""The REST views (keas.kmi.rest) and the WSGI application around them (keas.kmi.wsgi)."""
import errno
import io
import logging
import os
import shutil
import stat
import subprocess

import pytest
from webob import Request

from keas.kmi import rest
from keas.kmi import wsgi
from keas.kmi.facility import KeyManagementFacility
from support import md5hex

CLIENT = '192.0.2.7'


class StubFacility:
    """A facility whose answers and failures a test chooses."""

    def __init__(self, keys=(), generate_error=None, lookup_error=None):
        self.keys = dict(keys)
        self.generate_error = generate_error
        self.lookup_error = lookup_error
        self.lookups = []

    def __len__(self):
        return len(self.keys)

    def generate(self):
        if self.generate_error is not None:
            raise self.generate_error
        kek = b'-----BEGIN RSA PRIVATE KEY-----\nstub %d\n-----END RSA PRIVATE KEY-----' % len(self.keys)
        self.keys[kek] = bytes(128)
        return kek

    def getEncryptionKey(self, kek):
        self.lookups.append(kek)
        if self.lookup_error is not None:
            raise self.lookup_error
        return self.keys[kek]


@pytest.fixture(scope='module')
def master(tmp_path_factory):
    """A real facility holding two keys (RSA key generation is slow: share it)."""
    facility = KeyManagementFacility(str(tmp_path_factory.mktemp('keys')))
    facility.test_keks = [facility.generate(), facility.generate()]
    return facility


@pytest.fixture
def app(master):
    return wsgi.KeyManagementApplication(master)


def call(app, path, method='GET', body=None, **kw):
    request = Request.blank(path, method=method, remote_addr=CLIENT, **kw)
    if body is not None:
        request.body = body
    return request.get_response(app)


# The views, called directly as the package documentation does ---------------


def test_status_view_prints_as_documented():
    response = rest.get_status(StubFacility(keys={b'a': b'', b'b': b'', b'c': b''}), Request({}))
    assert str(response) == (
        '200 OK\r\nContent-Type: text/plain\r\nContent-Length: 25\r\n\r\n'
        'KMS server holding 3 keys'
    )


def test_create_key_view_returns_a_stored_kek(master):
    before = len(master)
    response = rest.create_key(master, Request({}))
    kek = response.body
    assert response.status_code == 200
    assert response.headers['Content-Type'] == 'text/plain'
    assert kek.startswith(b'-----BEGIN RSA PRIVATE KEY-----\n')
    assert md5hex(kek) in master
    assert len(master) == before + 1


def test_get_key_view_returns_the_raw_dek(master):
    request = Request({})
    request.body = master.test_keks[0]
    response = rest.get_key(master, request)
    assert response.status_code == 200
    assert len(response.body) == 128
    assert response.body == master.getEncryptionKey(master.test_keks[0])


def test_get_key_view_for_an_unknown_kek_prints_key_not_found(master):
    request = Request({})
    request.body = b'xxyz'
    response = rest.get_key(master, request)
    assert str(response) == 'Key not found'
    assert response.status_code == 404
    assert response.body == b'Key not found'
    assert response.headers['Content-Type'] == 'text/plain'


def test_get_key_view_answers_400_to_an_unreadable_kek():
    request = Request({})
    request.body = b'not a key'
    response = rest.get_key(StubFacility(lookup_error=ValueError('bad PEM')), request)
    assert response.status_code == 400
    assert response.body == rest.INVALID_KEK.encode()


# The WSGI application: routes ---------------------------------------------


def test_status_page(app, master):
    response = call(app, '/')
    assert response.status_code == 200
    assert response.headers['Content-Type'] == 'text/plain'
    assert response.text == 'KMS server holding %d keys' % len(master)


def test_head_of_the_status_page_has_no_body(app):
    response = call(app, '/', method='HEAD')
    assert response.status_code == 200
    assert response.body == b''


def test_new_creates_a_key_and_logs_its_name_and_the_client(app, master, caplog):
    caplog.set_level(logging.INFO, logger='kmi')
    before = len(master)
    response = call(app, '/new', method='POST', body=b'')
    kek = response.body
    assert response.status_code == 200
    assert kek.startswith(b'-----BEGIN RSA PRIVATE KEY-----')
    assert len(master) == before + 1
    (record,) = [r for r in caplog.records
                 if r.name == 'kmi' and 'created key' in r.getMessage()]
    assert md5hex(kek) in record.getMessage()
    assert CLIENT in record.getMessage()
    assert b'PRIVATE' not in record.getMessage().encode()


def test_one_log_line_per_key_event(tmp_path, caplog):
    """The application logs each key event once, with the client; used on its
    own, the facility keeps its original lines."""
    facility = KeyManagementFacility(str(tmp_path / 'keys'))
    app = wsgi.KeyManagementApplication(facility)
    caplog.set_level(logging.INFO, logger='kmi')
    kek = call(app, '/new', method='POST', body=b'').body
    call(app, '/key', method='POST', body=kek)
    wsgi_lines = [r.getMessage() for r in caplog.records if r.name == 'kmi']
    name = md5hex(kek)
    assert wsgi_lines == ['created key %s for %s' % (name, CLIENT),
                          'data key %s for %s: sent' % (name, CLIENT)]
    caplog.clear()
    other = KeyManagementFacility(str(tmp_path / 'keys'))
    kek2 = other.generate()
    other.getEncryptionKey(kek2)
    assert [r.getMessage() for r in caplog.records if r.name == 'kmi'] == [
        'New key added (hash): %s' % md5hex(kek2),
        'Encryption key requested: %s' % md5hex(kek2)]


def test_key_returns_the_dek_and_logs_without_key_material(app, master, caplog):
    caplog.set_level(logging.INFO, logger='kmi')
    kek = master.test_keks[1]
    response = call(app, '/key', method='POST', body=kek,
                    headers={'Content-Type': 'text/plain'})
    assert response.status_code == 200
    assert response.body == master.getEncryptionKey(kek)
    message = caplog.text
    assert md5hex(kek) in message and CLIENT in message
    body_line = max(kek.splitlines(), key=len).decode()
    assert body_line not in message
    assert response.body.hex() not in message


def test_key_for_an_unknown_kek_is_404(app):
    response = call(app, '/key', method='POST', body=b'xxyz')
    assert response.status_code == 404
    assert response.body == b'Key not found'


def test_key_for_an_unreadable_kek_is_400(tmp_path):
    # A name that exists but a KEK that cannot be parsed: the client's fault.
    facility = KeyManagementFacility(str(tmp_path))
    kek = facility.generate()
    garbage = b'-----BEGIN RSA PRIVATE KEY-----\ngarbage\n-----END RSA PRIVATE KEY-----'
    dek_file = tmp_path / (md5hex(kek) + '.dek')
    (tmp_path / (md5hex(garbage) + '.dek')).write_bytes(dek_file.read_bytes())
    response = call(wsgi.KeyManagementApplication(facility), '/key', method='POST', body=garbage)
    assert response.status_code == 400
    assert response.headers['Content-Type'] == 'text/plain'
    assert response.body == rest.INVALID_KEK.encode()


@pytest.mark.parametrize('method, path, allowed', [
    ('GET', '/new', 'POST'),
    ('GET', '/key', 'POST'),
    ('PUT', '/key', 'POST'),
    ('DELETE', '/new', 'POST'),
    ('POST', '/', 'GET, HEAD'),
])
def test_wrong_methods_are_405_with_allow(method, path, allowed):
    facility = StubFacility()
    response = call(wsgi.KeyManagementApplication(facility), path, method=method)
    assert response.status_code == 405
    assert response.headers['Allow'] == allowed
    assert response.headers['Content-Type'] == 'text/plain'
    assert len(facility) == 0 and facility.lookups == []


@pytest.mark.parametrize('path', ['/nothing', '/new/', '/key/x', '//new', '/index.html'])
def test_unknown_paths_are_404(path):
    response = call(wsgi.KeyManagementApplication(StubFacility()), path, method='POST')
    assert response.status_code == 404
    assert response.headers['Content-Type'] == 'text/plain'


@pytest.mark.parametrize('method', ['GET', 'POST'])
def test_paths_that_are_not_utf8_are_404(method, caplog):
    # A server hands the path over as latin-1 text; b'/\xffnew' is not UTF-8,
    # which webob's path_info cannot decode (found by fuzzing the worker).
    environ = Request.blank('/', method=method, remote_addr=CLIENT).environ
    environ['PATH_INFO'] = b'/\xffnew'.decode('latin-1')
    response = Request(environ).get_response(
        wsgi.KeyManagementApplication(StubFacility()))
    assert response.status_code == 404
    assert 'Traceback' not in caplog.text


# The WSGI application: limits and failures ----------------------------------


def test_key_body_over_64_kib_is_413_without_a_lookup():
    facility = StubFacility()
    app = wsgi.KeyManagementApplication(facility)
    response = call(app, '/key', method='POST', body=b'k' * (100 * 1024))
    assert response.status_code == 413
    assert facility.lookups == []
    # The limit itself is allowed.
    response = call(app, '/key', method='POST', body=b'k' * wsgi.MAX_KEK_SIZE)
    assert response.status_code == 404
    assert facility.lookups == [b'k' * wsgi.MAX_KEK_SIZE]


class EndlessInput:
    """A request stream that never ends; records how much was asked for."""

    def __init__(self):
        self.requested = 0

    def read(self, size=-1):
        assert size >= 0, 'an unbounded read of the request body'
        self.requested += size
        return b'k' * size

    readline = read


def test_an_oversize_body_is_read_and_dropped_before_the_413():
    # Unread request bytes would make the closing server's kernel reset the
    # connection under a client still sending, which may lose the answer.
    big = io.BytesIO(b'k' * (100 * 1024))
    request = Request.blank('/key', method='POST', remote_addr=CLIENT)
    request.environ.update({'wsgi.input': big, 'CONTENT_LENGTH': str(100 * 1024)})
    response = request.get_response(wsgi.KeyManagementApplication(StubFacility()))
    assert response.status_code == 413
    assert big.tell() == 100 * 1024


def test_declared_length_over_the_limit_is_refused_before_reading():
    stream = EndlessInput()
    request = Request.blank('/key', method='POST', remote_addr=CLIENT)
    request.environ.update({'wsgi.input': stream, 'CONTENT_LENGTH': str(10 ** 9)})
    response = request.get_response(wsgi.KeyManagementApplication(StubFacility()))
    assert response.status_code == 413
    assert stream.requested == 0


def test_a_body_that_ends_early_is_no_key_request(caplog):
    # What a server hands over when the client hangs up in the middle of its body.
    facility = StubFacility()
    request = Request.blank('/key', method='POST', remote_addr=CLIENT)
    request.environ.update({'wsgi.input': io.BytesIO(b'-----BEGIN'), 'CONTENT_LENGTH': '1700'})
    response = request.get_response(wsgi.KeyManagementApplication(facility))
    assert response.status_code == 400
    assert facility.lookups == []
    assert 'the body ended after 10 of 1700 bytes' in caplog.text


def test_chunked_body_read_is_capped():
    stream = EndlessInput()
    request = Request.blank('/key', method='POST', remote_addr=CLIENT)
    request.environ.pop('CONTENT_LENGTH', None)
    request.environ.update({'wsgi.input': stream, 'wsgi.input_terminated': True,
                            'HTTP_TRANSFER_ENCODING': 'chunked'})
    response = request.get_response(wsgi.KeyManagementApplication(StubFacility()))
    assert response.status_code == 413
    # Past the limit, it is read on and dropped (see wsgi.DRAIN_LIMIT), not kept.
    assert stream.requested <= wsgi.DRAIN_LIMIT


def test_chunked_kek_is_accepted(app, master):
    kek = master.test_keks[0]
    request = Request.blank('/key', method='POST', remote_addr=CLIENT)
    request.environ.pop('CONTENT_LENGTH', None)
    request.environ.update({'wsgi.input': io.BytesIO(kek), 'wsgi.input_terminated': True})
    response = request.get_response(app)
    assert response.status_code == 200
    assert response.body == master.getEncryptionKey(kek)


def test_internal_error_is_a_plain_500_and_the_traceback_is_logged(caplog):
    app = wsgi.KeyManagementApplication(
        StubFacility(generate_error=RuntimeError('secret internal detail')))
    response = call(app, '/new', method='POST')
    assert response.status_code == 500
    assert response.headers['Content-Type'] == 'text/plain'
    assert response.body == b'Internal server error'
    (record,) = [r for r in caplog.records if r.name == 'kmi' and r.levelno >= logging.ERROR]
    assert record.exc_info[0] is RuntimeError
    assert CLIENT in record.getMessage()


def test_no_space_left_on_new_is_503_with_a_clear_log_line(caplog):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    app = wsgi.KeyManagementApplication(StubFacility(generate_error=full))
    response = call(app, '/new', method='POST')
    assert response.status_code == 503
    assert response.body == b'Key storage is full'
    (record,) = [r for r in caplog.records if r.name == 'kmi' and r.levelno >= logging.ERROR]
    assert 'no space left' in record.getMessage()
    assert CLIENT in record.getMessage()


@pytest.fixture
def full_filesystem(tmp_path):
    """A 16 KiB tmpfs filled to the last byte (needs root; skipped elsewhere)."""
    mount_point = tmp_path / 'full'
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which('mount') is None:
        pytest.skip('mounting a tmpfs needs root')
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16k', 'tmpfs',
                              str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip('cannot mount a tmpfs here: %s' % mounted.stderr.decode().strip())
    try:
        (mount_point / 'keys').mkdir()
        fd = os.open(mount_point / 'filler', os.O_WRONLY | os.O_CREAT)
        try:
            for _ in range(1000):  # 16 KiB fills long before
                os.write(fd, bytes(512))
        except OSError as error:
            assert error.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mount_point / 'keys'
    finally:
        subprocess.run(['umount', str(mount_point)], check=True)


def test_a_full_key_storage_is_503_with_the_real_facility(full_filesystem, caplog):
    # The core must keep errno on the OSError for the server to tell a full
    # disk from other trouble.
    app = wsgi.KeyManagementApplication(KeyManagementFacility(str(full_filesystem)))
    response = call(app, '/new', method='POST')
    assert response.status_code == 503
    assert 'no space left' in caplog.text


def test_other_os_errors_on_new_are_500():
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    app = wsgi.KeyManagementApplication(StubFacility(generate_error=denied))
    assert call(app, '/new', method='POST').status_code == 500


def test_a_failing_lookup_is_500_not_a_crash():
    app = wsgi.KeyManagementApplication(StubFacility(lookup_error=RuntimeError('boom')))
    response = call(app, '/key', method='POST', body=b'kek')
    assert response.status_code == 500
    assert b'boom' not in response.body


# The PasteDeploy entry point ------------------------------------------------


def test_factory_creates_the_storage_directory_private(tmp_path):
    storage = tmp_path / 'var' / 'keys'
    app = wsgi.application_factory({}, **{'storage-dir': str(storage)})
    assert stat.S_IMODE(storage.stat().st_mode) == 0o700
    response = call(app, '/new', method='POST')
    assert response.status_code == 200
    assert sorted(os.listdir(storage)) == sorted([md5hex(response.body) + '.dek',
                                                  md5hex(response.body) + '.meta',
                                                  'audit.jsonl'])
    assert call(app, '/').text == 'KMS server holding 1 keys'


def test_factory_warns_about_an_open_storage_directory(tmp_path, caplog):
    tmp_path.chmod(0o755)
    wsgi.application_factory({}, **{'storage-dir': str(tmp_path)})
    assert 'accessible to other users' in caplog.text


def test_factory_requires_storage_dir():
    with pytest.raises(ValueError, match='storage-dir'):
        wsgi.application_factory({})


def test_paste_deploy_finds_the_application(tmp_path):
    loadapp = pytest.importorskip('paste.deploy').loadapp
    ini = tmp_path / 'kms.ini'
    ini.write_text('[app:main]\nuse = egg:keas.kmi\nstorage-dir = %(here)s/keys\n')
    app = loadapp('config:' + str(ini))
    assert isinstance(app, wsgi.KeyManagementApplication)
    assert (tmp_path / 'keys').is_dir()
    assert call(app, '/').text == 'KMS server holding 0 keys'
