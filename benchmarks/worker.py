"""A benchmark worker: runs workloads on whichever keas.kmi its interpreter has.

    .venv/bin/python benchmarks/worker.py       # ours
    .venv-ref/bin/python benchmarks/worker.py   # keas.kmi 3.3.0 (pycryptodome)

It reads one JSON request per line on stdin, ``{"op": name, ...arguments}``,
and answers each with one JSON line on stdout: ``{"ok": true, ...}`` or
``{"ok": false, "error": text}``. Every timing is taken inside the worker
(``time.perf_counter``), so the pipe to ``bench.py`` is not measured. Every
workload checks what it computed; a failed check is an error answer, never a
time. Anything else printed (by libraries, warnings) goes to stderr.
"""
import hashlib
import json
import os
import sys
import time
import traceback

# The protocol owns the real stdout; everything else printed goes to stderr.
_proto = os.fdopen(os.dup(1), 'w', buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from keas.kmi.facility import KeyManagementFacility  # noqa: E402


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def read(path):
    with open(path, 'rb') as f:
        return f.read()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def warm_page_cache(folder, size):
    """Write and delete a scratch file of ``size`` bytes in ``folder``.

    This VM's balloon device reports free memory to the host (virtio free page
    reporting, 2 MiB blocks), and the host drops it: memory that has been free
    for about two seconds costs a host page fault when the kernel hands it out
    again. Measured with dd: a new 256 MiB file is written at 0.8-1.1 GB/s
    after 3-5 s of idle free memory, and at 3.3-4.2 GB/s within a second of
    deleting another file (touching anonymous memory does not help). Without
    this, a round that followed the other side's (over a second apart) ran at
    a third of the speed of a round that followed its own. The page cache
    freed here just before the clock starts gives every round, of both sides,
    memory the host still backs.
    """
    path = os.path.join(folder, 'warm.scratch')
    block = bytes(1 << 20)
    with open(path, 'wb') as f:
        for _ in range(size // len(block)):
            f.write(block)
    os.remove(path)


def remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class Worker:

    def __init__(self):
        self.facility = None
        self.keks = {}
        self.blobs = {}

    # -- set up ------------------------------------------------------------

    def op_hello(self):
        import platform
        from importlib import metadata
        versions = {}
        for dist in ('keas.kmi', 'pycryptodome', 'ZODB', 'persistent',
                     'zodbpickle', 'gunicorn', 'WebOb', 'pyramid'):
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        import keas.kmi.facility
        return {'python': platform.python_version(),
                'executable': sys.executable,
                'facility_module': keas.kmi.facility.__file__,
                'versions': versions}

    def op_make_keks(self, store, kekdir, dek_length=128):
        """Reference side only: the two KEK flavours the benchmarks read.

        ``legacy``: what keas.kmi 3.0-3.2 wrote, made here with pycryptodome
        (RSA 2048, PKCS#1 with legacy PEM encryption) and a DEK wrapped with
        PKCS#1 v1.5. ``pkcs8``: what this facility's generate() writes.
        """
        from Crypto.Cipher import PKCS1_v1_5
        from Crypto.PublicKey import RSA
        os.makedirs(store, mode=0o700, exist_ok=True)
        os.makedirs(kekdir, exist_ok=True)
        rsa = RSA.generate(2048)
        legacy = rsa.export_key(passphrase=KeyManagementFacility.rsaPassphrase,
                                pkcs=1)
        check(b'Proc-Type: 4,ENCRYPTED' in legacy, 'legacy KEK is not legacy PEM')
        dek = os.urandom(dek_length)
        wrapped = PKCS1_v1_5.new(rsa.public_key()).encrypt(dek)
        name = hashlib.md5(legacy).hexdigest()
        with open(os.path.join(store, name + '.dek'), 'wb') as f:
            f.write(wrapped)
        pkcs8 = KeyManagementFacility(store).generate()
        check(pkcs8.startswith(b'-----BEGIN ENCRYPTED PRIVATE KEY-----'),
              'reference generate() did not write PKCS#8: %r' % pkcs8[:40])
        pkcs8_dek = KeyManagementFacility(store).getEncryptionKey(pkcs8)
        check(KeyManagementFacility(store).getEncryptionKey(legacy) == dek,
              'legacy KEK does not give back its DEK')
        out = {}
        for kind, kek, key in (('legacy', legacy, dek), ('pkcs8', pkcs8, pkcs8_dek)):
            path = os.path.join(kekdir, kind + '.kek')
            with open(path, 'wb') as f:
                f.write(kek)
            out[kind] = {'kek_path': path, 'dek': key.hex(),
                         'name': hashlib.md5(kek).hexdigest()}
        return out

    def op_setup(self, store, keks):
        """One facility over ``store``; ``keks``: {kind: path of the KEK file}."""
        self.facility = KeyManagementFacility(store)
        self.keks = {kind: read(path) for kind, path in keks.items()}
        return {'deks': {kind: self.facility.getEncryptionKey(kek).hex()
                         for kind, kek in self.keks.items()}}

    def op_load(self, name, path):
        self.blobs[name] = read(path)
        return {'size': len(self.blobs[name])}

    def op_drop(self, name):
        self.blobs.pop(name, None)
        return {}

    # -- workloads ---------------------------------------------------------

    def op_small(self, which, kind, n, plaintext, ciphertext):
        """``n`` calls of encrypt (or decrypt) of one short string, DEK cached."""
        fac = self.facility
        kek = self.keks[kind]
        plain = bytes.fromhex(plaintext)
        cipher = bytes.fromhex(ciphertext)
        fac.getEncryptionKey(kek)  # warm the DEK cache
        if which == 'encrypt':
            fn, arg, expected = fac.encrypt, plain, cipher
        else:
            fn, arg, expected = fac.decrypt, cipher, plain
        check(fn(kek, arg) == expected, '%s gave a wrong answer' % which)
        loop = range(n)
        t0 = time.perf_counter()
        for _ in loop:
            out = fn(kek, arg)
        seconds = time.perf_counter() - t0
        check(out == expected, '%s gave a wrong answer in the loop' % which)
        check(fac.decrypt(kek, fac.encrypt(kek, plain)) == plain,
              'decrypt(encrypt(x)) != x')
        return {'seconds': seconds, 'calls': n}

    def op_bulk(self, which, kind, plain, cipher):
        """encrypt or decrypt of one large bytes object (names of loaded blobs).

        The timed call follows the same call, untimed, on both sides. Each
        call returns a new 64 MiB ``bytes``, on fresh pages from the kernel,
        and on this VM those pages are a lottery: free memory that the balloon
        has reported to the host (virtio free page reporting, after about two
        seconds free) costs a host fault per 4 KiB when it is touched again.
        Measured in a loop with 3 s pauses, our decrypt of 64 MiB took 52-143
        ms that way, and 5.5-21 ms right after an untimed call, whose output
        pages, just freed, are the ones the kernel hands out next. The kernel
        still zeroes every new page, in every round of both sides.
        """
        fac = self.facility
        kek = self.keks[kind]
        fac.getEncryptionKey(kek)
        src = self.blobs[plain if which == 'encrypt' else cipher]
        call = fac.encrypt if which == 'encrypt' else fac.decrypt
        t0 = time.perf_counter()
        warm = call(kek, src)
        warm_seconds = time.perf_counter() - t0
        del warm
        t0 = time.perf_counter()
        out = call(kek, src)
        seconds = time.perf_counter() - t0
        expected = self.blobs[cipher if which == 'encrypt' else plain]
        check(len(out) == len(expected) and out == expected,
              '%s of %d bytes gave a wrong answer' % (which, len(src)))
        del out
        return {'seconds': seconds, 'bytes': len(src), 'warm_seconds': warm_seconds}

    def op_file(self, which, kind, src, dst):
        """encrypt_file / decrypt_file between real files, open to close."""
        fac = self.facility
        kek = self.keks[kind]
        fac.getEncryptionKey(kek)
        remove(dst)
        # Start from a clean page cache: the write-back of an earlier round's
        # 256 MiB would otherwise compete with this one (both sides alike).
        os.sync()
        warm_page_cache(os.path.dirname(dst), 2 * os.path.getsize(src))
        t0 = time.perf_counter()
        with open(src, 'rb') as fsrc, open(dst, 'wb') as fdst:
            if which == 'encrypt':
                fac.encrypt_file(kek, fsrc, fdst)
            else:
                fac.decrypt_file(kek, fsrc, fdst)
        seconds = time.perf_counter() - t0
        result = {'seconds': seconds, 'bytes': os.path.getsize(src),
                  'out_size': os.path.getsize(dst)}
        if which == 'decrypt':
            result['sha256'] = sha256_file(dst)
            remove(dst)
        return result

    def op_generate(self, store):
        """One generate(); then a fresh facility must unwrap its DEK."""
        if not store.startswith('postgresql://'):
            os.makedirs(store, mode=0o700, exist_ok=True)
        fac = KeyManagementFacility(store)
        t0 = time.perf_counter()
        kek = fac.generate()
        seconds = time.perf_counter() - t0
        name = hashlib.md5(kek).hexdigest()
        if store.startswith('postgresql://'):
            check(name in KeyManagementFacility(store), 'generate() stored no row %s' % name)
        else:
            check(os.path.exists(os.path.join(store, name + '.dek')),
                  'generate() stored no %s.dek' % name)
        dek = KeyManagementFacility(store).getEncryptionKey(kek)
        check(len(dek) == fac.keyLength,
              'generated DEK has %d bytes, not %d' % (len(dek), fac.keyLength))
        check(fac.decrypt(kek, fac.encrypt(kek, b'x' * 33)) == b'x' * 33,
              'round trip under a generated KEK failed')
        return {'seconds': seconds, 'kek': kek.decode('ascii'), 'dek': dek.hex()}

    def op_unwrap(self, store, kek, dek):
        """A fresh facility unwraps ``kek`` (PEM text) to ``dek`` (hex)."""
        got = KeyManagementFacility(store).getEncryptionKey(kek.encode('ascii'))
        check(got.hex() == dek, 'unwrapped a different DEK')
        return {}

    def op_cold(self, store, kind, n, dek):
        """``n`` times: a fresh facility instance, then getEncryptionKey.

        The instance is created inside the timed region: "cold" is the whole
        cost of a first lookup in a new facility.
        """
        kek = self.keks[kind]
        expected = bytes.fromhex(dek)
        got = []
        t0 = time.perf_counter()
        for _ in range(n):
            got.append(KeyManagementFacility(store).getEncryptionKey(kek))
        seconds = time.perf_counter() - t0
        check(all(g == expected for g in got),
              'cold getEncryptionKey returned a wrong DEK')
        return {'seconds': seconds, 'calls': n}

    def op_store_get(self, store, name, n, expected):
        """``n`` get(name) calls on one open key store (ours only); for a
        database, also ``n`` of the same primary-key SELECT straight through
        one psycopg connection, without the pool."""
        from keas.kmi.store import open_store
        want = bytes.fromhex(expected)
        opened = open_store(store)
        check(opened.get(name) == want, 'store.get returned other bytes')
        t0 = time.perf_counter()
        for _ in range(n):
            got = opened.get(name)
        seconds = time.perf_counter() - t0
        check(got == want, 'store.get returned other bytes in the loop')
        result = {'seconds': seconds, 'calls': n}
        if store.startswith('postgresql://'):
            import psycopg
            with psycopg.connect(opened._settings.conninfo, autocommit=True) as conn:
                query = 'SELECT wrapped FROM kmi.keys WHERE name = %s'
                conn.execute(query, [name]).fetchone()
                t0 = time.perf_counter()
                for _ in range(n):
                    row = conn.execute(query, [name], binary=True).fetchone()
                result['raw_select_seconds'] = time.perf_counter() - t0
                check(bytes(row[0]) == want, 'SELECT returned other bytes')
        opened.close()
        return result

    # -- wrapped keys: our client in its two modes (ours only) -------------------

    def _client(self, url, cafile, mode):
        """A new LocalKeyManagementFacility (an empty DEK cache) in ``mode``;
        one TLS context for all, as an application would keep."""
        import ssl
        from keas.kmi.facility import LocalKeyManagementFacility
        contexts = self.__dict__.setdefault('_contexts', {})
        if cafile not in contexts:
            contexts[cafile] = ssl.create_default_context(cafile=cafile)
        return LocalKeyManagementFacility(url, ssl_context=contexts[cafile], keyMode=mode)

    def op_client_keys(self, store, count):
        """``count`` KEKs made by a master facility straight into ``store``
        (which the server serves), and their DEKs, kept for the rows below."""
        fac = KeyManagementFacility(store)
        self.client_keys = []
        for _ in range(count):
            kek = fac.generate()
            self.client_keys.append((kek, KeyManagementFacility(store).getEncryptionKey(kek)))
        return {'count': count}

    def op_client_cold(self, url, cafile, mode, first, n):
        """For ``n`` KEKs from index ``first``: a new client, then its first
        getEncryptionKey (legacy: POST /key; wrapped: GET /wrapped and the
        unwrap here). Each KEK goes to POST /key once only, so that the
        server unwraps it (no server cache holds it)."""
        keys = self.client_keys[first:first + n]
        check(len(keys) == n, 'only %d client keys from %d' % (len(keys), first))
        got = []
        t0 = time.perf_counter()
        for kek, _ in keys:
            got.append(self._client(url, cafile, mode).getEncryptionKey(kek))
        seconds = time.perf_counter() - t0
        check(got == [dek for _, dek in keys], 'cold %s getEncryptionKey: a wrong DEK' % mode)
        return {'seconds': seconds, 'calls': n}

    def op_client_generate(self, url, cafile, mode, store):
        """One generate() of a client in ``mode`` (legacy: POST /new, the
        server makes the key; wrapped: made here, PUT /wrapped); then the
        store must hold it, and a client in the other mode read it."""
        client = self._client(url, cafile, mode)
        t0 = time.perf_counter()
        kek = client.generate()
        seconds = time.perf_counter() - t0
        dek = KeyManagementFacility(store).getEncryptionKey(kek)
        check(len(dek) == client.keyLength, 'generated DEK has %d bytes' % len(dek))
        other = 'legacy' if mode == 'wrapped' else 'wrapped'
        check(self._client(url, cafile, other).getEncryptionKey(kek) == dek,
              'a %s client reads another DEK for a key made in %s mode' % (other, mode))
        check(client.decrypt(kek, client.encrypt(kek, b'x' * 33)) == b'x' * 33,
              'round trip under a generated KEK failed')
        return {'seconds': seconds, 'pem': kek.splitlines()[0].decode()}

    def op_client_warm(self, url, cafile, mode, index, n, what):
        """``n`` warm calls (``what``: getEncryptionKey, or encrypt 15 bytes)
        of one client whose cache holds the DEK; no request may be made."""
        kek, dek = self.client_keys[index]
        client = self._client(url, cafile, mode)
        check(client.getEncryptionKey(kek) == dek, 'warm-up: a wrong DEK')
        opened = []
        factory = client.httpsConnFactory

        def counting(*args, **kwargs):
            opened.append(args)
            return factory(*args, **kwargs)
        client.httpsConnFactory = counting
        data = b'a secret string'
        if what == 'dek':
            call = client.getEncryptionKey
            t0 = time.perf_counter()
            for _ in range(n):
                got = call(kek)
            seconds = time.perf_counter() - t0
            check(got == dek, 'warm getEncryptionKey: a wrong DEK')
        else:
            call = client.encrypt
            t0 = time.perf_counter()
            for _ in range(n):
                got = call(kek, data)
            seconds = time.perf_counter() - t0
            check(client.decrypt(kek, got) == data, 'warm encrypt: no round trip')
        check(not opened, 'warm calls made %d requests' % len(opened))
        return {'seconds': seconds, 'calls': n}

    # -- ZODB ------------------------------------------------------------------

    _zodb_ready = False

    def _zodb_setup(self, store):
        if self._zodb_ready:
            return
        from zope.component import provideUtility
        from keas.kmi import testing
        from keas.kmi.interfaces import IEncryptionService, IKeyHolder
        os.makedirs(store, mode=0o700, exist_ok=True)
        provideUtility(testing.TestingKeyHolder(), IKeyHolder)
        self._zodb_service = testing.TestingKeyManagementFacility(store)
        provideUtility(self._zodb_service, IEncryptionService)
        self._zodb_ready = True

    @staticmethod
    def _record_fields(i):
        return ('record-%06d' % i,
                hashlib.sha256(b'%d' % i).digest() * 4,
                {'index': i, 'even': i % 2 == 0, 'label': 'tag%d' % (i % 7)})

    def _zodb_load(self, path, fields):
        """Load every record through a new DB and connection; check each
        against ``fields`` (made before the clock started)."""
        import ZODB
        import ZODB.FileStorage
        db = ZODB.DB(ZODB.FileStorage.FileStorage(path, read_only=True))
        try:
            conn = db.open()
            records = conn.root()['records']
            count = 0
            for i, record in records.items():
                name, payload, tags = fields[i]
                if (record.number != i or record.name != name
                        or record.payload != payload or record.tags != tags):
                    raise CheckFailed('ZODB record %d read back wrong' % i)
                count += 1
            n = len(fields)
            check(count == n, 'ZODB read %d records, not %d' % (count, n))
            # The stored state must be ciphertext, not a readable pickle.
            some = records[n // 2]
            raw, _ = db.storage.load(some._p_oid)
            check(some.name.encode() not in raw,
                  'a record was stored in plain text')
            conn.close()
        finally:
            db.close()

    def op_zodb(self, path, n, store, fmt=1):
        """Commit ``n`` EncryptedPersistent records to a new FileStorage, then
        load and check all of them through a new DB and connection.
        ``fmt`` (ours only): the data format the states are written in."""
        import BTrees.OOBTree
        import transaction
        import ZODB
        import ZODB.FileStorage
        from zodbmodel import Record
        self._zodb_setup(store)
        self._zodb_service.dataFormat = fmt
        for suffix in ('', '.index', '.lock', '.tmp'):
            remove(path + suffix)
        # The records' contents are test data, made before the clock starts.
        fields = [self._record_fields(i) for i in range(n)]
        t0 = time.perf_counter()
        db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
        try:
            conn = db.open()
            records = conn.root()['records'] = BTrees.OOBTree.OOBTree()
            for i in range(n):
                records[i] = Record(i, *fields[i])
            transaction.commit()
            conn.close()
        finally:
            db.close()
        t1 = time.perf_counter()
        self._zodb_load(path, fields)
        t2 = time.perf_counter()
        return {'seconds': t2 - t0, 'commit': t1 - t0, 'load': t2 - t1,
                'objects': n}

    def op_zodb_verify(self, path, n, store):
        """Read a database the other side wrote (untimed)."""
        self._zodb_setup(store)
        self._zodb_load(path, [self._record_fields(i) for i in range(n)])
        return {}

    # -- the v2 format (ours only) ------------------------------------------

    def _v2_facility(self):
        fac = self.facility
        fac.dataFormat = 2
        return fac

    def op_small_v2(self, which, kind, n, plaintext):
        """``n`` v2 encrypt (or decrypt) calls of one short string, DEK cached."""
        fac = self._v2_facility()
        kek = self.keks[kind]
        plain = bytes.fromhex(plaintext)
        sealed = fac.encrypt(kek, plain)
        check(fac.decrypt(kek, sealed) == plain, 'v2 round trip failed')
        fn, arg = (fac.encrypt, plain) if which == 'encrypt' else (fac.decrypt, sealed)
        loop = range(n)
        t0 = time.perf_counter()
        for _ in loop:
            out = fn(kek, arg)
        seconds = time.perf_counter() - t0
        if which == 'encrypt':
            check(len(out) == 82 + len(plain) + 16 and fac.decrypt(kek, out) == plain,
                  'v2 encrypt gave a wrong answer in the loop')
        else:
            check(out == plain, 'v2 decrypt gave a wrong answer in the loop')
        fac.dataFormat = 1
        return {'seconds': seconds, 'calls': n}

    def op_bulk_v2(self, which, kind, plain):
        """v2 encrypt or decrypt of one large loaded blob, checked untimed."""
        fac = self._v2_facility()
        kek = self.keks[kind]
        src = self.blobs[plain]
        sealed = fac.encrypt(kek, src) if which == 'decrypt' else None
        call = (lambda: fac.encrypt(kek, src)) if which == 'encrypt' else (
            lambda: fac.decrypt(kek, sealed))
        warm = call()  # untimed, as op_bulk does (see there why)
        del warm
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
        if which == 'encrypt':
            check(len(out) == 82 + len(src) + 16 * (len(src) // 16384 + 1)
                  and fac.decrypt(kek, out) == src, 'v2 encrypt of a blob is wrong')
        else:
            check(out == src, 'v2 decrypt of a blob is wrong')
        del out, sealed
        fac.dataFormat = 1
        return {'seconds': seconds, 'bytes': len(src)}

    def op_file_v2(self, which, kind, src, dst):
        """v2 encrypt_file / decrypt_file between real files, open to close."""
        fac = self._v2_facility()
        try:
            return self.op_file(which, kind, src, dst)
        finally:
            fac.dataFormat = 1


def main():
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.pop('op')
            if op == 'quit':
                _proto.write(json.dumps({'ok': True}) + '\n')
                break
            answer = getattr(worker, 'op_' + op)(**request)
            answer['ok'] = True
        except CheckFailed as e:
            answer = {'ok': False, 'error': 'check failed: %s' % e}
        except Exception as e:
            traceback.print_exc()
            answer = {'ok': False, 'error': '%s: %s' % (type(e).__name__, e)}
        _proto.write(json.dumps(answer) + '\n')


if __name__ == '__main__':
    main()
