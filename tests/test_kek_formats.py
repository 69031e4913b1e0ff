"""KEK import: every PEM flavour that exists in the wild (FORMATS.md section 1).

The keys are made at test time with the openssl command line tool; the DEK
files are made by wrapping a random DEK with the public key (PKCS#1 v1.5,
``openssl pkeyutl``), so nothing here depends on our own RSA code except the
code under test: ``KeyManagementFacility.getEncryptionKey``.
"""
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

OPENSSL = shutil.which('openssl')
pytestmark = pytest.mark.skipif(OPENSSL is None, reason='the openssl command is not installed')

PASSPHRASE = 'correct horse battery staple'
DEFAULT_PASSPHRASE = 'key management facility'


def openssl(*args, stdin=None, check=True):
    proc = subprocess.run([OPENSSL, *args], input=stdin, capture_output=True)
    if check and proc.returncode != 0:
        raise RuntimeError('openssl %s failed: %s' % (' '.join(args), proc.stderr.decode()))
    return proc


def facility(directory, passphrase=None):
    from keas.kmi.facility import KeyManagementFacility
    fac = KeyManagementFacility(str(directory))
    if passphrase is not None:
        fac.rsaPassphrase = passphrase
    return fac


class KeyPair:
    def __init__(self, directory, name, bits, exponent):
        self.dir = Path(directory)
        self.bits = bits
        self.private = self.dir / (name + '.pem')
        self.public = self.dir / (name + '.pub')
        openssl('genpkey', '-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:%d' % bits,
                '-pkeyopt', 'rsa_keygen_pubexp:%d' % exponent, '-out', str(self.private))
        openssl('pkey', '-in', str(self.private), '-pubout', '-out', str(self.public))

    def wrap(self, dek):
        """PKCS#1 v1.5 encryption of ``dek`` under the public key."""
        return openssl('pkeyutl', '-encrypt', '-pubin', '-inkey', str(self.public),
                       '-pkeyopt', 'rsa_padding_mode:pkcs1', stdin=dek).stdout


@pytest.fixture(scope='module')
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp('openssl-keys')
    return {
        'rsa2048': KeyPair(d, 'rsa2048', 2048, 65537),
        'rsa1024e3': KeyPair(d, 'rsa1024e3', 1024, 3),
        'rsa512e161': KeyPair(d, 'rsa512e161', 512, 161),
    }


def _legacy(cipher, marker):
    """openssl rsa -traditional -<cipher>: legacy PEM (Proc-Type/DEK-Info)."""
    def make(key, passphrase):
        args = ['rsa', '-in', str(key.private), '-traditional', '-' + cipher,
                '-passout', 'pass:' + passphrase]
        out = openssl(*args).stdout
        if marker not in out:
            # OpenSSL 3 silently writes an unencrypted key when the cipher
            # lives in the legacy provider (DES-CBC): ask for it explicitly.
            proc = openssl(*args, '-provider', 'legacy', '-provider', 'default', check=False)
            out = proc.stdout
            if proc.returncode != 0 or marker not in out:
                pytest.skip('this openssl cannot write %s legacy PEM' % cipher)
        return out
    return make


def _pkcs8(*options):
    def make(key, passphrase):
        out = openssl('pkcs8', '-topk8', '-in', str(key.private), *options,
                      '-passout', 'pass:' + passphrase).stdout
        assert out.startswith(b'-----BEGIN ENCRYPTED PRIVATE KEY-----')
        return out
    return make


def _pkcs1_plain(key, passphrase):
    out = openssl('rsa', '-in', str(key.private), '-traditional').stdout
    assert out.startswith(b'-----BEGIN RSA PRIVATE KEY-----\nMII')
    return out


def _pkcs8_plain(key, passphrase):
    out = openssl('pkcs8', '-topk8', '-nocrypt', '-in', str(key.private)).stdout
    assert out.startswith(b'-----BEGIN PRIVATE KEY-----')
    return out


FLAVOURS = {
    'pkcs1-plain': _pkcs1_plain,
    'pkcs8-plain': _pkcs8_plain,
    'legacy-des': _legacy('des', b'DEK-Info: DES-CBC,'),
    'legacy-des3': _legacy('des3', b'DEK-Info: DES-EDE3-CBC,'),
    'legacy-aes128': _legacy('aes128', b'DEK-Info: AES-128-CBC,'),
    'legacy-aes192': _legacy('aes192', b'DEK-Info: AES-192-CBC,'),
    'legacy-aes256': _legacy('aes256', b'DEK-Info: AES-256-CBC,'),
    'pkcs8-sha1-aes256': _pkcs8('-v2', 'aes-256-cbc', '-v2prf', 'hmacWithSHA1'),
    'pkcs8-sha256-aes256': _pkcs8('-v2', 'aes-256-cbc', '-v2prf', 'hmacWithSHA256'),
    'pkcs8-sha256-aes256-600000': _pkcs8('-v2', 'aes-256-cbc', '-v2prf', 'hmacWithSHA256',
                                         '-iter', '600000'),
    'pkcs8-sha256-aes128': _pkcs8('-v2', 'aes-128-cbc'),
    'pkcs8-sha1-des3': _pkcs8('-v2', 'des3', '-v2prf', 'hmacWithSHA1'),
    'pkcs8-sha256-des3': _pkcs8('-v2', 'des3', '-v2prf', 'hmacWithSHA256'),
    'pkcs8-scrypt': _pkcs8('-scrypt'),
}
PLAIN = {'pkcs1-plain', 'pkcs8-plain'}
ENCRYPTED = sorted(set(FLAVOURS) - PLAIN)


def install(directory, key, kek, dek=None):
    """Store the wrapped DEK for ``kek`` in ``directory``; returns the DEK."""
    if dek is None:
        dek = os.urandom(key.bits // 16)
    (Path(directory) / (hashlib.md5(kek).hexdigest() + '.dek')).write_bytes(key.wrap(dek))
    return dek


def install_dummy(directory, kek, size=256):
    (Path(directory) / (hashlib.md5(kek).hexdigest() + '.dek')).write_bytes(os.urandom(size))


# --------------------------------------------------------------------------
# every flavour is readable

@pytest.mark.parametrize('flavour', sorted(FLAVOURS))
def test_flavour_unwraps_dek(keys, tmp_path, flavour):
    key = keys['rsa2048']
    kek = FLAVOURS[flavour](key, PASSPHRASE)
    dek = install(tmp_path, key, kek)
    assert facility(tmp_path, PASSPHRASE).getEncryptionKey(kek) == dek
    # the DEK actually works for data
    fac = facility(tmp_path, PASSPHRASE)
    assert fac.decrypt(kek, fac.encrypt(kek, b'payload')) == b'payload'


@pytest.mark.parametrize('flavour', ['pkcs1-plain', 'pkcs8-plain', 'legacy-des3',
                                     'legacy-aes256', 'pkcs8-sha256-aes256', 'pkcs8-scrypt'])
@pytest.mark.parametrize('keyname', ['rsa1024e3', 'rsa512e161'])
def test_flavour_other_key_sizes_and_exponents(keys, tmp_path, flavour, keyname):
    key = keys[keyname]
    kek = FLAVOURS[flavour](key, PASSPHRASE)
    dek = install(tmp_path, key, kek)
    assert facility(tmp_path, PASSPHRASE).getEncryptionKey(kek) == dek


@pytest.mark.parametrize('flavour', ['legacy-des3', 'pkcs8-sha256-aes256', 'pkcs8-plain'])
def test_default_passphrase(keys, tmp_path, flavour):
    """Without setting rsaPassphrase the class default is used."""
    key = keys['rsa2048']
    kek = FLAVOURS[flavour](key, DEFAULT_PASSPHRASE)
    dek = install(tmp_path, key, kek)
    fac = facility(tmp_path)
    assert fac.rsaPassphrase == DEFAULT_PASSPHRASE
    assert fac.getEncryptionKey(kek) == dek


@pytest.mark.parametrize('flavour', ['pkcs1-plain', 'legacy-aes128', 'pkcs8-sha1-aes256'])
def test_crlf_and_trailing_newline(keys, tmp_path, flavour):
    """The KEK names its DEK file by its exact bytes; line ending style must
    not matter to the parser."""
    key = keys['rsa2048']
    kek = FLAVOURS[flavour](key, PASSPHRASE)
    for variant in (kek.rstrip(b'\n'), kek.replace(b'\n', b'\r\n')):
        dek = install(tmp_path, key, variant)
        assert facility(tmp_path, PASSPHRASE).getEncryptionKey(variant) == dek


def test_testing_key_holder_key(tmp_path):
    """The 512-bit, e=161 unencrypted key shipped in keas.kmi.testing."""
    from keas.kmi import testing
    kek = testing.KeyEncyptingKey
    wrapped = testing.EncryptedEncryptionKey
    (tmp_path / 'k.pem').write_bytes(kek)
    expected = openssl('pkeyutl', '-decrypt', '-inkey', str(tmp_path / 'k.pem'),
                       '-pkeyopt', 'rsa_padding_mode:pkcs1', stdin=wrapped).stdout
    (tmp_path / (hashlib.md5(kek).hexdigest() + '.dek')).write_bytes(wrapped)
    assert facility(tmp_path).getEncryptionKey(kek) == expected
    (tmp_path / 'testing').mkdir()
    tfac = testing.TestingKeyManagementFacility(str(tmp_path / 'testing'))
    assert tfac.getEncryptionKey(tfac.generate()) == expected


# --------------------------------------------------------------------------
# what generate() writes is what FORMATS.md section 1 says

def test_generated_kek_is_legacy_des3_pem_readable_by_openssl(tmp_path):
    fac = facility(tmp_path)
    kek = fac.generate()
    m = re.match(rb'-----BEGIN RSA PRIVATE KEY-----\n'
                 rb'Proc-Type: 4,ENCRYPTED\n'
                 rb'DEK-Info: DES-EDE3-CBC,[0-9A-F]{16}\n\n'
                 rb'(?:[A-Za-z0-9+/]{64}\n)*[A-Za-z0-9+/=]{1,64}\n'
                 rb'-----END RSA PRIVATE KEY-----\Z', kek)
    assert m, kek
    (tmp_path / 'kek.pem').write_bytes(kek)
    text = openssl('rsa', '-in', str(tmp_path / 'kek.pem'), '-passin',
                   'pass:' + DEFAULT_PASSPHRASE, '-noout', '-text', '-check').stdout
    assert b'Private-Key: (2048 bit' in text
    assert b'publicExponent: 65537' in text
    assert b'RSA key ok' in text
    wrapped = (tmp_path / (hashlib.md5(kek).hexdigest() + '.dek')).read_bytes()
    assert len(wrapped) == 256
    dek = openssl('pkeyutl', '-decrypt', '-inkey', str(tmp_path / 'kek.pem'),
                  '-passin', 'pass:' + DEFAULT_PASSPHRASE,
                  '-pkeyopt', 'rsa_padding_mode:pkcs1', stdin=wrapped).stdout
    assert len(dek) == 128
    assert fac.getEncryptionKey(kek) == dek
    assert facility(tmp_path).getEncryptionKey(kek) == dek


# --------------------------------------------------------------------------
# failures: ValueError naming the cause

def value_error(directory, kek, passphrase=PASSPHRASE):
    with pytest.raises(ValueError) as info:
        facility(directory, passphrase).getEncryptionKey(kek)
    return str(info.value)


@pytest.mark.parametrize('flavour', ENCRYPTED)
def test_wrong_passphrase(keys, tmp_path, flavour):
    key = keys['rsa2048']
    kek = FLAVOURS[flavour](key, PASSPHRASE)
    install(tmp_path, key, kek)
    for wrong in ('wrong passphrase', PASSPHRASE + ' ', DEFAULT_PASSPHRASE):
        message = value_error(tmp_path, kek, wrong)
        assert 'passphrase' in message.lower(), (flavour, message)


def _ec_pkcs8(d):
    return openssl('genpkey', '-algorithm', 'EC', '-pkeyopt',
                   'ec_paramgen_curve:P-256').stdout


NON_RSA = {
    'ec-pkcs8': lambda d: _ec_pkcs8(d),
    'ec-traditional': lambda d: openssl('ec', stdin=_ec_pkcs8(d)).stdout,
    'ec-pkcs8-encrypted': lambda d: openssl(
        'pkcs8', '-topk8', '-v2', 'aes-256-cbc', '-passout', 'pass:' + PASSPHRASE,
        stdin=_ec_pkcs8(d)).stdout,
    'ed25519-pkcs8': lambda d: openssl('genpkey', '-algorithm', 'ed25519').stdout,
}


@pytest.mark.parametrize('kind', sorted(NON_RSA))
def test_not_an_rsa_key(tmp_path, kind):
    kek = NON_RSA[kind](tmp_path)
    assert kek.startswith(b'-----BEGIN ')
    install_dummy(tmp_path, kek)
    message = value_error(tmp_path, kek)
    assert 'RSA' in message, (kind, message)


def test_public_key_is_rejected(keys, tmp_path):
    """A public key cannot unwrap anything (the reference raises TypeError here)."""
    kek = keys['rsa2048'].public.read_bytes()
    install_dummy(tmp_path, kek)
    with pytest.raises((ValueError, TypeError)):
        facility(tmp_path).getEncryptionKey(kek)


def _malformed(keys):
    key = keys['rsa2048']
    pkcs1 = FLAVOURS['pkcs1-plain'](key, PASSPHRASE)
    pkcs8 = FLAVOURS['pkcs8-plain'](key, PASSPHRASE)
    legacy = FLAVOURS['legacy-des3'](key, PASSPHRASE)
    lines = pkcs1.splitlines(keepends=True)
    body = b''.join(lines[1:-1])
    cases = {
        'empty': b'',
        'garbage-binary': bytes(range(256)) * 3,
        'garbage-text': b'this is not a key at all\n',
        'no-armour': body,
        'no-end-line': b''.join(lines[:-1]),
        'truncated-base64-no-end': b''.join(lines[:len(lines) // 2]),
        'truncated-base64-with-end': b''.join(lines[:len(lines) // 2] + lines[-1:]),
        'truncated-mid-line': b''.join(lines[:5])[:-20] + b'\n' + lines[-1],
        'bad-base64-char': pkcs1.replace(lines[3], lines[3][:10] + b'*' + lines[3][11:]),
        'pkcs8-truncated': b''.join(pkcs8.splitlines(keepends=True)[:6])
                           + b'-----END PRIVATE KEY-----\n',
        'legacy-no-end': b''.join(legacy.splitlines(keepends=True)[:-1]),
        'legacy-bad-iv': re.sub(rb'DES-EDE3-CBC,[0-9A-F]+', b'DES-EDE3-CBC,XYZ', legacy),
        'der-garbage-in-armour': b'-----BEGIN RSA PRIVATE KEY-----\n'
                                 b'AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n'
                                 b'-----END RSA PRIVATE KEY-----\n',
    }
    return cases


MALFORMED = ['empty', 'garbage-binary', 'garbage-text', 'no-armour', 'no-end-line',
             'truncated-base64-no-end', 'truncated-base64-with-end', 'truncated-mid-line',
             'bad-base64-char', 'pkcs8-truncated', 'legacy-no-end',
             'legacy-bad-iv', 'der-garbage-in-armour']


@pytest.mark.parametrize('case', MALFORMED)
def test_malformed_pem(keys, tmp_path, case):
    kek = _malformed(keys)[case]
    install_dummy(tmp_path, kek)
    message = value_error(tmp_path, kek)
    assert re.search('pem|malformed', message, re.I), (case, message)


def _cipher_available(name):
    proc = openssl('list', '-cipher-algorithms', check=False)
    return name.lower() in proc.stdout.decode().lower()


UNSUPPORTED = {
    'pkcs8-camellia256': ('CAMELLIA-256-CBC', _pkcs8('-v2', 'camellia-256-cbc')),
    'pkcs8-aria256': ('ARIA-256-CBC', _pkcs8('-v2', 'aria-256-cbc')),
    'legacy-camellia256': ('CAMELLIA-256-CBC',
                           _legacy('camellia256', b'DEK-Info: CAMELLIA-256-CBC,')),
    'legacy-aria256': ('ARIA-256-CBC', _legacy('aria256', b'DEK-Info: ARIA-256-CBC,')),
}


@pytest.mark.parametrize('case', sorted(UNSUPPORTED))
def test_unsupported_algorithm(keys, tmp_path, case):
    cipher, make = UNSUPPORTED[case]
    if not _cipher_available(cipher):
        pytest.skip('openssl has no %s' % cipher)
    key = keys['rsa2048']
    kek = make(key, PASSPHRASE)
    install(tmp_path, key, kek)
    message = value_error(tmp_path, kek)
    assert 'unsupported' in message.lower(), (case, message)


def test_missing_dek_is_keyerror(keys, tmp_path):
    kek = FLAVOURS['pkcs1-plain'](keys['rsa2048'], PASSPHRASE)
    with pytest.raises(KeyError):
        facility(tmp_path).getEncryptionKey(kek)


def test_dek_wrapped_for_another_key_is_valueerror(keys, tmp_path):
    kek = FLAVOURS['pkcs1-plain'](keys['rsa2048'], PASSPHRASE)
    other = keys['rsa1024e3']
    # a 256-byte blob that is not a PKCS#1 v1.5 block for this key
    install_dummy(tmp_path, kek)
    with pytest.raises(ValueError):
        facility(tmp_path).getEncryptionKey(kek)
    install(tmp_path, other, kek)   # 128-byte ciphertext for a 2048-bit key
    with pytest.raises(ValueError):
        facility(tmp_path).getEncryptionKey(kek)
