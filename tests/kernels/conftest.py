"""Fixtures shared by the kernel tests."""

import pytest


@pytest.fixture
def handed_out(monkeypatch):
    """Every result tensor ``result_buffers.new_result`` gives a kernel, in order: where a
    planned buffer was used, these are that buffer."""
    from padst_compiler.kernels import result_buffers

    results = []
    new_result = result_buffers.new_result

    def recording(*args, **kwargs):
        results.append(new_result(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(result_buffers, "new_result", recording)
    return results
