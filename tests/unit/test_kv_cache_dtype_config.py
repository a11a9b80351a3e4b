"""--kv-cache-dtype: parsing, sizing, the platform's refusal, and the disk tier's key."""

import argparse

import pytest
from piston.engine.arg_utils import EngineArgs
from piston.engine.engine_core import EngineCore
from piston.step.config import parse_kv_cache_dtype
from piston.step.kv_transfer import tier_directory


@pytest.mark.parametrize("value,name", [("auto", "auto"), ("fp16", "float16"), ("half", "float16"),
                                        ("BF16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32")])
def test_names_vllm_and_llama_cpp_users_type_are_understood(value, name):
    assert parse_kv_cache_dtype(value) == name


@pytest.mark.parametrize("value", ["fp8", "fp8_e4m3", "int8", "q8_0"])
def test_other_cache_dtypes_are_refused_naming_the_choices(value):
    with pytest.raises(ValueError, match=f"kv_cache_dtype='{value}' is not supported; use one of auto, float32, "
                                         "float16, bfloat16"):
        EngineArgs(kv_cache_dtype=value).create_engine_config()  # before the model is read


def test_the_flag_reaches_the_config_and_halves_the_block(tiny_models):
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(["--model", tiny_models("llama"), "--kv-cache-dtype", "fp16"])
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert config.cache_config.kv_cache_dtype == "float16" and config.kv_cache_dtype == "float16"
    mc = config.model_config
    assert mc.kv_bytes_per_block(16, kv_cache_dtype="float16") * 2 == mc.kv_bytes_per_block(16)
    auto = EngineArgs(model=tiny_models("llama")).create_engine_config()
    assert auto.cache_config.kv_cache_dtype == "auto" and auto.kv_cache_dtype == "float32"


def test_a_platform_that_does_not_store_the_dtype_refuses_it(tiny_models, monkeypatch):
    from piston_cpu.platform import CpuPlatform

    monkeypatch.setattr(CpuPlatform, "kv_cache_dtypes", ("float32",))
    config = EngineArgs(model=tiny_models("llama"), kv_cache_dtype="bfloat16", platform="cpu").create_engine_config()
    with pytest.raises(ValueError, match="kv_cache_dtype='bfloat16': the cpu platform stores K/V as float32"):
        EngineCore(config)


def test_the_disk_tier_keeps_16bit_blocks_apart(tiny_models, tmp_path):
    def directory(kv_cache_dtype):
        return tier_directory(EngineArgs(model=tiny_models("llama"), kv_cache_dtype=kv_cache_dtype,
                                         kv_offloading_dir=str(tmp_path)).create_engine_config())

    # float32 is what auto means for this float32 model: the same blocks, the same directory.
    assert directory("auto") == directory("float32") != directory("float16") != directory("bfloat16")
