"""Platform discovery through entry points, and the HAL boundary."""

import ast
import pathlib

import pytest
from piston.hal import registry
from piston.hal.interface import PLATFORM_INTERFACE_VERSION, Platform
from piston.hal.registry import PlatformError, get_platform, installed_platforms

ROOT = pathlib.Path(__file__).resolve().parents[2]
PLATFORM_PACKAGES = {"piston_cpu", "piston_cuda", "piston_tpu"}


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("PISTON_PLATFORM", raising=False)
    get_platform.cache_clear()
    yield
    get_platform.cache_clear()


def test_all_three_platforms_are_registered():
    assert {"cpu", "cuda", "tpu"} <= set(installed_platforms())


def test_env_var_selects_cpu(monkeypatch):
    monkeypatch.setenv("PISTON_PLATFORM", "cpu")
    cls = get_platform()
    assert cls.name == "cpu" and issubclass(cls, Platform)
    assert cls.interface_version == PLATFORM_INTERFACE_VERSION


def test_unknown_platform_error_lists_installed(monkeypatch):
    monkeypatch.setenv("PISTON_PLATFORM", "quantum")
    with pytest.raises(PlatformError) as e:
        get_platform()
    msg = str(e.value)
    assert "'quantum'" in msg and "cpu (available)" in msg and "cuda (unavailable" in msg


def test_unavailable_platform_is_a_clear_error():
    with pytest.raises(PlatformError, match="Platform 'tpu' is not available"):
        get_platform("tpu")


def test_auto_selection_falls_back_to_cpu():
    assert get_platform().name == "cpu"


def test_wrong_interface_version_is_rejected(monkeypatch):
    class Old(Platform):
        name = "old"
        interface_version = PLATFORM_INTERFACE_VERSION - 1

    class EP:
        value = "x:Old"

        def load(self):
            return Old

    with pytest.raises(PlatformError, match="interface version"):
        registry._load("old", EP())


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_platform_package():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "common").rglob("*.py")
                 if _imported_modules(p) & PLATFORM_PACKAGES]
    assert offenders == []


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_platforms_do_not_import_each_other(platform):
    own = f"piston_{platform}"
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "platforms" / platform).rglob("*.py")
                 if (_imported_modules(p) & PLATFORM_PACKAGES) - {own}]
    assert offenders == []


@pytest.mark.parametrize("online,given,expected", [(True, None, 128), (False, None, 0), (True, 0, 0),
                                                    (True, 512, 512), (False, 64, 64)])
def test_cpu_platform_caps_prompt_tokens_per_step_when_serving(online, given, expected):
    # Live clients (AsyncLLM) get prompts prefilled one after another; offline batches keep
    # the whole budget; a value the user gave is never changed.
    from piston.step.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from piston_cpu.platform import ONLINE_MAX_PREFILL_TOKENS, CpuPlatform

    config = EngineConfig(ModelConfig(model="fake"), CacheConfig(kv_cache_memory=2**20),
                          SchedulerConfig(max_prefill_tokens=given, online=online))
    CpuPlatform.check_and_update_config(config)
    assert ONLINE_MAX_PREFILL_TOKENS == 128
    assert config.scheduler_config.max_prefill_tokens == expected
