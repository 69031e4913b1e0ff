"""Chunked file encryption runs in bounded memory: a generated 1 GiB stream
encrypts and decrypts with peak RSS growth under 64 MiB."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_one_gib_file_in_bounded_memory(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / 'benchmarks' / 'file_memory.py'), '1024', str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=600).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result['round_trip_ok']
    assert result['encrypt_growth_mib'] < 64, result
    assert result['decrypt_growth_mib'] < 64, result
    assert result['file_encrypt_growth_mib'] < 64, result
    assert result['file_decrypt_growth_mib'] < 64, result


def test_peak_is_the_processs_own_not_its_parents():
    # The benchmark runs file_memory.py from a process that has touched most
    # of the machine's memory. ru_maxrss carries the parent's peak into the
    # child, so the child's growth read 0 whatever it did; VmHWM does not.
    child = (
        'import sys; sys.path.insert(0, %r); import file_memory\n'
        'peak = file_memory.PeakRss()\n'
        'b = bytearray(64 << 20); b[::4096] = b"x" * (len(b) // 4096)\n'
        'print(peak.source, peak.growth_kib() // 1024)\n' % str(ROOT / 'benchmarks'))
    parent = (
        'import subprocess, sys\n'
        'hog = bytearray(256 << 20); hog[::4096] = b"x" * (len(hog) // 4096)\n'
        'print(subprocess.run([sys.executable, "-c", %r], check=True,\n'
        '                     capture_output=True, text=True).stdout)\n' % child)
    out = subprocess.run([sys.executable, '-c', parent], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    source, mib = out.split()
    assert source == 'VmHWM'
    assert 60 <= int(mib) < 128, out
