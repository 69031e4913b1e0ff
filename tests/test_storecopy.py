"""`kmi store copy SRC DST` between a directory and PostgreSQL, both ways.

The command runs as a real process (the `kmi` console script's module).
"""
import os
import re
import subprocess

import pytest

from keas.kmi.facility import KeyManagementFacility
from keas.kmi.store import open_store
from support import kmi, md5hex

@pytest.fixture(scope='module')
def real_keys(tmp_path_factory):
    """Three generated KEKs and their DEKs, and a directory holding them
    plus 40 more wrapped DEKs (random bytes, as a copy sees them)."""
    folder = str(tmp_path_factory.mktemp('source-keys'))
    kmf = KeyManagementFacility(folder)
    keks = [kmf.generate() for _ in range(3)]
    deks = {kek: kmf.getEncryptionKey(kek) for kek in keks}
    for i in range(40):
        kmf.store.add('%032x' % i, os.urandom(256))
    return folder, deks


def snapshot(location):
    store = open_store(location)
    try:
        return {name: store.get(name) for name in store.names()}
    finally:
        store.close()


def test_directory_to_database_and_back(real_keys, pg_url, tmp_path):
    folder, deks = real_keys
    source = snapshot(folder)
    assert len(source) == 43
    done = kmi('store', 'copy', folder, pg_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(': 43 copied, 0 already there, 0 conflicts')
    assert '100%' in done.stderr and 'keys' in done.stderr  # the progress bar
    assert snapshot(pg_url) == source
    # The database serves the generated keys.
    kmf = KeyManagementFacility(pg_url)
    for kek, dek in deks.items():
        assert kmf.getEncryptionKey(kek) == dek
    # Idempotent: a second run copies nothing.
    again = kmi('store', 'copy', folder, pg_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith(': 0 copied, 43 already there, 0 conflicts')
    # And back into a new directory: the same files, byte for byte.
    back = str(tmp_path / 'back')
    done = kmi('store', 'copy', pg_url, back)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(': 43 copied, 0 already there, 0 conflicts')
    assert sorted(f for f in os.listdir(back) if f.endswith('.dek')) == \
        sorted(n + '.dek' for n in source)
    for name, wrapped in source.items():
        with open(os.path.join(back, name + '.dek'), 'rb') as f:
            assert f.read() == wrapped
    kmf = KeyManagementFacility(back)
    for kek, dek in deks.items():
        assert kmf.getEncryptionKey(kek) == dek
    assert kmi('store', 'copy', pg_url, back).stdout.strip().endswith(
        ': 0 copied, 43 already there, 0 conflicts')


def test_conflicts_are_reported_and_never_overwritten(real_keys, pg_url):
    folder, _ = real_keys
    source = snapshot(folder)
    names = sorted(source)
    dst = open_store(pg_url)
    dst.add(names[0], source[names[0]])          # already there, same bytes
    dst.add(names[1], b'other bytes')            # conflicts
    dst.add(names[2], source[names[2]][::-1])
    dst.add('only-in-the-destination', b'kept')
    dst.close()
    done = kmi('store', 'copy', folder, pg_url)
    assert done.returncode == 1
    assert done.stdout.strip().endswith(': 40 copied, 1 already there, 2 conflicts')
    assert 'Traceback' not in done.stderr
    listed = re.findall(r'(?m)^  ([0-9a-f]{32})$', done.stderr)
    assert listed == [names[1], names[2]]
    after = snapshot(pg_url)
    assert after[names[1]] == b'other bytes' and after[names[2]] == source[names[2]][::-1]
    assert after['only-in-the-destination'] == b'kept'
    assert {n: after[n] for n in names if n not in names[1:3]} == {
        n: source[n] for n in names if n not in names[1:3]}
    # Still conflicting on a second run, and nothing else to do.
    again = kmi('store', 'copy', folder, pg_url)
    assert again.returncode == 1
    assert again.stdout.strip().endswith(': 0 copied, 41 already there, 2 conflicts')


def test_database_to_database_schemas(real_keys, pg_url):
    folder, _ = real_keys
    assert kmi('store', 'copy', folder, pg_url).returncode == 0
    other = pg_url + '?schema=copy'
    done = kmi('store', 'copy', pg_url, other)
    assert done.returncode == 0, done.stderr
    assert snapshot(other) == snapshot(folder)


def test_failures_are_one_line(tmp_path, real_keys, pg_cluster):
    folder, _ = real_keys
    closed = 'postgresql://kmi@127.0.0.1:1/kmi'
    for args, expected in (
            ((folder, closed), 'destination: cannot connect to the key database'),
            ((closed, folder), 'source: cannot connect to the key database'),
            ((str(tmp_path / 'missing'), folder), 'no such key directory'),
            ((folder, folder), 'the same store'),
            ((folder, 'postgresql://h/db?bogus_setting=1'), 'invalid PostgreSQL URL')):
        done = kmi('store', 'copy', *args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.count('\n') == 1 and 'Traceback' not in done.stderr, done.stderr
        assert done.stderr.startswith('kmi: ') and expected in done.stderr, done.stderr
    migrate = kmi('store', 'migrate', closed)
    assert migrate.returncode == 1 and migrate.stderr.count('\n') == 1
    assert kmi('store', 'migrate', folder).returncode == 1


@pytest.mark.reference
def test_the_reference_reads_a_directory_copied_from_the_database(real_keys, pg_url,
                                                                  tmp_path):
    python = os.environ.get('KMI_REFERENCE_PYTHON')
    if not python or not os.path.exists(python):
        pytest.skip('KMI_REFERENCE_PYTHON (keas.kmi 3.3.0) is not set; make test sets it')
    folder, deks = real_keys
    assert kmi('store', 'copy', folder, pg_url).returncode == 0
    back = str(tmp_path / 'back')
    assert kmi('store', 'copy', pg_url, back).returncode == 0
    kek, dek = next(iter(deks.items()))
    kek_file = tmp_path / 'kek.pem'
    kek_file.write_bytes(kek)
    script = ('import sys; from keas.kmi.facility import KeyManagementFacility as F; '
              'f = F(sys.argv[1]); print(len(f.keys())); '
              'print(f.getEncryptionKey(open(sys.argv[2], "rb").read()).hex())')
    out = subprocess.run([python, '-c', script, back, str(kek_file)], capture_output=True,
                         text=True, timeout=120, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['43', dek.hex()]


def test_lifecycle_metadata_goes_along(tmp_path, pg_url):
    source = KeyManagementFacility(str(tmp_path / 'keys'))
    kek = source.generate()
    name = md5hex(kek)
    source.change_state(name, 'deactivated', 'end of its cryptoperiod')
    result = kmi('store', 'copy', source.storage_dir, pg_url)
    assert result.returncode == 0, result.stderr
    target = KeyManagementFacility(pg_url)
    meta = target.metadata(name)
    assert meta['state'] == 'deactivated' and meta['kid'] == source.metadata(name)['kid']
    assert [t['state'] for t in meta['transitions']] == ['active', 'deactivated']
    assert target.getEncryptionKey(kek) == source.getEncryptionKey(kek)
