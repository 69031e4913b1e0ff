#!/usr/bin/env python3
"""Write small seed corpora for the fuzz targets into <corpus>/<target>/.

    python3 fuzz/make_seeds.py [corpus]    # default: fuzz/corpus

Needs only python3 and the openssl command line tool. The corpus directory is
git-ignored: fuzz/run.sh runs this when it is missing, and `make test` runs it
into a temporary directory, so that a seed that can no longer be made fails
the tests rather than the next fuzzing run. The input layouts are described
at the top of each target in fuzz/fuzz_targets/.
"""
import hashlib
import os
import re
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# The published testing KEK is defined once, in the main crate.
KEK_SOURCE = os.path.join(os.path.dirname(HERE), "src", "kek.rs")
CORPUS = os.path.join(HERE, "corpus")
PASSPHRASE = b"key management facility"
KNOWN_DEK = b"keas.kmi fuzzing: the known DEK!"
KNOWN_PS = 0x5A
CIPHER_DEK, CIPHER_SALT = b"keas.kmi fuzzing DEK", b"12345678"
IV = b"0123456789ABCDEF"


def testing_kek():
    with open(KEK_SOURCE) as f:
        m = re.search(r'const TESTING_KEK: &\[u8\] = b"(.*?)";', f.read(), re.S)
    if m is None:
        sys.exit("make_seeds.py: no `const TESTING_KEK: &[u8] = b\"...\";` in %s" % KEK_SOURCE)
    return m.group(1).encode()


def openssl(*args, stdin=None):
    return subprocess.run(["openssl", *args], input=stdin, check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout


def pem_body(pem):
    import base64
    lines = [l for l in pem.decode().splitlines()
             if l and not l.startswith("-----") and ":" not in l]
    return base64.b64decode("".join(lines))


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def pem_seeds(kek):
    pw = "pass:" + PASSPHRASE.decode()
    with tempfile.NamedTemporaryFile(suffix=".pem") as t:
        t.write(kek)
        t.flush()
        legacy = openssl("rsa", "-in", t.name, "-traditional", "-des3", "-passout", pw)
        legacy_aes = openssl("rsa", "-in", t.name, "-traditional", "-aes256", "-passout", pw)
        p8 = openssl("pkcs8", "-topk8", "-nocrypt", "-in", t.name)
        pbes2 = openssl("pkcs8", "-topk8", "-v2", "aes-256-cbc", "-iter", "1",
                        "-in", t.name, "-passout", pw)
        scrypt = openssl("pkcs8", "-topk8", "-scrypt", "-scrypt_N", "16", "-scrypt_r", "1",
                         "-scrypt_p", "1", "-in", t.name, "-passout", pw)
    pems = {"pkcs1": kek, "legacy3des": legacy, "legacyaes": legacy_aes,
            "pkcs8": p8, "pbes2": pbes2, "scrypt": scrypt}
    for name, pem in pems.items():
        write("pem_import", "m0-" + name, b"\x00" + pem)
        write("pem_import", "m1-" + name, b"\x01" + bytes([len(PASSPHRASE)]) + PASSPHRASE + pem)
    for label, name in [(0, "pkcs1"), (1, "pkcs8"), (2, "pbes2"), (2, "scrypt")]:
        write("pem_import", "m2-" + name, b"\x02" + bytes([label]) + pem_body(pems[name]))
    der = pem_body(kek)
    for choice in range(5):
        write("pem_import", "m3-%d" % choice, b"\x03" + bytes([choice]) + der)


def dek_seeds(kek):
    with tempfile.NamedTemporaryFile(suffix=".pem") as t:
        t.write(kek)
        t.flush()
        n = int(openssl("rsa", "-in", t.name, "-noout", "-modulus").decode().split("=")[1], 16)
    e, k = 161, 64
    def em_for(dek):
        return b"\x00\x02" + bytes([KNOWN_PS]) * (k - 3 - len(dek)) + b"\x00" + dek
    known = pow(int.from_bytes(em_for(KNOWN_DEK), "big"), e, n).to_bytes(k, "big")
    for lengths in range(4):
        write("dek_unwrap", "raw-known-%d" % lengths, bytes([lengths << 1]) + known)
        write("dek_unwrap", "em-known-%d" % lengths, bytes([lengths << 1 | 1]) + em_for(KNOWN_DEK))
    for size in (1, 16, 24, 53):
        write("dek_unwrap", "em-%d" % size, b"\x01" + em_for(bytes(range(1, size + 1))))


def cipher_key():
    d1 = hashlib.md5(CIPHER_DEK + CIPHER_SALT).digest()
    return d1 + hashlib.md5(d1 + CIPHER_DEK + CIPHER_SALT).digest()


def aes_cbc(data, pad):
    args = ["enc", "-aes-256-cbc", "-K", cipher_key().hex(), "-iv", IV.hex()]
    return openssl(*args, stdin=data) if pad else openssl(*args, "-nopad", stdin=data)


def cipher_seeds():
    for n in (0, 1, 15, 16, 17, 40):
        plain = bytes(range(n))
        write("decrypt", "len-%d" % n, b"\x03" + aes_cbc(plain, True))
    for n in (0, 1, 15, 16, 17, 100):
        plain = bytes((i * 7) & 0xFF for i in range(n))
        padded = plain + b" " * (-n % 16)
        stream = struct.pack("<Q", n) + IV + aes_cbc(padded, False)
        write("file_stream", "len-%d" % n, b"\x00" + stream)
        write("file_stream", "len-%d-pieces" % n, b"\x03\x01\x05\x00" + stream)


def v2_seeds():
    """The known-answer vectors (valid v2 messages: the target opens them with
    the vector's DEK and associated data), whole, cut and flipped."""
    import json
    with open(os.path.join(HERE, "..", "tests", "vectors", "v2.json")) as f:
        vectors = json.load(f)
    for index, vector in enumerate(vectors):
        sealed = bytes.fromhex(vector["ciphertext"])
        for pieces in (0, 1, 9):
            write("v2_open", "vector-%d-%d" % (index, pieces),
                  bytes([index + 8 * pieces]) + sealed)
        write("v2_open", "vector-%d-cut" % index, bytes([index]) + sealed[:-1])
        flipped = bytearray(sealed)
        flipped[len(flipped) // 2] ^= 1
        write("v2_open", "vector-%d-flipped" % index, bytes([index]) + bytes(flipped))


def main():
    global CORPUS
    if len(sys.argv) > 1:
        CORPUS = os.path.abspath(sys.argv[1])
    kek = testing_kek()
    pem_seeds(kek)
    dek_seeds(kek)
    cipher_seeds()
    v2_seeds()
    for t in sorted(os.listdir(CORPUS)):
        print("%s: %d seeds" % (t, len(os.listdir(os.path.join(CORPUS, t)))))


if __name__ == "__main__":
    sys.exit(main())
