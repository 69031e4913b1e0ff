"""Key states, rewrap, destruction and the audit log (issue 13), on both
key stores: every state against every operation, in the facility and
through the WSGI application; the kmi keys and kmi audit commands."""
import io
import json
import os
import subprocess
import time

import pytest
import webob

from keas.kmi import _kmi, lifecycle, wsgi
from keas.kmi.facility import KeyManagementFacility, LocalKeyManagementFacility
from keas.kmi.lifecycle import KeyStateError, TransitionError
from keas.kmi import testing
from support import kmi

PLAIN = b'Stephan Richter'
STATES = ['active', 'deactivated', 'suspended', 'compromised', 'destroyed']
# The path from active to each state (SP 800-57 allows no shortcut back).
PATHS = {
    'active': [],
    'deactivated': ['deactivated'],
    'suspended': ['suspended'],
    'compromised': ['compromised'],
    'destroyed': ['deactivated', 'destroyed'],
}


class Small(KeyManagementFacility):
    """1024-bit KEKs: quicker to make, and as good for these tests."""
    rsaKeyLength = 1024
    keyLength = 64
    stateRefresh = 0.0  # read the state on every use: the tests change it often


def facility(location, **options):
    return Small(location, audit=True, **options)


def call(app, path, body=b'', method='POST', **environ):
    request = webob.Request.blank(path, method=method, body=body,
                                  environ=dict({'REMOTE_ADDR': '10.1.2.3'}, **environ))
    response = request.get_response(app)
    return response.status_code, response.headers, response.body


def made(location):
    """A key with data under it in both formats, before any state change."""
    kmf = facility(location)
    kek = kmf.generate()
    legacy = kmf.encrypt(kek, PLAIN)
    kmf.dataFormat = 2
    v2 = kmf.encrypt(kek, PLAIN)
    kmf.dataFormat = 1
    return kmf, kek, legacy, v2


def moved_to(kmf, kek, state):
    name = _kmi.kek_name(kek)
    for step in PATHS[state]:
        kmf.change_state(name, step, 'test: to %s' % state)
    return name


# The state matrix -------------------------------------------------------------------

# state -> (getEncryptionKey/decrypt allowed, encrypt allowed, POST /key status)
EXPECTED = {
    'active': (True, True, 200),
    'deactivated': (True, False, 200),
    'suspended': (False, False, 403),
    'compromised': (False, False, 403),
    'destroyed': (False, False, 410),
}


@pytest.mark.parametrize('state', STATES)
def test_every_state_against_every_operation(store_location, state):
    kmf, kek, legacy, v2 = made(store_location)
    name = moved_to(kmf, kek, state)
    serves, encrypts, status = EXPECTED[state]
    # A fresh facility (another process, another server) and the one that
    # made the change must agree.
    for f in (kmf, facility(store_location)):
        def refused(operation, *args):
            with pytest.raises(KeyStateError) as info:
                operation(*args)
            assert info.value.state == state and name in str(info.value)

        if serves:
            assert len(f.getEncryptionKey(kek)) == 64
            assert f.decrypt(kek, legacy) == PLAIN and f.decrypt(kek, v2) == PLAIN
            out = io.BytesIO()
            f.decrypt_file(kek, io.BytesIO(v2), out)
            assert out.getvalue() == PLAIN
        else:
            refused(f.getEncryptionKey, kek)
            refused(f.decrypt, kek, legacy)
            refused(f.decrypt, kek, v2)
            refused(f.decrypt_file, kek, io.BytesIO(v2), io.BytesIO())
        for fmt in (1, 2):
            f.dataFormat = fmt
            if encrypts:
                assert f.decrypt(kek, f.encrypt(kek, PLAIN)) == PLAIN
            else:
                refused(f.encrypt, kek, PLAIN)
                refused(f.encrypt_file, kek, io.BytesIO(PLAIN), io.BytesIO())
        f.dataFormat = 1
    # Through the server, which says the state in a header.
    app = wsgi.KeyManagementApplication(facility(store_location))
    code, headers, body = call(app, '/key', kek)
    assert code == status
    assert headers[lifecycle.KEY_STATE_HEADER] == state
    if status == 200:
        assert body == kmf.getEncryptionKey(kek)
    # The metadata keeps the whole history, dated.
    meta = kmf.metadata(name)
    assert meta['state'] == state
    assert [t['state'] for t in meta['transitions']] == ['active'] + PATHS[state]
    assert meta['kid'] == v2[10:26].hex()  # the kid of the DEK, in every v2 message
    if state == 'destroyed':
        assert name not in kmf and name not in kmf.keys() and name in kmf.store.meta_names()
        with pytest.raises(KeyError):
            kmf.store.get(name)


def test_transitions_allowed_and_refused(store_location):
    kmf, kek, _, _ = made(store_location)
    name = _kmi.kek_name(kek)
    with pytest.raises(TransitionError, match='cannot become active'):
        kmf.change_state(name, 'active', 'already')
    with pytest.raises(TransitionError, match='unknown key state'):
        kmf.change_state(name, 'lost', 'x')
    with pytest.raises(TransitionError, match='needs a reason'):
        kmf.change_state(name, 'suspended', '')
    kmf.change_state(name, 'suspended', 'looking into it')
    kmf.change_state(name, 'active', 'false alarm')  # reactivate
    kmf.change_state(name, 'deactivated', 'end of cryptoperiod')
    with pytest.raises(TransitionError, match='deactivated: it cannot become active'):
        kmf.change_state(name, 'active', 'no going back')
    kmf.change_state(name, 'compromised', 'KEK found on a laptop')
    with pytest.raises(TransitionError):
        kmf.change_state(name, 'deactivated', 'x')
    kmf.change_state(name, 'destroyed', 'data re-encrypted')
    for state in STATES:
        with pytest.raises(TransitionError, match='allowed: none'):
            kmf.change_state(name, state, 'a destroyed key cannot be brought back')
    with pytest.raises(KeyError):
        kmf.change_state('0' * 32, 'suspended', 'no such key')


def test_a_key_without_metadata_is_active(tmp_path):
    # A directory as keas.kmi 3.x left it: .dek files only.
    source = testing.TestingKeyManagementFacility(str(tmp_path / 'keys'))
    assert os.listdir(tmp_path / 'keys') == [_kmi.kek_name(testing.KeyEncyptingKey) + '.dek']
    kmf = facility(str(tmp_path / 'keys'))
    name = _kmi.kek_name(testing.KeyEncyptingKey)
    meta = kmf.metadata(name)
    assert meta['state'] == 'active' and meta['transitions'] == [] and meta['created']
    assert kmf.encrypt(testing.KeyEncyptingKey, PLAIN) == source.encrypt(
        testing.KeyEncyptingKey, PLAIN)
    kmf.change_state(name, 'deactivated', 'old')
    assert kmf.metadata(name)['state'] == 'deactivated'


def test_a_cryptoperiod_deactivates_by_date(store_location):
    kmf, kek, legacy, _ = made(store_location)
    kmf.deactivateAfter = 3600
    assert kmf.encrypt(kek, PLAIN) == legacy
    kmf.deactivateAfter = 0.001
    time.sleep(0.01)
    name = _kmi.kek_name(kek)
    assert kmf.metadata(name)['state'] == 'deactivated'
    assert kmf.metadata(name)['stored_state'] == 'active'
    with pytest.raises(KeyStateError, match='deactivated'):
        kmf.encrypt(kek, PLAIN)
    assert kmf.decrypt(kek, legacy) == PLAIN
    assert lifecycle.parse_period('365d') == 365 * 86400
    with pytest.raises(ValueError):
        lifecycle.parse_period('soon')


def test_states_reach_other_facilities_within_the_refresh(tmp_path):
    location = str(tmp_path / 'keys')
    kmf, kek, legacy, _ = made(location)

    class Cached(KeyManagementFacility):
        stateRefresh = 0.2

    other = Cached(location)
    assert other.decrypt(kek, legacy) == PLAIN
    kmf.change_state(_kmi.kek_name(kek), 'suspended', 'investigating')
    deadline = time.time() + 10
    while True:
        try:
            other.decrypt(kek, legacy)
        except KeyStateError as refused:
            assert refused.state == 'suspended'
            break
        assert time.time() < deadline, 'the other facility never noticed'
        time.sleep(0.05)


# Rewrap -------------------------------------------------------------------------------


def test_rewrap_destroys_the_old_entry_and_data_reads_with_the_new_kek(store_location):
    kmf, old, legacy, v2 = made(store_location)
    new = kmf.rewrap(old)
    assert new != old and new.startswith(b'-----BEGIN RSA PRIVATE KEY-----')
    assert kmf.getEncryptionKey(new) == facility(store_location).getEncryptionKey(new)
    for f in (kmf, facility(store_location)):
        assert f.decrypt(new, legacy) == PLAIN and f.decrypt(new, v2) == PLAIN
        with pytest.raises(KeyStateError) as info:
            f.getEncryptionKey(old)
        assert info.value.state == 'destroyed'
    old_meta = kmf.metadata(_kmi.kek_name(old))
    new_meta = kmf.metadata(_kmi.kek_name(new))
    assert old_meta['rewrapped_to'] == _kmi.kek_name(new)
    assert new_meta['rewrapped_from'] == _kmi.kek_name(old)
    assert new_meta['kid'] == old_meta['kid']  # the same DEK
    assert new_meta['kek_fingerprint'] != old_meta['kek_fingerprint']
    app = wsgi.KeyManagementApplication(facility(store_location))
    assert call(app, '/key', old)[0] == 410


def test_rewrap_with_a_grace_period(store_location):
    kmf, old, legacy, _ = made(store_location)
    new = kmf.rewrap(old, grace=0.5)
    name = _kmi.kek_name(old)
    assert kmf.metadata(name)['state'] == 'deactivated'
    assert kmf.decrypt(old, legacy) == PLAIN  # still, for the grace period
    with pytest.raises(KeyStateError, match='deactivated'):
        kmf.encrypt(old, PLAIN)
    time.sleep(0.6)
    with pytest.raises(KeyStateError) as info:
        kmf.decrypt(old, legacy)
    assert info.value.state == 'destroyed'
    assert name not in kmf.store  # erased once the grace period ended
    assert kmf.decrypt(new, legacy) == PLAIN


def test_rewrap_refusals(store_location, tmp_path):
    kmf, kek, _, _ = made(store_location)
    with pytest.raises(KeyError):
        kmf.rewrap(Small(str(tmp_path / 'elsewhere')).generate())
    kmf.change_state(_kmi.kek_name(kek), 'suspended', 'x')
    with pytest.raises(KeyStateError):
        kmf.rewrap(kek)
    app = wsgi.KeyManagementApplication(facility(store_location))
    assert call(app, '/rewrap', kek)[0] == 403
    assert call(app, '/rewrap', b'garbage')[0] == 404
    assert call(app, '/rewrap?grace=soon', kek)[0] == 400


def test_the_local_facility_learns_the_state(tmp_path):
    master = facility(str(tmp_path / 'keys'))
    kek = master.generate()
    local = LocalKeyManagementFacility('https://kms.example')
    testing.setupRestApi(local, master)
    legacy = local.encrypt(kek, PLAIN)
    assert local.keyState(kek) == 'active'
    master.change_state(_kmi.kek_name(kek), 'deactivated', 'cryptoperiod')
    local.timeout = 0
    assert local.decrypt(kek, legacy) == PLAIN
    assert local.keyState(kek) == 'deactivated'
    with pytest.raises(KeyStateError, match='deactivated'):
        local.encrypt(kek, PLAIN)
    new = local.rewrap(kek)
    assert local.decrypt(new, legacy) == PLAIN
    with pytest.raises(KeyStateError) as info:
        local.getEncryptionKey(kek)
    assert info.value.state == 'destroyed'


# The audit log --------------------------------------------------------------------------


def test_the_server_audits_every_key_request(store_location):
    app = wsgi.application_factory({}, **{'storage-dir': store_location})
    status, _, kek = call(app, '/new')
    assert status == 200
    assert call(app, '/key', kek)[0] == 200
    assert call(app, '/key', b'unknown')[0] == 404
    assert call(app, '/key', kek, HTTP_X_FORWARDED_FOR='6.6.6.6')[0] == 200
    _, _, new = call(app, '/rewrap', kek)
    assert call(app, '/key', kek)[0] == 410
    entries = app.facility.store.audit_log().tail(0)
    events = [(e['event'], e['outcome']) for e in entries]
    name, new_name = _kmi.kek_name(kek), _kmi.kek_name(new)
    assert events == [('generate', 'ok'), ('fetch', 'ok'), ('fetch', 'not found'),
                      ('fetch', 'ok'), ('rewrap', 'ok: from %s' % name),
                      ('state', 'ok: active -> destroyed'), ('fetch', 'destroyed')]
    assert entries[0]['name'] == name and entries[0]['kid'] == entries[1]['kid']
    assert entries[4]['name'] == new_name and entries[4]['kid'] == entries[0]['kid']
    assert all(e['client'] == '10.1.2.3' for e in entries)
    count, _, broken = app.facility.store.audit_log().verify()
    assert broken is None and count == len(entries)
    # Never key material or bodies.
    text = json.dumps(entries)
    dek = app.facility.getEncryptionKey(new)
    for secret in (kek, new):
        for line in secret.splitlines()[3:-1]:
            assert not line or line.decode() not in text
    assert dek.hex() not in text and 'PRIVATE KEY' not in text


def test_a_trusted_proxy_names_the_client(tmp_path):
    app = wsgi.application_factory({}, **{
        'storage-dir': str(tmp_path / 'keys'), 'client-address-header': 'X-Forwarded-For',
        'client-subject-header': 'X-Client-Subject'})
    call(app, '/new', HTTP_X_FORWARDED_FOR='192.0.2.7', HTTP_X_CLIENT_SUBJECT='CN=app1')
    entry = app.facility.store.audit_log().tail(1)[0]
    assert (entry['client'], entry['subject']) == ('192.0.2.7', 'CN=app1')


def test_audit_off(tmp_path):
    app = wsgi.application_factory({}, **{'storage-dir': str(tmp_path / 'keys'),
                                          'audit': 'off'})
    _, _, kek = call(app, '/new')
    assert call(app, '/key', kek)[0] == 200
    assert not os.path.exists(tmp_path / 'keys' / 'audit.jsonl')


def tamper_first_fetch(store_location):
    """Edit the outcome of the first fetch entry, as someone covering tracks."""
    if '://' not in store_location:
        path = os.path.join(store_location, 'audit.jsonl')
        lines = open(path).read().splitlines()
        for i, line in enumerate(lines):
            if '"event":"fetch"' in line:
                lines[i] = line.replace('"outcome":"ok"', '"outcome":"not found"')
                break
        open(path, 'w').write('\n'.join(lines) + '\n')
        return
    import psycopg
    with psycopg.connect(store_location, autocommit=True) as conn:
        conn.execute("UPDATE kmi.audit SET fields = replace(fields, '\"outcome\":\"ok\"',"
                     " '\"outcome\":\"not found\"') WHERE seq = "
                     "(SELECT min(seq) FROM kmi.audit WHERE fields LIKE '%\"fetch\"%')")


def test_kmi_audit_verify_and_tail_find_tampering(store_location):
    app = wsgi.application_factory({}, **{'storage-dir': store_location})
    _, _, kek = call(app, '/new')
    for _ in range(3):
        call(app, '/key', kek)
    app.facility.store.close()
    good = kmi('audit', 'verify', '--store', store_location)
    assert good.returncode == 0 and '4 entries, the chain verifies' in good.stdout, good.stderr
    tail = kmi('audit', 'tail', '--store', store_location, '-n', '2')
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 2
    assert 'fetch' in tail.stdout and _kmi.kek_name(kek) in tail.stdout
    tamper_first_fetch(store_location)
    bad = kmi('audit', 'verify', '--store', store_location)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and 'entry 2' in lines[0] and 'edited' in lines[0], bad.stderr


def test_kmi_keys_commands(store_location):
    kmf, kek, legacy, _ = made(store_location)
    kmf.store.close()
    name = _kmi.kek_name(kek)
    listing = kmi('keys', 'list', '--store', store_location)
    assert listing.returncode == 0 and name in listing.stdout and 'active' in listing.stdout
    for action, state in (('suspend', 'suspended'), ('reactivate', 'active'),
                          ('deactivate', 'deactivated'), ('compromise', 'compromised')):
        result = kmi('keys', action, name, '--reason', 'test %s' % action,
                     '--store', store_location)
        assert result.returncode == 0 and '-> %s' % state in result.stdout, result.stderr
    refused = kmi('keys', 'destroy', name, '--reason', 'done', '--store', store_location)
    assert refused.returncode == 1 and '--yes-destroy' in refused.stderr
    assert name in facility(store_location).store
    done = kmi('keys', 'destroy', name, '--reason', 'done', '--yes-destroy',
               '--store', store_location)
    assert done.returncode == 0, done.stderr
    shown = json.loads(kmi('keys', 'show', name, '--store', store_location).stdout)
    assert shown['state'] == 'destroyed' and shown['stored'] is False
    assert [t['reason'] for t in shown['transitions']][-1] == 'done'
    back = kmi('keys', 'reactivate', name, '--reason', 'oops', '--store', store_location)
    assert back.returncode == 1 and len(back.stderr.strip().splitlines()) == 1
    missing = kmi('keys', 'show', '0' * 32, '--store', store_location)
    assert missing.returncode == 1 and 'no such key' in missing.stderr
    entries = facility(store_location).store.audit_log().tail(0)
    assert [e['outcome'] for e in entries if e['event'] == 'state'] == [
        'ok: active -> suspended', 'ok: suspended -> active', 'ok: active -> deactivated',
        'ok: deactivated -> compromised', 'ok: compromised -> destroyed']
    assert all(e['client'].startswith('kmi keys@') for e in entries if e['event'] == 'state')
    assert kmi('audit', 'verify', '--store', store_location).returncode == 0
    nowhere = kmi('keys', 'list')
    assert nowhere.returncode == 1 and 'KMI_STORE' in nowhere.stderr


@pytest.mark.reference
def test_the_reference_no_longer_lists_a_destroyed_key(tmp_path):
    reference = os.environ.get('KMI_REFERENCE_PYTHON')
    if not reference:
        pytest.skip('KMI_REFERENCE_PYTHON (keas.kmi 3.3.0) is not set; make test sets it')
    location = str(tmp_path / 'keys')
    kmf, kek, _, _ = made(location)
    other = kmf.generate()
    kmf.change_state(_kmi.kek_name(kek), 'deactivated', 'x')
    kmf.change_state(_kmi.kek_name(kek), 'destroyed', 'x')
    script = ('import sys; from keas.kmi.facility import KeyManagementFacility as K; '
              'k = K(sys.argv[1]); print(sorted(k.keys())); '
              'print(len(k.getEncryptionKey(open(sys.argv[2], "rb").read())))')
    (tmp_path / 'other.kek').write_bytes(other)
    out = subprocess.run([reference, '-c', script, location, str(tmp_path / 'other.kek')],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [repr([_kmi.kek_name(other)]), '64']


def test_a_compromised_key_decrypts_only_when_told_to(store_location):
    kmf, kek, legacy, v2 = made(store_location)
    kmf.change_state(_kmi.kek_name(kek), 'compromised', 'KEK leaked')
    with pytest.raises(KeyStateError):
        kmf.decrypt(kek, legacy)
    reencrypting = facility(store_location)
    reencrypting.allowCompromised = True
    assert reencrypting.decrypt(kek, legacy) == PLAIN
    assert reencrypting.decrypt(kek, v2) == PLAIN
    with pytest.raises(KeyStateError, match='compromised'):
        reencrypting.encrypt(kek, PLAIN)
    app = wsgi.KeyManagementApplication(facility(store_location))
    assert call(app, '/key', kek)[0] == 403  # never through the server
