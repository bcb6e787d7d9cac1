"""The malloc settings keep freed tensor memory in the process (no re-faulting each step)."""

import subprocess
import sys

import pytest

SNIPPET = r"""
import torch
from dp_diffusion import allocator

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

applied = allocator.keep_freed_memory()
before = rss_mib()
t = torch.ones(64 * 2**20)  # 256 MiB, one allocation above glibc's default mmap threshold
del t
print(applied, rss_mib() - before)
"""


def run(env_value: str | None) -> tuple[bool, float]:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    if env_value is not None:
        env["DP_DIFFUSION_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    applied, kept = out.stdout.split()
    return applied == "True", float(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc are Linux-only")
def test_freed_tensor_memory_stays_for_reuse():
    applied, kept = run(None)
    assert applied
    assert kept > 200  # the 256 MiB block was not unmapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc are Linux-only")
def test_opt_out_keeps_glibc_behaviour():
    applied, kept = run("default")
    assert not applied
    assert kept < 50  # glibc unmapped the block on free
