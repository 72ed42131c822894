"""In CI every stack must be installed: a missing framework must fail there, not skip its tests."""

import os

import pytest

from diffperf.hardware import FRAMEWORK_PACKAGES, framework_installed


@pytest.mark.parametrize("framework", sorted(FRAMEWORK_PACKAGES))
def test_every_stack_is_installed_in_ci(framework):
    if not os.environ.get("CI"):
        pytest.skip("outside CI a stack may be left out on purpose (pip install -e '.[torch|tf|jax]')")
    assert framework_installed(framework), f"{framework} stack missing in CI: .ci/setup must install '.[all]'"
