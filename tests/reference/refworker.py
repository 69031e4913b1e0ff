"""Reference side of the differential tests.

Run this script with the python of the REFERENCE virtualenv (keas.kmi 3.3.0
with pycryptodome), never with the project's own environment.  It performs
commands with the reference implementation and answers in JSON; bytes travel
as base64 strings.

Usage::

    python refworker.py '<json>'        # one request from argv
    python refworker.py < request.json  # one request from stdin
    python refworker.py --serve         # one request per stdin line, one
                                        # answer per stdout line, until EOF

A request is either a single command object or ``{"batch": [command, ...]}``;
the answer is ``{"ok": result}`` (or ``{"ok": [result, ...]}`` for a batch) or
``{"error": "...traceback..."}`` when a command itself blew up.  Per-item
failures that are part of the expected behaviour (a ValueError from decrypt,
a KeyError for an unknown KEK) are reported inside the result as
``{"error": "ValueError", "message": "..."}``.

Commands (field ``op``):

``info``
    versions and file locations of the reference modules.
``generate_keks`` {dir, count, flavour: "pkcs8" | "legacy", bits?, passphrase?}
    ``pkcs8``: the reference facility's own ``generate()`` (pycryptodome 4.x
    writes an ``ENCRYPTED PRIVATE KEY``).  ``legacy``: an RSA key exported with
    ``export_key(passphrase=..., pkcs=1)`` (``RSA PRIVATE KEY`` with
    DES-EDE3-CBC) and a DEK of ``bits // 16`` random bytes wrapped with
    PKCS#1 v1.5 into ``<md5hex(kek)>.dek``.  Returns ``{keks: [b64]}``.
``get_deks`` {dir, keks: [b64], passphrase?}
    ``getEncryptionKey`` for every KEK; ``{deks: [b64 | error]}``.
``keys`` {dir, names?}
    the mapping API: ``{keys: sorted keys(), len, contains: [name in facility]}``.
``encrypt`` / ``decrypt`` {dir, kek, data: [b64], passphrase?}
    ``{out: [b64 | error]}``.
``encrypt_files`` / ``decrypt_files`` {dir, kek, files: [{src, dst, chunksize, src_offset?}]}
    ``encrypt_file``/``decrypt_file`` from path ``src`` (after seeking to
    ``src_offset``) into a fresh file ``dst``; ``{out: [null | error]}``.
``zodb_write`` {path, spec, holder}
    a new FileStorage at ``path`` holding ``zodbmodel.build(spec)``;
    returns the description of what was committed.
``zodb_read`` {path, holder, mutate?}
    opens the FileStorage, returns ``zodbmodel.describe(root)``; with
    ``mutate`` (an int seed) applies ``zodbmodel.mutate`` and commits first.
``zodb_records`` {path}
    the newest raw record of every oid: ``{records: {oid_hex: b64}}``.

``local`` {url, cafile, kek, encrypt: [b64], decrypt: [b64]}
    the reference's client, ``LocalKeyManagementFacility(url)`` (its HTTPS
    connection factory given a context trusting ``cafile``): the DEK of
    ``kek`` (``POST /key``) and ``encrypt``/``decrypt`` of each item;
    ``{dek: b64 | error, encrypted: [...], decrypted: [...]}``.

``holder`` selects the key holder and encryption service registered with
zope.component: ``{"kind": "testing", "dir": ...}`` uses
``keas.kmi.testing.TestingKeyHolder`` and a ``TestingKeyManagementFacility``
in ``dir``; ``{"kind": "kek", "kek": b64, "dir": ...}`` uses that KEK and a
``KeyManagementFacility`` on ``dir``.
"""
import base64
import binascii
import hashlib
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


# keas.kmi 3.3.0 imports zope.component without declaring it; the Makefile
# installs it into the reference environment.
import zope.component  # noqa: E402,F401

COMPONENT_REGISTRY = 'zope.component'


def b64e(data):
    return base64.b64encode(data).decode('ascii')


def b64d(text):
    return base64.b64decode(text)


def err(exc):
    return {'error': type(exc).__name__, 'message': str(exc)}


_facilities = {}


def facility(directory, passphrase=None):
    from keas.kmi.facility import KeyManagementFacility
    key = (os.path.abspath(directory), passphrase)
    fac = _facilities.get(key)
    if fac is None:
        fac = KeyManagementFacility(directory)
        if passphrase is not None:
            fac.rsaPassphrase = passphrase
        _facilities[key] = fac
    return fac


def op_info(cmd):
    import importlib.metadata as md

    import Crypto
    import keas.kmi.facility
    return {
        'keas.kmi': md.version('keas.kmi'),
        'pycryptodome': Crypto.__version__,
        'ZODB': md.version('ZODB'),
        'facility_file': keas.kmi.facility.__file__,
        'python': sys.version,
        'component_registry': COMPONENT_REGISTRY,
    }


def op_generate_keks(cmd):
    import Crypto.Cipher.PKCS1_v1_5
    import Crypto.PublicKey.RSA
    import Crypto.Random
    from keas.kmi.facility import KeyManagementFacility

    directory = cmd['dir']
    os.makedirs(directory, exist_ok=True)
    flavour = cmd['flavour']
    bits = cmd.get('bits', KeyManagementFacility.rsaKeyLength)
    passphrase = cmd.get('passphrase', KeyManagementFacility.rsaPassphrase)
    keks = []
    for _ in range(cmd['count']):
        if flavour == 'pkcs8':
            fac = KeyManagementFacility(directory)
            fac.rsaKeyLength = bits
            fac.keyLength = bits // 16
            fac.rsaPassphrase = passphrase
            kek = fac.generate()
            if b'BEGIN ENCRYPTED PRIVATE KEY' not in kek:
                raise AssertionError('reference did not write PKCS#8: %r' % kek[:40])
        elif flavour == 'legacy':
            rsa = Crypto.PublicKey.RSA.generate(bits, e=65537)
            kek = rsa.export_key(passphrase=passphrase, pkcs=1)
            if b'DEK-Info: DES-EDE3-CBC' not in kek:
                raise AssertionError('not a legacy PEM: %r' % kek[:80])
            dek = Crypto.Random.get_random_bytes(bits // 16)
            wrapped = Crypto.Cipher.PKCS1_v1_5.new(rsa).encrypt(dek)
            name = hashlib.md5(kek).hexdigest()
            with open(os.path.join(directory, name + '.dek'), 'wb') as f:
                f.write(wrapped)
        else:
            raise ValueError('unknown flavour %r' % flavour)
        keks.append(b64e(kek))
    return {'keks': keks}


def op_get_deks(cmd):
    fac = facility(cmd['dir'], cmd.get('passphrase'))
    out = []
    for kek in cmd['keks']:
        try:
            out.append(b64e(fac.getEncryptionKey(b64d(kek))))
        except Exception as exc:  # KeyError, ValueError, ... reported as data
            out.append(err(exc))
    return {'deks': out}


def op_keys(cmd):
    fac = facility(cmd['dir'])
    return {'keys': sorted(fac.keys()), 'len': len(fac),
            'contains': [name in fac for name in cmd.get('names', [])]}


def _crypt(cmd, method):
    fac = facility(cmd['dir'], cmd.get('passphrase'))
    kek = b64d(cmd['kek'])
    fn = getattr(fac, method)
    out = []
    for item in cmd['data']:
        try:
            out.append(b64e(fn(kek, b64d(item))))
        except Exception as exc:
            out.append(err(exc))
    return {'out': out}


def op_encrypt(cmd):
    return _crypt(cmd, 'encrypt')


def op_decrypt(cmd):
    return _crypt(cmd, 'decrypt')


def _crypt_files(cmd, method):
    fac = facility(cmd['dir'], cmd.get('passphrase'))
    kek = b64d(cmd['kek'])
    fn = getattr(fac, method)
    out = []
    for spec in cmd['files']:
        try:
            with open(spec['src'], 'rb') as src, open(spec['dst'], 'w+b') as dst:
                src.seek(spec.get('src_offset', 0))
                fn(kek, src, dst, chunksize=spec['chunksize'])
            out.append(None)
        except Exception as exc:
            out.append(err(exc))
    return {'out': out}


def op_encrypt_files(cmd):
    return _crypt_files(cmd, 'encrypt_file')


def op_decrypt_files(cmd):
    return _crypt_files(cmd, 'decrypt_file')


class _Holder(object):
    def __init__(self, key):
        self.key = key


def _register(holder):
    import zope.component
    from keas.kmi.interfaces import IEncryptionService, IKeyHolder
    from keas.kmi.testing import TestingKeyHolder, TestingKeyManagementFacility

    os.makedirs(holder['dir'], exist_ok=True)
    if holder['kind'] == 'testing':
        keyholder = TestingKeyHolder()
        service = TestingKeyManagementFacility(holder['dir'])
    elif holder['kind'] == 'kek':
        keyholder = _Holder(b64d(holder['kek']))
        service = facility(holder['dir'], holder.get('passphrase'))
    else:
        raise ValueError('unknown holder %r' % holder['kind'])
    zope.component.provideUtility(keyholder, IKeyHolder)
    zope.component.provideUtility(service, IEncryptionService)


def _open(path):
    import ZODB
    import ZODB.FileStorage
    storage = ZODB.FileStorage.FileStorage(path)
    return ZODB.DB(storage)


def op_zodb_write(cmd):
    import transaction
    import zodbmodel
    _register(cmd['holder'])
    db = _open(cmd['path'])
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        zodbmodel.build(root, cmd['spec'])
        tm.commit()
        desc = zodbmodel.describe(root)
        conn.close()
    finally:
        db.close()
    return desc


def op_zodb_read(cmd):
    import transaction
    import zodbmodel
    _register(cmd['holder'])
    db = _open(cmd['path'])
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        if cmd.get('mutate') is not None:
            zodbmodel.mutate(root, cmd['mutate'])
            tm.commit()
            conn.close()
            conn = db.open(tm)
            conn.cacheMinimize()
            root = conn.root()
        desc = zodbmodel.describe(root)
        conn.close()
    finally:
        db.close()
    return desc


def op_zodb_records(cmd):
    import ZODB.FileStorage
    storage = ZODB.FileStorage.FileStorage(cmd['path'], read_only=True)
    try:
        records = {}
        for txn in storage.iterator():
            for rec in txn:
                records[binascii.hexlify(rec.oid).decode()] = (
                    b64e(rec.data) if rec.data is not None else None)
    finally:
        storage.close()
    return {'records': records}


def op_local(cmd):
    import functools
    import http.client
    import ssl

    from keas.kmi.facility import LocalKeyManagementFacility

    local = LocalKeyManagementFacility(cmd['url'])
    context = ssl.create_default_context(cafile=cmd['cafile'])
    local.httpConnFactory = functools.partial(http.client.HTTPSConnection, context=context)
    kek = b64d(cmd['kek'])
    result = {}
    try:
        result['dek'] = b64e(local.getEncryptionKey(kek))
    except Exception as exc:
        result['dek'] = err(exc)
    for method in ('encrypt', 'decrypt'):
        out = result[method + 'ed'] = []
        for item in cmd.get(method, []):
            try:
                out.append(b64e(getattr(local, method)(kek, b64d(item))))
            except Exception as exc:
                out.append(err(exc))
    return result


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith('op_')}


def handle(request):
    try:
        if 'batch' in request:
            result = [OPS[c['op']](c) for c in request['batch']]
        else:
            result = OPS[request['op']](request)
        return {'ok': result}
    except Exception:
        return {'error': traceback.format_exc()}


def main(argv):
    if argv[1:2] == ['--serve']:
        out = sys.stdout
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            out.write(json.dumps(handle(json.loads(line))) + '\n')
            out.flush()
        return 0
    text = argv[1] if len(argv) > 1 else sys.stdin.read()
    answer = handle(json.loads(text))
    sys.stdout.write(json.dumps(answer) + '\n')
    return 0 if 'ok' in answer else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv))
