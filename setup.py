"""Only the optional C extensions; pyproject.toml holds all the metadata.

``common.esp._esp_fast`` is the ESP byte primitive (common/esp/_esp_fast.c, linked
against OpenSSL libcrypto, Debian: libssl-dev).  ``optional=True``: without a
compiler or the OpenSSL headers the install still succeeds and common/esp/transforms.py
uses its pure-Python path.

``member._batch_io`` is the member's batched socket I/O (member/_batch_io.c:
recvmmsg/sendmmsg, no extra library), also optional: member/batch_io.py falls
back to its pure-Python twin.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "common.esp._esp_fast",
            sources=["common/esp/_esp_fast.c"],
            libraries=["crypto"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        ),
        Extension(
            "member._batch_io",
            sources=["member/_batch_io.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        ),
    ],
)
