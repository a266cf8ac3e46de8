"""kcat (Debian's package, librdkafka 2.0.x) producing and consuming."""

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed")


def test_kcat_produce_and_consume(bootstrap, topic_name):
    lines = "".join(f"key{i}:value {i}\n" for i in range(50))
    subprocess.run(["kcat", "-b", bootstrap, "-t", topic_name, "-P", "-K:", "-z", "snappy"],
                   input=lines.encode(), check=True, timeout=60)
    out = subprocess.run(["kcat", "-b", bootstrap, "-t", topic_name, "-C", "-e", "-o", "beginning",
                          "-f", "%o %k=%s\\n"], check=True, timeout=60, capture_output=True).stdout.decode()
    assert out.splitlines() == [f"{i} key{i}=value {i}" for i in range(50)]


def test_kcat_metadata(bootstrap, topic_name):
    subprocess.run(["kcat", "-b", bootstrap, "-t", topic_name, "-P"], input=b"x\n", check=True, timeout=60)
    out = subprocess.run(["kcat", "-b", bootstrap, "-L"], check=True, timeout=60, capture_output=True).stdout.decode()
    assert f'topic "{topic_name}" with 1 partitions' in out
