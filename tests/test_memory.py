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
