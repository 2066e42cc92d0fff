"""The C++ operators' CPU output cache (csrc/output_cache.cpp): a freed block is reused, split
for smaller tensors and merged back when they are freed; memory freed anywhere in the arena serves
a larger request once merged; beyond the limit the least recently freed blocks are given back,
in the arena's middle as at its top, and serve later requests; live tensors never share memory; small
tensors, other devices and MANUALCONV_CPU_CACHE_MB=0 bypass it; the limit on free bytes holds; a bad
limit is refused at import, naming the variable; the benchmark's peak memory counts the free bytes
it holds. Each scenario runs in a fresh process (the cache is process-wide) after empty_cache(),
so its addresses and counters are its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import manualconv
from manualconv import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20

# Runs in a fresh interpreter: prints one JSON object of what the scenarios observed.
SCRIPT = r"""
import json, random, sys, torch, manualconv
MiB = 1 << 20
info = manualconv.output_cache_info

def out(nbytes):
    # a new float32 tensor of nbytes from a C++ operator (relu_backward's δz = empty_like(y))
    y = torch.ones(nbytes // 4)
    return torch.ops.manualconv.relu_backward(y, y)

def fresh():
    manualconv.empty_cache()
    assert info()["reserved_bytes"] == 0, info()

r = {"limit": info()["limit_bytes"]}

# reuse: the freed block serves the next request of its size, at the same address
fresh()
a = out(2 * MiB); first = a.data_ptr(); r["after_first"] = info(); del a
b = out(2 * MiB); r["same_address"] = b.data_ptr() == first; r["after_second"] = info(); del b

# below 1 MiB: not the cache's
fresh()
before = info(); s = out(MiB // 2); r["small_untouched"] = info() == before; del s

# split and merge: one freed 64 MiB block serves four 16 MiB tensors, and is whole again after
fresh()
big = out(64 * MiB); base = big.data_ptr(); del big
misses = info()["misses"]
parts = [out(16 * MiB) for _ in range(4)]
r["parts_offsets"] = sorted(p.data_ptr() - base for p in parts)
r["parts_misses"] = info()["misses"] - misses
for k in (1, 3, 0, 2):
    parts[k] = None
r["merged"] = info()
r["released"] = manualconv.empty_cache()
r["after_release"] = info()

# no two live tensors share memory: random sizes and lifetimes, each filled with its own value
fresh()
rng = random.Random(0)
live = {}
for i in range(300):
    if live and rng.random() < 0.45:
        live.pop(rng.choice(sorted(live)))
    else:
        t = out(rng.choice([1, 2, 3, 5, 8, 13, 21, 34]) * MiB + 4 * rng.randrange(1000))
        t.fill_(float(i))
        live[i] = t
spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in live.values())
r["disjoint"] = all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
r["intact"] = all(bool((t == float(i)).all()) for i, t in live.items())
r["random_hits"] = info()["hits"]
live.clear(); t = None

# a tensor from the cache resizes like any other (its storage keeps the allocator)
fresh()
t = out(2 * MiB); t.copy_(torch.arange(t.numel(), dtype=torch.float32))
t.resize_(3 * t.numel())
r["resized_prefix"] = bool((t[: 2 * MiB // 4] == torch.arange(2 * MiB // 4, dtype=torch.float32)).all())
del t
t = out(2 * MiB); t.copy_(torch.arange(t.numel(), dtype=torch.float32)); storage = t.untyped_storage()
storage.resize_(400)  # a small storage: torch asks the tensor's allocator for 400 bytes
r["shrunk"] = storage.nbytes() == 400 and bool((t.new_empty(0).set_(storage).view(-1) == torch.arange(100.0)).all())
del t, storage

# a conv's output and gradients come from it
fresh()
x = torch.randn(32, 16, 32, 32, requires_grad=True); w = torch.randn(16, 16, 3, 3, requires_grad=True)
before = info()
manualconv.functional.conv2d(x, w, padding=1).sum().backward()
r["conv_requests"] = info()["hits"] + info()["misses"] - before["hits"] - before["misses"]
del x, w  # (x.grad, δx, is the cache's)

# the limit: a freed block beyond it goes back to the system
fresh()
c = out(32 * MiB); del c
r["after_large_free"] = info()

# the arena: blocks freed apart merge into one that serves a larger request (no new memory)
fresh()
a, b, c = out(8 * MiB), out(8 * MiB), out(8 * MiB)
base = a.data_ptr()
del a, b
misses = info()["misses"]
d = out(16 * MiB)
r["merged_serves"] = {"offset": d.data_ptr() - base, "new_misses": info()["misses"] - misses, **info()}
del c, d

# a freed block in the arena's middle (c stays in use above it), beyond the limit: given back, its
# address kept; a later request takes it (a miss: its pages are faulted in again), the rest stays
# given back; given back at the top, the top comes down
fresh()
a, b, c = out(4 * MiB), out(24 * MiB), out(4 * MiB)
b_address = b.data_ptr()
del b
r["middle_given_back"] = info()
e = out(20 * MiB)
r["given_back_reused"] = {"same_address": e.data_ptr() == b_address, **info()}
e.fill_(3.0); c.fill_(5.0)
r["given_back_intact"] = bool((e == 3.0).all()) and bool((c == 5.0).all())
top = c.data_ptr() + 4 * MiB
del e
f = out(28 * MiB)  # 20 + 4 free below c: too small; from the top, above c
r["above_top"] = f.data_ptr() == top
del f
r["after_top_free"] = info()
del a, c
print(json.dumps(r))
"""


def run(**env_overrides) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MANUALCONV_CPU_CACHE_MB", None)
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def observed() -> dict:
    result = run()
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_limit_is_1_GiB(observed):
    assert observed["limit"] == 1024 * MiB


def test_a_freed_block_is_reused(observed):
    first, second = observed["after_first"], observed["after_second"]
    assert (first["misses"], first["hits"]) == (1, 0)
    assert first["reserved_bytes"] == 2 * MiB  # the arena's top grew by the request
    assert first["free_bytes"] == 0
    assert (second["misses"], second["hits"]) == (1, 1)
    assert second["reserved_bytes"] == 2 * MiB
    assert observed["same_address"]


def test_small_tensors_bypass_the_cache(observed):
    assert observed["small_untouched"]


def test_a_segment_is_split_and_merged_back(observed):
    assert observed["parts_offsets"] == [0, 16 * MiB, 32 * MiB, 48 * MiB]
    assert observed["parts_misses"] == 0
    merged = observed["merged"]
    assert merged["free_bytes"] == merged["reserved_bytes"] == 64 * MiB
    assert observed["released"] == 1  # one free block, given back
    assert observed["after_release"]["reserved_bytes"] == 0


def test_live_tensors_never_share_memory(observed):
    assert observed["disjoint"]
    assert observed["intact"]
    assert observed["random_hits"] > 0  # the pattern did reuse blocks


def test_a_cached_tensor_resizes(observed):
    assert observed["resized_prefix"]
    assert observed["shrunk"]


def test_conv_outputs_and_gradients_come_from_the_cache(observed):
    # y and δx are 32×16×32×32 float32, 2 MiB each (workspaces, the kernel's choice, may add more)
    assert observed["conv_requests"] >= 2


def test_within_the_limit_the_middle_block_is_kept_and_split(observed):
    middle, reused, top = observed["middle_given_back"], observed["given_back_reused"], observed["after_top_free"]
    assert (middle["reserved_bytes"], middle["free_bytes"]) == (32 * MiB, 24 * MiB)
    assert reused["same_address"] and observed["given_back_intact"]
    assert reused["hits"] == middle["hits"] + 1 and reused["misses"] == middle["misses"]
    assert (reused["reserved_bytes"], reused["free_bytes"]) == (32 * MiB, 4 * MiB)
    assert observed["above_top"]  # 24 MiB free below c: too small for 28
    assert (top["reserved_bytes"], top["free_bytes"]) == (60 * MiB, 52 * MiB)


def test_blocks_freed_apart_merge_and_serve_a_larger_request(observed):
    served = observed["merged_serves"]
    assert served["offset"] == 0  # a and b's 16 MiB, at a's address
    assert served["new_misses"] == 0
    assert (served["reserved_bytes"], served["free_bytes"]) == (24 * MiB, 0)


def test_within_the_limit_a_freed_block_is_kept(observed):
    after = observed["after_large_free"]
    assert after["free_bytes"] == after["reserved_bytes"] == 32 * MiB


def test_a_block_beyond_the_limit_goes_back():
    result = run(MANUALCONV_CPU_CACHE_MB="16")
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["limit"] == 16 * MiB
    assert r["after_large_free"]["reserved_bytes"] == 0  # 32 MiB free > 16 MiB: given back
    assert r["after_second"]["reserved_bytes"] == 2 * MiB  # 2 MiB free: kept
    assert r["disjoint"] and r["intact"]
    # 24 MiB freed between two live 4 MiB blocks: 24 > 16, given back though not at the top
    middle = r["middle_given_back"]
    assert (middle["reserved_bytes"], middle["free_bytes"]) == (8 * MiB, 0)
    # 20 MiB served at its address: held again; the 4 MiB rest stays given back
    reused = r["given_back_reused"]
    assert reused["same_address"] and r["given_back_intact"]
    assert (reused["reserved_bytes"], reused["free_bytes"]) == (28 * MiB, 0)
    assert reused["misses"] == middle["misses"] + 1
    # e freed: 20 > 16, given back, merged with the 4 MiB rest; 28 MiB fits neither: the top grows
    assert r["above_top"]
    # freed, 28 + 20 MiB > 16: given back, the 28 at the top lowering it; 8 MiB (a, c) held
    top = r["after_top_free"]
    assert (top["reserved_bytes"], top["free_bytes"]) == (8 * MiB, 0)


def test_zero_turns_the_cache_off():
    result = run(MANUALCONV_CPU_CACHE_MB="0")
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["limit"] == 0
    for key in ("after_first", "after_second", "merged", "after_large_free"):
        assert r[key]["hits"] == r[key]["misses"] == r[key]["reserved_bytes"] == 0
    assert r["disjoint"] and r["intact"] and r["resized_prefix"]


@pytest.mark.parametrize("value", ["lots", "-1", "1.5", " "])
def test_a_bad_limit_is_refused_at_import(value):
    env = dict(os.environ, MANUALCONV_CPU_CACHE_MB=value)
    result = subprocess.run([sys.executable, "-c", "import manualconv"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "MANUALCONV_CPU_CACHE_MB" in result.stderr


def test_benchmark_peak_memory_counts_the_free_blocks_held():
    # Every block of this step comes from the cache (hits, which the profiler is not told of): the
    # peak must still count the 8 MiB it holds for them.
    y = torch.ones(2 * MiB)

    def step():
        torch.ops.manualconv.relu_backward(y, y)

    assert bench.peak_bytes(step) >= 8 * MiB
