"""Wrapped keys (issue 14): GET and PUT /wrapped/<name>, and the local
facility's keyMode='wrapped', in which no KEK (and no DEK) reaches the server.

First the views and the client in process (through the WSGI application and
``keas.kmi.testing.FakeHTTPConnection``), for every answer; then end to end:
real servers as `make serve` starts them (granian, TLS with a test CA), on a
key directory and on PostgreSQL, with clients in both modes, the testclient
command and the reference keas.kmi 3.3.0 (its client over HTTPS, and its
facility reading a directory that wrapped-mode clients filled).
"""
import base64
import http.client
import os
import re
import shutil
import ssl
import sys
import time
import uuid
from pathlib import Path

import pytest
from webob import Request

from keas.kmi import _kmi, lifecycle, rest, testing, wsgi
from keas.kmi.audit import AuditError
from keas.kmi.facility import (KeyManagementFacility, KeyServiceError,
                               LocalKeyManagementFacility, WrappedKeysUnsupported)
from keas.kmi.store import StoreUnavailable
from support import md5hex

from test_server import (  # noqa: F401 (fixtures)
    CALL_TIMEOUT, Server, client_context, free_port, kms, launched, mtls_server, pki,
    run_testclient, wait_for_log)

CLIENT = '192.0.2.9'
PASSPHRASE = b'key management facility'
UNSUPPORTED = re.compile(r'^the key server at \S+ does not support wrapped keys '
                         r'\(keas\.kmi 4 needed\)$')
REF_PYTHON = Path(os.environ.get('KMI_REFERENCE_PYTHON')
                  or Path.home() / '.cache' / 'keas.kmi' / 'reference-3.3.0' / 'bin' / 'python')


def new_key(bits=2048):
    """(name, KEK, wrapped DEK, kid, fingerprint), made as a wrapped-mode client makes them."""
    return _kmi.Facility(1).generate(bits, 65537, PASSPHRASE, bits // 16)


@pytest.fixture(scope='module')
def made():
    """A few keys made client-side (RSA key generation is slow: share them)."""
    return [new_key() for _ in range(3)]


@pytest.fixture
def master(tmp_path):
    return KeyManagementFacility(str(tmp_path / 'keys'), audit=True)


@pytest.fixture
def app(master):
    return wsgi.KeyManagementApplication(master)


def call(app, path, method='GET', body=None, headers=None):
    request = Request.blank(path, method=method, remote_addr=CLIENT, headers=headers or {})
    if body is not None:
        request.body = body
    return request.get_response(app)


def put(app, key, body=None, **headers):
    name, _, wrapped, kid, fingerprint = key
    return call(app, '/wrapped/' + name, 'PUT', wrapped if body is None else body,
                dict({'Content-Type': 'application/octet-stream', 'X-KMI-Kid': kid.hex(),
                      'X-KMI-KEK-Fingerprint': fingerprint.hex()}, **headers))


def audit_entries(master):
    return master.store.audit_log().tail(0)


def local_over(master, **kw):
    local = LocalKeyManagementFacility('https://kms.example', keyMode='wrapped', **kw)
    testing.setupRestApi(local, master)
    return local


# The server's answers, in process ----------------------------------------------------


def test_put_stores_the_bytes_and_get_returns_them_exactly(app, master, made):
    name, kek, wrapped, kid, fingerprint = made[0]
    response = put(app, made[0])
    assert response.status == '201 Created'
    assert response.headers['X-KMI-API'] == '2'
    assert response.headers['X-KMI-Key-State'] == 'active'
    assert master.store.get(name) == wrapped
    meta = master.metadata(name)
    assert (meta['state'], meta['kid'], meta['kek_fingerprint']) == \
        ('active', kid.hex(), fingerprint.hex())
    assert meta['transitions'][0]['reason'] == 'stored by a client'

    response = call(app, '/wrapped/' + name)
    assert response.status == '200 OK'
    assert response.body == wrapped
    assert response.content_type == 'application/octet-stream'
    assert response.headers['X-KMI-Key-State'] == 'active'
    assert response.headers['X-KMI-API'] == '2'
    # The master holds what it would have made itself: POST /key serves it.
    assert master.getEncryptionKey(kek) == _kmi.unwrap_dek(kek, wrapped, PASSPHRASE, 128)
    head = call(app, '/wrapped/' + name, 'HEAD')
    assert head.status_code == 200 and head.body == b''

    events = [(e['event'], e['name'], e['outcome'], e['client']) for e in audit_entries(master)]
    assert events == [('put', name, 'ok', CLIENT), ('fetch', name, 'ok', CLIENT),
                      ('fetch', name, 'ok', CLIENT)]
    assert audit_entries(master)[0]['kid'] == kid.hex()


def test_put_of_the_same_bytes_again_succeeds_and_changes_nothing(app, master, made):
    name = made[0][0]
    assert put(app, made[0]).status_code == 201
    master.change_state(name, 'suspended', 'investigating')
    before = master.store.meta(name)
    response = put(app, made[0])  # a client whose first answer was lost
    assert response.status == '200 OK'
    assert response.headers['X-KMI-Key-State'] == 'suspended'
    assert master.store.meta(name) == before  # still suspended: not re-created
    assert call(app, '/wrapped/' + name).status_code == 403
    assert audit_entries(master)[-2]['outcome'] == 'ok: already stored'


def test_put_of_other_bytes_under_an_existing_name_is_409(app, master, made):
    name, _, wrapped, _, _ = made[0]
    assert put(app, made[0]).status_code == 201
    before = master.store.meta(name)
    response = put(app, made[0], body=made[1][2])
    assert response.status == '409 Conflict'
    assert response.headers['X-KMI-API'] == '2'
    assert response.text.startswith('Key exists')
    assert master.store.get(name) == wrapped and master.store.meta(name) == before
    assert audit_entries(master)[-1]['outcome'] == 'refused: exists'


def test_put_under_a_generated_keys_name_is_409(app, master, made):
    kek = master.generate()
    name = md5hex(kek)
    stored = master.store.get(name)
    response = call(app, '/wrapped/' + name, 'PUT', made[1][2])
    assert response.status_code == 409
    assert master.store.get(name) == stored
    assert len(master.getEncryptionKey(kek)) == 128


def test_a_destroyed_keys_name_is_never_used_again(app, master, made):
    name, _, wrapped, _, _ = made[0]
    assert put(app, made[0]).status_code == 201
    master.change_state(name, 'destroyed', 'end of life')
    for body in (wrapped, made[1][2]):
        response = put(app, made[0], body=body)
        assert response.status_code == 409
        assert response.text == rest.KEY_NAME_DESTROYED
    with pytest.raises(KeyError):
        master.store.get(name)
    assert master.store.meta(name)['state'] == 'destroyed'
    response = call(app, '/wrapped/' + name)
    assert response.status == '410 Gone'
    assert response.headers['X-KMI-Key-State'] == 'destroyed'


@pytest.mark.parametrize('path', [
    '/wrapped/', '/wrapped', '/wrapped/ABCDEF0123456789ABCDEF0123456789',
    '/wrapped/0123456789abcdef0123456789abcde', '/wrapped/0123456789abcdef0123456789abcdef0',
    '/wrapped/0123456789abcdef0123456789abcdeg', '/wrapped/../0123456789abcdef0123456789abcdef',
    '/wrapped/0123456789abcdef0123456789abcdef/x', '/wrapped/0123456789abcdef0123456789abcdef.dek',
    '/wrapped/0123456789abcdef0123456789abcde%20', '/wrapped/%C3%A9'])
def test_a_name_that_is_not_an_md5_hex_is_400(app, master, made, path):
    for method, body in (('GET', None), ('PUT', made[0][2])):
        response = call(app, path, method, body)
        assert response.status_code == 400, (method, path)
        assert response.headers['X-KMI-API'] == '2'
        assert response.text == rest.INVALID_NAME
    assert master.store.names() == []


def test_bodies_that_cannot_be_a_wrapped_dek_are_400(app, master, made):
    name, kek = made[0][0], made[0][1]
    cases = {
        b'': 'of 64 to 2048 bytes, not 0',
        os.urandom(63): 'not 63 bytes',
        os.urandom(2049): 'not 2049 bytes',
        bytes(256): 'not an RSA ciphertext (its value is 0)',
        bytes(255) + b'\x01': 'its value is 1',
        kek: 'that is a private key, not a wrapped DEK',
        base64.b64encode(made[0][2]): 'that is text',
        made[0][2].hex().encode(): 'that is text',
    }
    for body, message in cases.items():
        response = put(app, made[0], body=body)
        assert response.status_code == 400, body[:20]
        assert message in response.text, response.text
        assert response.text.startswith('Not a wrapped DEK: ')
    assert name not in master.store and master.store.meta(name) is None
    assert all(e['outcome'] == 'refused: not a wrapped DEK' for e in audit_entries(master))


def test_a_body_over_64_kib_is_413(app, master, made):
    response = put(app, made[0], body=os.urandom(64 * 1024 + 1))
    assert response.status_code == 413
    assert response.headers['X-KMI-API'] == '2'
    assert master.store.names() == []


@pytest.mark.parametrize('header, value', [
    ('X-KMI-Kid', 'abc'), ('X-KMI-Kid', 'g' * 32), ('X-KMI-Kid', '0' * 33),
    ('X-KMI-KEK-Fingerprint', '0' * 63), ('X-KMI-KEK-Fingerprint', 'z' * 64)])
def test_kid_and_fingerprint_headers_must_be_hex_of_their_length(app, master, made,
                                                                 header, value):
    response = put(app, made[0], **{header: value})
    assert response.status_code == 400
    assert header in response.text
    assert master.store.names() == []


def test_kid_and_fingerprint_are_optional_and_lowercased(app, master, made):
    name, _, wrapped, kid, _ = made[0]
    response = call(app, '/wrapped/' + name, 'PUT', wrapped,
                    {'X-KMI-Kid': kid.hex().upper()})
    assert response.status_code == 201
    meta = master.metadata(name)
    assert meta['kid'] == kid.hex() and meta['kek_fingerprint'] is None
    response = call(app, '/wrapped/' + made[1][0], 'PUT', made[1][2])
    assert response.status_code == 201
    assert master.metadata(made[1][0])['kid'] is None


def test_get_answers_for_each_key_state(app, master, made):
    for key in made:
        assert put(app, key).status_code == 201
    names = [key[0] for key in made]
    master.change_state(names[0], 'deactivated', 'cryptoperiod over')
    master.change_state(names[1], 'suspended', 'investigating')
    master.change_state(names[2], 'compromised', 'leaked')
    answers = {}
    for name in names + ['0' * 32]:
        response = call(app, '/wrapped/' + name)
        assert response.headers['X-KMI-API'] == '2'
        answers[name] = (response.status, response.headers.get('X-KMI-Key-State'),
                         response.text if response.status_code != 200 else '')
    assert answers == {
        names[0]: ('200 OK', 'deactivated', ''),
        names[1]: ('403 Forbidden', 'suspended', 'Key suspended'),
        names[2]: ('403 Forbidden', 'compromised', 'Key compromised'),
        '0' * 32: ('404 Not Found', None, 'Key not found'),
    }
    master.change_state(names[1], 'active', 'cleared')
    assert call(app, '/wrapped/' + names[1]).status_code == 200
    outcomes = [e['outcome'] for e in audit_entries(master) if e['event'] == 'fetch']
    assert outcomes == ['ok', 'suspended', 'compromised', 'not found', 'ok']


def test_other_methods_are_405_with_allow(app, made):
    for method in ('POST', 'DELETE', 'PATCH'):
        response = call(app, '/wrapped/' + made[0][0], method, b'')
        assert response.status_code == 405
        assert response.headers['Allow'] == 'GET, HEAD, PUT'
        assert response.headers['X-KMI-API'] == '2'


def test_an_audit_log_that_cannot_be_written_refuses_get_and_put(app, master, made,
                                                                  monkeypatch):
    assert put(app, made[0]).status_code == 201

    def broken(**fields):
        raise AuditError('cannot write the audit log: disk full')
    monkeypatch.setattr(master.store, 'audit', broken)
    response = call(app, '/wrapped/' + made[0][0])
    assert response.status_code == 503 and response.text == wsgi.AUDIT_UNAVAILABLE
    assert response.headers['X-KMI-API'] == '2'
    assert made[0][2] not in response.body
    response = put(app, made[1])
    assert response.status_code == 503
    assert made[1][0] not in master.store


def test_an_unreachable_store_is_503_with_the_api_header(app, master, made, monkeypatch):
    def away(name):
        raise StoreUnavailable(5, 'key storage is unavailable')
    monkeypatch.setattr(master.store, 'meta', away)
    for method, body in (('GET', None), ('PUT', made[0][2])):
        response = call(app, '/wrapped/' + made[0][0], method, body)
        assert response.status_code == 503 and response.headers['Retry-After']
        assert response.headers['X-KMI-API'] == '2'


def test_the_shape_check_accepts_every_wrapped_dek(made):
    for bits in (1024, 2048):
        for _ in range(3):
            assert rest.check_wrapped(new_key(bits)[2]) is None
    assert rest.check_wrapped(testing.EncryptedEncryptionKey) is None


def test_the_legacy_endpoints_are_unchanged(app, master):
    kek = call(app, '/new', 'POST', b'').body
    response = call(app, '/key', 'POST', kek, {'Content-Type': 'text/plain'})
    assert response.status_code == 200 and len(response.body) == 128
    assert 'X-KMI-API' not in response.headers
    assert call(app, '/wrapped-keys', 'GET').status_code == 404
    assert 'X-KMI-API' not in call(app, '/wrapped-keys', 'GET').headers


# The client in process -------------------------------------------------------------


class CountingConnection(testing.FakeHTTPConnection):
    requests = []

    def request(self, method, url, body=None, headers=None):
        type(self).requests.append((method, url, body or b''))
        super().request(method, url, body, headers)


def counting(local, master):
    fake = type('Counting', (CountingConnection,), {'context': master, 'requests': []})
    local.httpsConnFactory = fake
    return fake.requests


def test_keymode_defaults_to_legacy_and_is_checked():
    assert LocalKeyManagementFacility('https://kms.example').keyMode == 'legacy'
    assert LocalKeyManagementFacility('https://kms.example', keyMode='wrapped').keyMode \
        == 'wrapped'
    with pytest.raises(ValueError, match="keyMode must be 'legacy' or 'wrapped', not 'raw'"):
        LocalKeyManagementFacility('https://kms.example', keyMode='raw')


def test_wrapped_mode_sends_neither_kek_nor_dek(master):
    local = local_over(master)
    requests = counting(local, master)
    kek = local.generate()
    assert kek.startswith(b'-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n')
    name = md5hex(kek)
    dek = local.getEncryptionKey(kek)
    assert dek == master.getEncryptionKey(kek) and len(dek) == 128
    assert [(m, u) for m, u, _ in requests] == [('PUT', '/wrapped/' + name),
                                                ('GET', '/wrapped/' + name)]
    assert requests[0][2] == master.store.get(name)
    for _, _, body in requests:
        assert b'PRIVATE KEY' not in body and dek not in body
    # Warm calls come from the cache, as in legacy mode.
    sealed = local.encrypt(kek, b'payroll')
    assert local.decrypt(kek, sealed) == b'payroll'
    assert len(requests) == 2
    assert local._LocalKeyManagementFacility__cache[kek][1:] == (dek, 'active')


def test_wrapped_mode_uses_the_facilitys_key_parameters(master):
    class Small(LocalKeyManagementFacility):
        rsaKeyLength = 1024
        keyLength = 64
        rsaPassphrase = 'our own passphrase'

    local = Small('https://kms.example', keyMode='wrapped')
    testing.setupRestApi(local, master)
    kek = local.generate()
    assert len(master.store.get(md5hex(kek))) == 128
    assert len(local.getEncryptionKey(kek)) == 64
    master.rsaPassphrase = 'our own passphrase'
    assert master.getEncryptionKey(kek) == local.getEncryptionKey(kek)


def test_a_key_from_new_is_read_in_wrapped_mode(master):
    legacy = LocalKeyManagementFacility('https://kms.example')
    testing.setupRestApi(legacy, master)
    kek = legacy.generate()
    assert local_over(master).getEncryptionKey(kek) == legacy.getEncryptionKey(kek)


def test_states_in_wrapped_mode(master):
    local = local_over(master)
    keks = [local.generate() for _ in range(3)]
    sealed = local.encrypt(keks[0], b'old data')
    master.change_state(md5hex(keks[0]), 'deactivated', 'cryptoperiod over')
    master.change_state(md5hex(keks[1]), 'suspended', 'investigating')
    master.change_state(md5hex(keks[2]), 'destroyed', 'end of life')
    local = local_over(master)
    assert local.decrypt(keks[0], sealed) == b'old data'
    assert local.keyState(keks[0]) == 'deactivated'
    with pytest.raises(lifecycle.KeyStateError, match='deactivated'):
        local.encrypt(keks[0], b'new data')
    for kek, state in ((keks[1], 'suspended'), (keks[2], 'destroyed')):
        with pytest.raises(lifecycle.KeyStateError) as refused:
            local.getEncryptionKey(kek)
        assert refused.value.state == state and refused.value.name == md5hex(kek)
    with pytest.raises(KeyError):
        local.getEncryptionKey(new_key(1024)[1])


def test_a_wrong_wrapped_dek_is_a_value_error_never_a_wrong_dek(master, made):
    # A server (or store) that answers another key's wrapped DEK under this
    # name, or damaged bytes: the padding check refuses them.
    name, kek = made[0][0], made[0][1]
    for body in (made[1][2], bytes([made[0][2][0] ^ 1]) + made[0][2][1:],
                 made[0][2][:-1] + bytes([made[0][2][-1] ^ 0x80])):
        if name in master.store:
            master.store.delete(name)
        master.store.add(name, body)
        with pytest.raises(ValueError, match=name):
            local_over(master).getEncryptionKey(kek)


def test_a_kek_that_cannot_be_read_is_a_value_error(master, made):
    name, kek = made[0][0], made[0][1]
    master.store.add(name, made[0][2])
    local = local_over(master)
    local.rsaPassphrase = 'another passphrase'
    with pytest.raises(ValueError):
        local.getEncryptionKey(kek)


class NotFoundConnection(testing.FakeHTTPConnection):
    """An old server: every /wrapped/ request is a 404 without the API header."""

    def getresponse(self):
        method, url, body, headers = self.request_data
        if url.startswith('/wrapped'):
            return testing.FakeHTTPResponse(
                testing.webob.Response(status=404, body=b'Not Found'))
        return super().getresponse()


def test_an_old_server_is_one_clear_line(master):
    local = LocalKeyManagementFacility('https://old.example', keyMode='wrapped')
    local.httpsConnFactory = type('Old', (NotFoundConnection,), {'context': master})
    with pytest.raises(WrappedKeysUnsupported) as refused:
        local.generate()
    assert UNSUPPORTED.match(str(refused.value))
    assert isinstance(refused.value, KeyServiceError)
    assert master.store.names() == []
    kek = master.generate()
    with pytest.raises(WrappedKeysUnsupported):
        local.getEncryptionKey(kek)


class LostAnswerConnection(testing.FakeHTTPConnection):
    """The first PUT is carried out, but its answer is lost on the way back."""

    lost = []

    def getresponse(self):
        response = super().getresponse()
        if self.request_data[0] == 'PUT' and not self.lost:
            self.lost.append(response.status)
            raise ConnectionResetError('connection reset by peer')
        return response


def test_generate_retries_a_put_whose_answer_was_lost(master):
    local = LocalKeyManagementFacility('https://kms.example', keyMode='wrapped')
    fake = type('Lost', (LostAnswerConnection,), {'context': master, 'lost': []})
    local.httpsConnFactory = fake
    kek = local.generate()
    assert fake.lost == [201]
    assert [e['outcome'] for e in audit_entries(master)] == ['ok', 'ok: already stored']
    assert len(local.getEncryptionKey(kek)) == 128


def test_generate_returns_no_kek_when_the_server_did_not_store_it(master, monkeypatch):
    local = local_over(master)

    def full(*args, **kw):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(master.store, 'add', full)
    with pytest.raises(KeyServiceError, match='503 Service Unavailable'):
        local.generate()
    monkeypatch.undo()
    assert master.store.names() == []


def test_rewrap_is_refused_in_wrapped_mode(master):
    local = local_over(master)
    kek = local.generate()
    with pytest.raises(ValueError, match='never does'):
        local.rewrap(kek)
    assert len(master.store.names()) == 1


# End to end: real servers over HTTPS, on both stores ------------------------------------


@pytest.fixture(scope='module', params=['directory', 'postgresql'])
def kms_server(request, tmp_path_factory, pki):
    """A key server as `make serve` starts it (granian, two workers, TLS), over
    a key directory or a PostgreSQL database."""
    folder = tmp_path_factory.mktemp('wrapped-' + request.param)
    cluster = database = None
    if request.param == 'directory':
        location = str(folder / 'keys')
    else:
        cluster = request.getfixturevalue('pg_cluster')
        database = cluster.create_database('kmi_wrapped_%s' % uuid.uuid4().hex[:10])
        location = cluster.url(database)
    srv = kms(folder / 'server', pki, location, workers=2)
    srv.location = location
    srv.kind = request.param
    yield srv
    srv.stop()
    if cluster is not None:
        from keas.kmi import pgstore
        pgstore._Database.close_all()
        if cluster.running():
            cluster.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % database)


def client(srv, pki, mode='wrapped', **kw):
    return LocalKeyManagementFacility(srv.url, cafile=pki.ca, certfile=pki.client[0],
                                      keyfile=pki.client[1], keyMode=mode, **kw)


def https(srv, method, path, body=None, headers=None, context=None):
    """(status, headers, body) of one request over TLS."""
    conn = http.client.HTTPSConnection('localhost', srv.port, timeout=CALL_TIMEOUT,
                                       context=context or srv.context)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def master_of(srv):
    return KeyManagementFacility(srv.location)


@pytest.mark.parametrize('fmt', [1, 2])
def test_round_trips_in_wrapped_mode(kms_server, pki, tmp_path, fmt):
    local = client(kms_server, pki)
    local.dataFormat = fmt
    kek = local.generate()
    assert kek.startswith(b'-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n'
                          b'DEK-Info: DES-EDE3-CBC,')
    name = md5hex(kek)
    master = master_of(kms_server)
    status, headers, body = https(kms_server, 'GET', '/wrapped/' + name)
    assert status == 200 and body == master.store.get(name)
    assert headers['Content-Type'] == 'application/octet-stream'
    assert headers['X-KMI-API'] == '2' and headers['X-KMI-Key-State'] == 'active'

    dek = local.getEncryptionKey(kek)
    assert dek == master.getEncryptionKey(kek) and len(dek) == 128
    meta = master.metadata(name)
    assert meta['kid'] == _kmi.V2Key(dek).kid.hex()
    assert re.fullmatch('[0-9a-f]{64}', meta['kek_fingerprint'])

    extra = {'associated_data': b'record 17'} if fmt == 2 else {}
    sealed = local.encrypt(kek, b'salary: 100', **extra)
    assert sealed.startswith(_kmi.V2_MAGIC) == (fmt == 2)
    fresh = client(kms_server, pki)
    assert fresh.decrypt(kek, sealed, **extra) == b'salary: 100'
    assert master.decrypt(kek, sealed, **extra) == b'salary: 100'

    plain = os.urandom(300 * 1024 + 7)
    (tmp_path / 'plain').write_bytes(plain)
    with open(tmp_path / 'plain', 'rb') as src, open(tmp_path / 'enc', 'wb') as dst:
        local.encrypt_file(kek, src, dst)
    with open(tmp_path / 'enc', 'rb') as src, open(tmp_path / 'out', 'wb') as dst:
        fresh.decrypt_file(kek, src, dst)
    assert (tmp_path / 'out').read_bytes() == plain
    with open(tmp_path / 'enc', 'rb') as src, open(tmp_path / 'out2', 'wb') as dst:
        client(kms_server, pki, 'legacy').decrypt_file(kek, src, dst)
    assert (tmp_path / 'out2').read_bytes() == plain


def test_a_wrapped_key_is_fetched_by_a_legacy_client_and_a_new_key_in_wrapped_mode(
        kms_server, pki):
    wrapped_mode, legacy = client(kms_server, pki), client(kms_server, pki, 'legacy')
    kek = wrapped_mode.generate()
    assert legacy.getEncryptionKey(kek) == wrapped_mode.getEncryptionKey(kek)
    assert legacy.decrypt(kek, wrapped_mode.encrypt(kek, b'one')) == b'one'
    kek = legacy.generate()  # POST /new
    assert client(kms_server, pki).getEncryptionKey(kek) == legacy.getEncryptionKey(kek)
    assert client(kms_server, pki).decrypt(kek, legacy.encrypt(kek, b'two')) == b'two'


def b64(data):
    return base64.b64encode(data).decode('ascii')


@pytest.fixture(scope='module')
def ref(tmp_path_factory):
    from test_differential import RefWorker
    if not REF_PYTHON.exists():
        pytest.skip('reference python %s does not exist (make test creates it)' % REF_PYTHON)
    worker = RefWorker(REF_PYTHON, tmp_path_factory.mktemp('refworker-wrapped'))
    try:
        assert worker('info')['keas.kmi'] == '3.3.0'
        yield worker
    finally:
        worker.close()


@pytest.mark.reference
def test_a_fleet_of_wrapped_legacy_and_reference_clients(kms_server, pki, ref):
    wrapped_mode = client(kms_server, pki)
    kek = wrapped_mode.generate()
    dek = wrapped_mode.getEncryptionKey(kek)
    ours_sealed = wrapped_mode.encrypt(kek, b'from a wrapped-mode client')
    # The reference's LocalKeyManagementFacility (POST /key) over HTTPS.
    answer = ref('local', url='https://localhost:%d' % kms_server.port, cafile=pki.ca,
                 kek=b64(kek), encrypt=[b64(b'from the reference client')],
                 decrypt=[b64(ours_sealed)])
    assert base64.b64decode(answer['dek']) == dek
    assert base64.b64decode(answer['decrypted'][0]) == b'from a wrapped-mode client'
    theirs = base64.b64decode(answer['encrypted'][0])
    assert theirs == wrapped_mode.encrypt(kek, b'from the reference client')
    assert client(kms_server, pki, 'legacy').decrypt(kek, theirs) == \
        b'from the reference client'


@pytest.mark.reference
def test_the_reference_reads_a_store_that_wrapped_mode_clients_filled(kms_server, pki, ref,
                                                                      tmp_path):
    keks = [client(kms_server, pki).generate() for _ in range(3)]
    local = client(kms_server, pki)
    sealed = [local.encrypt(kek, b'secret %d' % i) for i, kek in enumerate(keks)]
    if kms_server.kind == 'directory':
        directory = kms_server.location
    else:  # what `kmi store copy URL DIR` makes for keas.kmi 3 to serve from
        from keas.kmi.store import open_store
        from keas.kmi.storecopy import copy_keys
        directory = str(tmp_path / 'copy')
        src, dst = open_store(kms_server.location), open_store(directory)
        assert not copy_keys(src, dst).conflicts
        src.close()
        dst.close()
    deks = ref('get_deks', dir=directory, keks=[b64(k) for k in keks])['deks']
    assert [base64.b64decode(d) for d in deks] == [local.getEncryptionKey(k) for k in keks]
    for i, kek in enumerate(keks):
        out = ref('decrypt', dir=directory, kek=b64(kek), data=[b64(sealed[i])])['out']
        assert base64.b64decode(out[0]) == b'secret %d' % i


def test_put_of_an_existing_name_is_refused_and_nothing_is_overwritten(kms_server, pki):
    local = client(kms_server, pki)
    kek = local.generate()
    name = md5hex(kek)
    master = master_of(kms_server)
    stored, meta = master.store.get(name), master.store.meta(name)
    other = new_key()[2]
    status, headers, body = https(kms_server, 'PUT', '/wrapped/' + name, other,
                                  {'Content-Type': 'application/octet-stream'})
    assert (status, headers['X-KMI-API']) == (409, '2')
    assert body.decode().startswith('Key exists')
    status, _, _ = https(kms_server, 'PUT', '/wrapped/' + name, stored)
    assert status == 200  # the same bytes: a retry
    kek_new = client(kms_server, pki, 'legacy').generate()
    status, _, _ = https(kms_server, 'PUT', '/wrapped/' + md5hex(kek_new), other)
    assert status == 409
    assert master.store.get(name) == stored and master.store.meta(name) == meta
    assert client(kms_server, pki).getEncryptionKey(kek) == master.getEncryptionKey(kek)
    assert len(client(kms_server, pki).getEncryptionKey(kek_new)) == 128

    master.change_state(name, 'destroyed', 'end of life')
    status, headers, _ = https(kms_server, 'PUT', '/wrapped/' + name, stored)
    assert status == 409
    status, headers, _ = https(kms_server, 'GET', '/wrapped/' + name)
    assert (status, headers['X-KMI-Key-State']) == (410, 'destroyed')
    assert name not in master.store and master.store.meta(name)['state'] == 'destroyed'

    status, headers, _ = https(kms_server, 'PUT', '/wrapped/' + '0' * 32, os.urandom(100 * 1024))
    assert (status, headers['X-KMI-API']) == (413, '2')
    status, _, body = https(kms_server, 'PUT', '/wrapped/' + '0' * 32, kek)
    assert status == 400 and b'private key' in body
    assert '0' * 32 not in master.store


def test_get_of_destroyed_suspended_and_unknown_keys(kms_server, pki):
    local = client(kms_server, pki)
    keks = [local.generate() for _ in range(4)]
    master = master_of(kms_server)
    states = ['destroyed', 'suspended', 'compromised', 'deactivated']
    for kek, state in zip(keks, states):
        master.change_state(md5hex(kek), state, 'test')
    expected = {'destroyed': 410, 'suspended': 403, 'compromised': 403, 'deactivated': 200}
    for kek, state in zip(keks, states):
        status, headers, _ = https(kms_server, 'GET', '/wrapped/' + md5hex(kek))
        assert (status, headers['X-KMI-Key-State'], headers['X-KMI-API']) == \
            (expected[state], state, '2')
        fresh = client(kms_server, pki)
        if state == 'deactivated':
            assert len(fresh.getEncryptionKey(kek)) == 128
            with pytest.raises(lifecycle.KeyStateError, match='deactivated'):
                fresh.encrypt(kek, b'new data')
            continue
        with pytest.raises(lifecycle.KeyStateError) as refused:
            fresh.getEncryptionKey(kek)
        assert refused.value.state == state
    status, headers, body = https(kms_server, 'GET', '/wrapped/' + 'f' * 32)
    assert (status, headers['X-KMI-API'], body) == (404, '2', b'Key not found')
    with pytest.raises(KeyError):
        client(kms_server, pki).getEncryptionKey(new_key(1024)[1])


def test_the_server_logs_and_audits_wrapped_requests(kms_server, pki):
    local = client(kms_server, pki)
    kek = local.generate()
    local.getEncryptionKey(kek)
    name = md5hex(kek)
    log = wait_for_log(kms_server, r'wrapped key %s for 127\.0\.0\.1: sent' % name)
    assert re.search(r'\[kmi\] wrapped key %s from 127\.0\.0\.1: stored$' % name, log, re.M)
    assert re.search(r'\[kmi\] wrapped key %s for 127\.0\.0\.1: sent$' % name, log, re.M)
    # The server's fetch entries reach a database's table within a second.
    deadline = time.monotonic() + 3
    while True:
        entries = [e for e in master_of(kms_server).store.audit_log().tail(0)
                   if e['name'] == name]
        if len(entries) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(e['event'], e['outcome'], e['client']) for e in entries] == [
        ('put', 'ok', '127.0.0.1'), ('fetch', 'ok', '127.0.0.1')]
    assert entries[0]['kid'] == entries[1]['kid'] == _kmi.V2Key(
        local.getEncryptionKey(kek)).kid.hex()


def test_testclient_wrapped(kms_server, pki, tmp_path):
    tls = ['--ca-certificate', pki.ca, '--cert', pki.client[0], '--key', pki.client[1]]
    url = kms_server.url
    code, kek, err = run_testclient(url, *tls, '--wrapped', '-n', cwd=tmp_path)
    assert code == 0, err
    assert kek.startswith(b'-----BEGIN RSA PRIVATE KEY-----')
    (tmp_path / 'kek.dat').write_bytes(kek)
    code, dek, err = run_testclient(url, *tls, '--wrapped', '-g', 'kek.dat', cwd=tmp_path)
    assert code == 0, err
    assert dek == master_of(kms_server).getEncryptionKey(kek)
    code, legacy_dek, err = run_testclient(url, *tls, '-g', 'kek.dat', cwd=tmp_path)
    assert (code, legacy_dek) == (0, dek), err
    (tmp_path / 'notes.txt').write_bytes(b'meeting notes\n' * 1000)
    code, sealed, err = run_testclient(url, *tls, '--wrapped', '-e', 'kek.dat', 'notes.txt',
                                       cwd=tmp_path)
    assert code == 0, err
    (tmp_path / 'notes.enc').write_bytes(sealed)
    code, plain, err = run_testclient(url, *tls, '--wrapped', '-d', 'kek.dat', 'notes.enc',
                                      cwd=tmp_path)
    assert (code, plain) == (0, b'meeting notes\n' * 1000), err
    code, plain, err = run_testclient(url, *tls, '-d', 'kek.dat', 'notes.enc', cwd=tmp_path)
    assert (code, plain) == (0, b'meeting notes\n' * 1000), err

    (tmp_path / 'other.dat').write_bytes(new_key(1024)[1])
    code, out, err = run_testclient(url, *tls, '--wrapped', '-g', 'other.dat', cwd=tmp_path)
    assert (code, out) == (3, b'')
    assert err.count('\n') == 1 and 'does not know the key in other.dat' in err
    code, out, err = run_testclient(url, *tls, '--wrapped', '-r', 'kek.dat', cwd=tmp_path)
    assert (code, out) == (1, b'') and err.count('\n') == 1 and '--wrapped' in err


def test_mtls_refuses_wrapped_requests_without_a_certificate(mtls_server, pki, tmp_path):
    bare = client_context(pki.ca)
    for method, body in (('GET', None), ('PUT', new_key(1024)[2])):
        with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
            https(mtls_server, method, '/wrapped/' + '0' * 32, body, context=bare)
    local = LocalKeyManagementFacility(mtls_server.url, cafile=pki.ca, keyMode='wrapped')
    with pytest.raises(KeyServiceError):
        local.generate()
    stranger = LocalKeyManagementFacility(mtls_server.url, cafile=pki.ca, keyMode='wrapped',
                                          certfile=pki.stranger[0], keyfile=pki.stranger[1])
    with pytest.raises(KeyServiceError):
        stranger.generate()
    assert not [n for n in os.listdir(mtls_server.folder / 'keys') if n.endswith('.dek')]
    code, out, err = run_testclient(mtls_server.url, '--ca-certificate', pki.ca, '--wrapped',
                                    '-n', cwd=tmp_path)
    assert (code, out) == (1, b'') and err.count('\n') == 1

    member = LocalKeyManagementFacility(mtls_server.url, cafile=pki.ca, keyMode='wrapped',
                                        certfile=pki.client[0], keyfile=pki.client[1])
    kek = member.generate()
    with pytest.raises(KeyServiceError):
        local.getEncryptionKey(kek)
    assert len(member.getEncryptionKey(kek)) == 128


# Old servers ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def old_server(tmp_path_factory, pki):
    """The reference keas.kmi 3.3.0 server: gunicorn --paste with TLS, in its virtualenv."""
    gunicorn = REF_PYTHON.parent / 'gunicorn'
    if not gunicorn.exists():
        pytest.skip('no reference server: %s does not exist (make test creates it)' % gunicorn)
    folder = tmp_path_factory.mktemp('old-server')
    (folder / 'old.ini').write_text('[app:main]\nuse = call:keas.kmi.wsgi:application_factory\n'
                                    'storage-dir = %s\n' % (folder / 'keys'))
    port = free_port()
    command = [str(gunicorn), '--paste', str(folder / 'old.ini'),
               '--bind', '127.0.0.1:%d' % port, '--workers', '1',
               '--certfile', pki.server[0], '--keyfile', pki.server[1]]
    srv = Server(command, folder, port, client_context(pki.ca, pki.client),
                 extra_env={'PYTHONPATH': '', 'VIRTUAL_ENV': ''})
    yield srv
    srv.stop()


@pytest.mark.reference
def test_a_wrapped_mode_client_of_an_old_server_gets_one_clear_line(old_server, pki,
                                                                     tmp_path):
    local = client(old_server, pki)
    with pytest.raises(WrappedKeysUnsupported) as refused:
        local.generate()
    assert UNSUPPORTED.match(str(refused.value)), str(refused.value)
    assert os.listdir(old_server.folder / 'keys') == []
    kek = client(old_server, pki, 'legacy').generate()  # legacy mode works as ever
    assert len(client(old_server, pki, 'legacy').getEncryptionKey(kek)) == 128
    with pytest.raises(WrappedKeysUnsupported):
        local.getEncryptionKey(kek)
    (tmp_path / 'kek.dat').write_bytes(kek)
    tls = ['--ca-certificate', pki.ca, '--cert', pki.client[0], '--key', pki.client[1]]
    for args in (['-n'], ['-g', 'kek.dat'], ['-e', 'kek.dat', 'kek.dat']):
        code, out, err = run_testclient(old_server.url, *tls, '--wrapped', *args, cwd=tmp_path)
        assert (code, out) == (1, b''), err
        assert UNSUPPORTED.match(err.strip()[len('testclient: '):]), err
        assert err.count('\n') == 1


# The server never receives a KEK in wrapped mode ----------------------------------------

# A PasteDeploy filter in front of the application: it writes the request
# line, the headers and every body byte the application reads to one file,
# and every response body byte to another.
TEE_FILTER = '''\
"""Tee of everything the key server reads and answers (a test's filter)."""
import threading

_lock = threading.Lock()


def factory(global_config, requests, responses):
    def write(path, data):
        with _lock, open(path, 'ab') as f:
            f.write(data)

    class Tee:
        def __init__(self, stream):
            self.stream = stream

        def read(self, *args):
            data = self.stream.read(*args)
            write(requests, data)
            return data

        def readline(self, *args):
            data = self.stream.readline(*args)
            write(requests, data)
            return data

        def __iter__(self):
            return iter(self.readline, b'')

    def filter_(app):
        def tee(environ, start_response):
            head = ['%s %s' % (environ['REQUEST_METHOD'], environ.get('PATH_INFO'))]
            head += ['%s: %s' % (k, v) for k, v in sorted(environ.items())
                     if k.startswith(('HTTP_', 'CONTENT_'))]
            write(requests, ('\\n'.join(head) + '\\n').encode('latin-1'))
            environ['wsgi.input'] = Tee(environ['wsgi.input'])
            body = list(app(environ, start_response))  # start_response before returning
            write(responses, b''.join(body))
            return body
        return tee
    return filter_
'''

TEE_APP = '''\
[pipeline:main]
pipeline = tee kms

[filter:tee]
use = call:kmi_tee:factory
requests = {folder}/requests.bin
responses = {folder}/responses.bin

[app:kms]
'''


@pytest.fixture(scope='module')
def teed_server(tmp_path_factory, pki):
    folder = tmp_path_factory.mktemp('teed')
    (folder / 'kmi_tee.py').write_text(TEE_FILTER)
    from test_server import APP_INI, granian_section, REPO
    port = free_port()
    ini = folder / 'kms.ini'
    ini.write_text(APP_INI.format(storage=folder / 'keys').replace(
        '[app:main]\n', TEE_APP.format(folder=folder)) + '\n'
        + granian_section(port, *pki.server, workers=2))
    srv = Server([sys.executable, '-m', 'keas.kmi.wsgi', str(ini)], folder, port,
                 client_context(pki.ca, pki.client), cwd=REPO,
                 extra_env={'PYTHONPATH': str(folder)})
    yield srv
    srv.stop()


def wait_for_count(srv, text, count, seconds=10):
    """Wait until the server log (written by other processes) holds ``text`` ``count`` times."""
    deadline = time.monotonic() + seconds
    while srv.log().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.2)


def kek_lines(kek):
    """The base64 lines of a PEM key (what a log or dump of it would show)."""
    return [line for line in kek.splitlines()
            if line and not line.startswith(b'-----') and b':' not in line]


def test_the_server_never_receives_a_kek_in_wrapped_mode(teed_server, pki, tmp_path):
    local = client(teed_server, pki)
    keks = [local.generate() for _ in range(3)]
    deks = [local.getEncryptionKey(kek) for kek in keks]
    other = client(teed_server, pki)
    sealed = other.encrypt(keks[0], b'payroll')
    assert local.decrypt(keks[0], sealed) == b'payroll'
    tls = ['--ca-certificate', pki.ca, '--cert', pki.client[0], '--key', pki.client[1]]
    code, kek, err = run_testclient(teed_server.url, *tls, '--wrapped', '-n', cwd=tmp_path)
    assert code == 0, err
    keks.append(kek)
    (tmp_path / 'kek.dat').write_bytes(kek)
    code, dek, err = run_testclient(teed_server.url, *tls, '--wrapped', '-g', 'kek.dat',
                                    cwd=tmp_path)
    assert code == 0, err
    deks.append(dek)

    folder = teed_server.folder
    wait_for_count(teed_server, 'wrapped key ', 9)
    requests = (folder / 'requests.bin').read_bytes()
    responses = (folder / 'responses.bin').read_bytes()
    log = (teed_server.log() + '\n').encode()
    stored = b''.join(p.read_bytes() for p in (folder / 'keys').iterdir() if p.is_file())
    assert requests.count(b'PUT /wrapped/') == 4 and requests.count(b'GET /wrapped/') == 5
    for name, seen in (('requests', requests), ('responses', responses), ('log', log),
                       ('store', stored)):
        assert b'PRIVATE KEY' not in seen, name
        for kek in keks:
            for line in kek_lines(kek):
                assert line not in seen, name
        for dek in deks:
            assert dek not in seen and dek.hex().encode() not in seen, name
    # The tee does see a KEK when one is sent: POST /key in legacy mode.
    assert client(teed_server, pki, 'legacy').getEncryptionKey(keks[0]) == deks[0]
    requests = (folder / 'requests.bin').read_bytes()
    assert b'PRIVATE KEY' in requests and kek_lines(keks[0])[0] in requests
    assert deks[0] in (folder / 'responses.bin').read_bytes()


def test_the_protocol_example_with_openssl_and_curl(kms_server, pki, tmp_path):
    from test_server import need, shell
    need('curl')
    text = (Path(__file__).resolve().parent.parent / 'docs' / 'protocol.md').read_text()
    block = text[text.index('## Example'):]
    lines = [line.strip() for line in block.splitlines() if line.startswith('    ')]
    script = '\n'.join(['set -e'] + [
        line.replace('https://localhost:8080', kms_server.url).replace('sample.crt', pki.ca)
        for line in lines])
    (tmp_path / 'example.sh').write_text(script + '\n')
    result = shell('bash example.sh', tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'Stored'
    kek, dek = (tmp_path / 'kek.pem').read_bytes(), (tmp_path / 'dek.bin').read_bytes()
    assert client(kms_server, pki).getEncryptionKey(kek) == dek
    assert client(kms_server, pki, 'legacy').getEncryptionKey(kek) == dek


def test_the_readme_testclient_wrapped_lines(launched):
    """README's `testclient --wrapped` lines, against `make serve`'s command."""
    from test_server import readme, shell
    cwd = launched.folder / 'wrapped-client'
    cwd.mkdir()
    shutil.copy(launched.folder / 'sample.crt', cwd)
    (cwd / 'notes.txt').write_bytes(b'minutes of the meeting\n')
    text = (Path(__file__).resolve().parent.parent / 'README.md').read_text()
    lines = [line.strip() for line in text.splitlines()
             if line.startswith('    testclient https://localhost:8080 --wrapped')]
    assert len(lines) == 4, lines
    for line in lines:
        result = shell(readme(line, launched.port), cwd)
        assert result.returncode == 0, (line, result.stderr)
    kek = (cwd / 'kek.dat').read_bytes()
    storage = launched.folder / 'var' / 'keys'
    assert (cwd / 'datakey.dat').read_bytes() == \
        KeyManagementFacility(str(storage)).getEncryptionKey(kek)
    assert (cwd / 'notes.txt').read_bytes() == b'minutes of the meeting\n'
    assert (cwd / 'notes.enc').read_bytes() != b'minutes of the meeting\n'
