"""A small load generator for POST /key, used by bench.py when wrk is missing.

Usage: python benchmarks/loadgen.py PORT SECONDS KEK_FILE DEK_HEX [THREADS]

Posts the KEK to http://127.0.0.1:PORT/key from THREADS threads (default 4)
for SECONDS, checks that every answer is 200 with the DEK, and prints
``{"good": n, "bad": n, "seconds": s}`` as JSON.
"""
import http.client
import json
import sys
import threading
import time


def main(port, seconds, kek_file, dek_hex, threads=4):
    port, seconds, threads = int(port), float(seconds), int(threads)
    with open(kek_file, 'rb') as f:
        kek = f.read()
    dek = bytes.fromhex(dek_hex)
    counts = {'good': 0, 'bad': 0}
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def loop():
        good = bad = 0
        while time.perf_counter() < deadline:
            try:
                conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
                conn.request('POST', '/key', kek, {'Content-Type': 'text/plain'})
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if resp.status == 200 and body == dek:
                    good += 1
                else:
                    bad += 1
            except OSError:
                bad += 1
        with lock:
            counts['good'] += good
            counts['bad'] += bad

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    counts['seconds'] = time.perf_counter() - start
    print(json.dumps(counts))


if __name__ == '__main__':
    main(*sys.argv[1:])
