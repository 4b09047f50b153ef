"""runtime.pick_dtype: bfloat16 on CPUs that multiply it natively, float32 elsewhere, $LORAKIT_DTYPE first."""

from __future__ import annotations

import pytest
import torch

from lorakit import runtime


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_dtype_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.delenv("LORAKIT_DTYPE", raising=False)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.pick_dtype(torch.device("cpu")) == expected
    rt = runtime.setup(device="cpu")
    assert rt.dtype == expected
    assert ("native bfloat16" in str(rt)) == native  # the printed line says why it chose bf16


def test_environment_overrides_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("LORAKIT_DTYPE", "float32")
    assert runtime.pick_dtype(torch.device("cpu")) == torch.float32
    assert "native bfloat16" not in str(runtime.setup(device="cpu"))
    monkeypatch.setenv("LORAKIT_DTYPE", "fp8")
    with pytest.raises(ValueError, match=r"LORAKIT_DTYPE='fp8' .*'float32'"):
        runtime.pick_dtype(torch.device("cpu"))


def test_native_bf16_check_matches_torch():
    flags = [getattr(torch.cpu, name)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
             if hasattr(torch.cpu, name)]
    assert flags, "torch.cpu no longer reports AMX / AVX512-BF16: cpu_has_native_bf16 would always say False"
    assert runtime.cpu_has_native_bf16() == any(flags)
