"""Build glue: the C core under native/ as the extension ``vfiomig._native``."""

import os

from setuptools import Extension, setup

_NATIVE = [os.path.join("native", f) for f in sorted(os.listdir("native")) if f.endswith(".c")]
_FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wconversion", "-Werror", "-fvisibility=hidden"]
if os.environ.get("VFIOMIG_SANITIZE"):
    _FLAGS += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]

setup(
    ext_modules=[
        Extension(
            "vfiomig._native",
            sources=_NATIVE,
            depends=[os.path.join("native", f) for f in os.listdir("native")],
            extra_compile_args=_FLAGS,
            extra_link_args=["-fsanitize=address,undefined"]
            if os.environ.get("VFIOMIG_SANITIZE")
            else [],
        )
    ]
    if _NATIVE
    else [],
)
