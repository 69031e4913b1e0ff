"""keas.kmi: a key management facility for envelope encryption (NIST SP 800-57).

A master facility hands out RSA key-encrypting keys (KEKs) and keeps the data
keys (DEKs) they wrap; clients keep their KEK and fetch the DEK to encrypt data
with AES-256. The work is done by the Rust module ``keas.kmi._kmi``.
"""
