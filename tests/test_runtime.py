"""The allocator setting of `medclipsam.runtime`: applied on glibc, and then large blocks come from the heap, so
re-allocating a large tensor no longer page-faults its memory afresh."""
import platform
import resource

import pytest
import torch

from medclipsam.runtime import tune_allocator


def _faults_of_repeated_large_tensors() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(64 * 2**20 // 4)  # 64 MB: above the largest mmap threshold glibc adapts to (32 MB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_again():
    assert tune_allocator()
    _faults_of_repeated_large_tensors()  # the heap grows once
    assert _faults_of_repeated_large_tensors() < 10 * 16384 // 10  # untuned: 16384 fresh pages per tensor
