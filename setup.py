"""The one compiled part: the broker's socket calls (runtime/_forward.c). The rest of
the project's metadata is in pyproject.toml; `pip install -e .` builds this in place
(it needs a C compiler and Python's headers, as on the machines the README names)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "runtime._forward",
            sources=["runtime/_forward.c"],
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)
